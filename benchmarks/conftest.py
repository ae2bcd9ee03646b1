"""Benchmark-suite set-up. Triton reads TRITON_INTERPRET when it is first imported, so it is
set here, at collection time, whenever there is no GPU (the Triton kernels then run, slowly,
in the interpreter; the suites pick the cpp backend on the CPU anyway).

``PEFTKERN_BENCH_THREADS=1`` pins torch to one thread: with ``--benchmark-timer
time.process_time`` that times the CPU a step uses, the stable clock on a shared machine."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("PEFTKERN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PEFTKERN_BENCH_THREADS"]))

from common import bench_device, build_base, make_batch, spec_from_env  # noqa: E402


@pytest.fixture(scope="session")
def spec():
    return spec_from_env()


@pytest.fixture(scope="session")
def base(spec):
    return build_base(spec)


@pytest.fixture(scope="session")
def batch(spec):
    return make_batch(spec)


@pytest.fixture(scope="session")
def device():
    return bench_device()

