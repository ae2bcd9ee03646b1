"""Shared test set-up: the tiers, Triton's interpreter, seeds, threads.

Tiers are folders, and each folder's tests carry its marker:

    tests/unit/         unit         the engine on tiny tensors and models; the developer's loop
                                     (``python -m pytest``: pytest.ini's default path)
    tests/triton/       triton       the Triton kernels in the interpreter (slow per call: tiny shapes)
    tests/integration/  integration  fine-tuning runs, distributed, resume, builds, compile, trainers
    tests/gpu/          gpu          needs a CUDA device; skipped without one

A unit test parametrized over backends gets the ``triton`` marker too on its Triton cases, so
``-m "unit and not triton"`` is the fastest loop. The README's test command (what CI runs)
runs every tier. Shared helpers live in ``tests/helpers/``; no test imports another test file.

Triton must see TRITON_INTERPRET before it is first imported, so it is set here, at
collection time, whenever no GPU is present. Under pytest-xdist each worker uses one torch
thread: two workers on two cores would otherwise oversubscribe them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402

TIERS = ("unit", "triton", "integration", "gpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: fast engine tests (tests/unit)")
    config.addinivalue_line("markers", "triton: the Triton kernels under the interpreter (tests/triton, and the "
                                       "Triton cases of tests parametrized over backends)")
    config.addinivalue_line("markers", "integration: fine-tuning runs, distributed, resume, builds, compile "
                                       "(tests/integration)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (tests/gpu)")


def pytest_runtest_logreport(report):
    """Print each failure with its error the moment it happens. Under pytest-xdist the failure
    summary comes only at the end, so a GPU run cut off at its time limit would name none."""
    if report.failed and os.environ.get("PEFTKERN_INSTAFAIL") == "1":
        print(f"\nFAIL ({report.when}) {report.nodeid}\n{str(report.longrepr)[-1500:]}", flush=True)


def _tier(item) -> str:
    parts = item.path.parts
    if "tests" in parts:
        below = parts[parts.index("tests") + 1:]
        if below and below[0] in TIERS:
            return below[0]
    return "integration"  # the benchmark suites' smoke tests (benchmarks/test_*.py)


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        tier = _tier(item)
        item.add_marker(getattr(pytest.mark, tier))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if tier == "unit" and "triton" in [v for v in params.values() if isinstance(v, str)]:
            item.add_marker(pytest.mark.triton)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
