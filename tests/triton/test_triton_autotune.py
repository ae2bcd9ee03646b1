"""Every Triton kernel through its real autotuner, on the CPU.

Under the interpreter the kernels normally run one fixed config and never autotune, so
what ``triton.autotune`` does to the arguments on a GPU (reset_to_zero before each config
it benchmarks and before the chosen one) was never exercised: that is how the first GPU
run got wrong gradients (a live factor passed as a stand-in for an unused accumulator
was zeroed). Here the autotuned path is forced, with a benchmarker that runs each config
once (../shared/tools/autotune_on_cpu.py's method), and every op is compared with the
reference on a fresh autotune cache, for every trained subset. Pruning by shared memory
needs a GPU target's compiler and is tested in test_triton_aot.py.
"""
import gc

import pytest
import torch

pytest.importorskip("triton")
from peftkern.ops.backends import triton as tk  # noqa: E402
from peftkern.ops.functions import BoundOps  # noqa: E402
from peftkern_triton import _launch  # noqa: E402
from tests.helpers import opcheck  # noqa: E402

ops = BoundOps(tk.BACKEND)
KERNELS = [obj for obj in gc.get_objects() if isinstance(obj, _launch.Launcher)]


BENCHED = []


def _bench_once(kernel_call, quantiles):
    BENCHED.append(1)
    kernel_call()
    return [1.0, 1.0, 1.0]


@pytest.fixture
def autotuned(monkeypatch):
    """Route every launch through ``triton.autotune`` with all configs, on an empty cache."""
    if not _launch.interpreting():
        pytest.skip("forces the autotuner under the interpreter; on a GPU it runs for real")

    def tuned_call(self, grid, *args, **kwargs):
        _launch.count_launch(self.name)
        self.check_aliases(args)
        self.tuned[grid](*args, **kwargs)

    monkeypatch.setattr(_launch.Launcher, "__call__", tuned_call)
    for kernel in KERNELS:
        monkeypatch.setitem(kernel.tuned.__dict__, "do_bench", _bench_once)
        monkeypatch.setattr(kernel.tuned, "early_config_prune", None)
        monkeypatch.setattr(kernel.tuned, "cache", {})
    BENCHED.clear()
    yield
    assert len(BENCHED) > 1  # configs were really benchmarked, the reset hooks really ran
    assert {k.name for k in KERNELS} >= {"lowrank_gemm", "shrink", "dy_pass", "grad_a", "hypernet_fwd",
                                         "hypernet_bwd"}


def test_every_kernel_has_several_configs():
    assert all(len(k.tuned.configs) > 1 for k in KERNELS)


@pytest.mark.parametrize("trained", ["xABuv", "xAB", "AB", "xB", "x", "uv", "xuv", "Auv"])
def test_adapter_through_the_autotuner(autotuned, trained):
    opcheck.compare_adapter(ops.adapter, 19, 33, 17, 4, trained=trained)


@pytest.mark.parametrize("trained", ["xAB", "x", "AB", "xB"])
def test_adapter_without_u_v_bias_through_the_autotuner(autotuned, trained):
    """The failing GPU cases: B frozen or no u, so Gt or du is not asked for."""
    opcheck.compare_adapter(ops.adapter, 19, 33, 17, 4, trained=trained, bias=False, u=False, v=False)


def test_adapter_with_dropout_through_the_autotuner(autotuned):
    opcheck.compare_adapter(ops.adapter, 19, 33, 17, 4, dropout=0.3, mask=tk.BACKEND.dropout_mask)


def test_joint_through_the_autotuner(autotuned):
    opcheck.compare_joint(ops.shrink, ops.expand, 19, 21, [21, 9], 4)


@pytest.mark.parametrize("trained", ["E", "W2b2", "EW1b1W2b2"])
def test_hypernet_through_the_autotuner(autotuned, trained):
    """With only W2/b2 trained, dH is not needed: its accumulator must be a scratch tensor."""
    opcheck.compare_hypernet_trained(ops.hypernet, trained)


def test_an_aliased_reset_argument_is_refused():
    """The guard itself: an accumulator that overlaps another argument never reaches the autotuner."""
    from peftkern_triton.adapter_backward import _DY_PASS

    g = torch.randn(8, 5)
    fv = torch.randn(5, 16)
    args = [g, fv, torch.randn(8, 16), fv, torch.empty(8, 16), torch.zeros(5, 16), fv]  # du aliases fv
    with pytest.raises(RuntimeError, match="du_ptr.*overlaps"):
        _DY_PASS.check_aliases(args)


@pytest.mark.parametrize("route", ["scaled", "folded"])
def test_dora_through_the_autotuner(autotuned, route, monkeypatch):
    """DoRA's column scale writes y over z in place: every config the autotuner tries must start
    from the same z (the second GPU run's fault: the scale applied once per config)."""
    from peftkern.ops import functions
    from tests.unit.test_dora_ops import _inputs, assert_matches_reference

    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", 0 if route == "folded" else float("inf"))
    assert_matches_reference(ops, *_inputs(19, 33, 17, 4))


def test_4bit_adapter_through_the_autotuner(autotuned):
    pytest.importorskip("bitsandbytes")
    from tests.triton.test_triton_4bit import assert_matches_reference

    assert_matches_reference(19, 64, 17, 4, "nf4", True, bias=False)
