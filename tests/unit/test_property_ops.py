"""Property-based: every available backend's ops equal the reference (tests/opcheck.py) over random shapes,
ranks, dtypes, optional u / v / bias and trained subsets.

Backends: torch always; cpp when the extension loads; triton when it imports and runs on the CPU
(TRITON_INTERPRET=1, set by conftest), with fewer and smaller examples: the interpreter is slow.
Examples are derandomised so that CI sees the same cases on every run.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkern.ops import registry
from peftkern.ops.functions import BoundOps
from tests.helpers import opcheck

available = opcheck.available_backend

# every registered backend (a new one is checked without a change here)
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(available(name) is None, reason=f"{name} backend unavailable"))
            for name in registry.names()[1:]]
# (examples, largest dimension) and dtypes: the interpreter is slow and its bf16 dot is wrong
_BUDGET = {"triton": (8, 12)}
_DTYPES = {"triton": [torch.float32]}
BUDGET = {name: _BUDGET.get(name, (40, 40)) for name in registry.names()[1:]}
DTYPES = {name: _DTYPES.get(name, [torch.float32, torch.float64, torch.bfloat16]) for name in registry.names()[1:]}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def adapter_case(draw, backend):
    big = BUDGET[backend][1]
    M, K, N = draw(st.integers(1, 9)), draw(st.integers(1, big)), draw(st.integers(1, big))
    r = draw(st.integers(1, min(K, N, 8)))
    trained = "".join(c for c in "xABuv" if draw(st.booleans()))
    return dict(M=M, K=K, N=N, r=r, dtype=draw(st.sampled_from(DTYPES[backend])), bias=draw(st.booleans()),
                u=draw(st.booleans()), v=draw(st.booleans()), trained=trained,
                lead=draw(st.sampled_from([(), (2,)])), scale=draw(st.floats(0.1, 4.0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_op_matches_reference(backend):
    ops = BoundOps(registry.load(backend))

    @settings(max_examples=BUDGET[backend][0], **SETTINGS)
    @given(adapter_case(backend))
    def check(case):
        case = dict(case)
        M, K, N, r = (case.pop(k) for k in ("M", "K", "N", "r"))
        opcheck.compare_adapter(ops.adapter, M, K, N, r, **case)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_joint_shrink_expand_match_reference(backend):
    ops = BoundOps(registry.load(backend))
    big = BUDGET[backend][1]

    @settings(max_examples=max(3, BUDGET[backend][0] // 3), **SETTINGS)
    @given(st.integers(1, 7), st.integers(2, big), st.lists(st.integers(2, big), min_size=1, max_size=3),
           st.integers(1, 2), st.booleans(), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
    def check(M, K, Ns, r, u, v, dtype):
        if backend == "triton":
            dtype = torch.float32
        opcheck.compare_joint(ops.shrink, ops.expand, M, K, Ns, r, u=u, v=v, dtype=dtype)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hypernet_op_matches_reference(backend):
    ops = BoundOps(registry.load(backend))

    @settings(max_examples=max(3, BUDGET[backend][0] // 3), **SETTINGS)
    @given(st.integers(1, 6), st.integers(1, 16), st.integers(1, 16), st.integers(1, 24))
    def check(L, h_in, h2, P):
        opcheck.compare_hypernet(ops.hypernet, L, h_in, h2, P)

    check()
