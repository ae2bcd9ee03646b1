"""Shared test set-up. Triton must see TRITON_INTERPRET before it is first imported,
so it is set here, at collection time, whenever no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.models import tiny_model  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end tests (still run in CI)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_runtest_logreport(report):
    """Print each failure with its error the moment it happens. Under pytest-xdist the failure
    summary comes only at the end, so a GPU run cut off at its time limit would name none."""
    if report.failed and os.environ.get("PEFTKERN_INSTAFAIL") == "1":
        print(f"\nFAIL ({report.when}) {report.nodeid}\n{str(report.longrepr)[-1500:]}", flush=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
