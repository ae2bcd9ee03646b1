"""benchmarks/bench_launches.py: the launches a training step asks of the device, counted on
the meta device at the GPU step's shape, and the host-time table. The counts are exact and
deterministic (no timing): on CUDA each counted op is at least one kernel launch, so fewer
launches than PEFT for the same method is a property the GPU path keeps."""
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)

import bench_launches  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the host-time part pins torch to one thread: give them back
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("ours,theirs", [("pk_lora_qv", "peft_lora_qv"), ("pk_lora_all", "peft_lora_all"),
                                         ("pk_vera_qv", "peft_vera_qv"), ("pk_dora_qv", "peft_dora_qv"),
                                         ("pk_dora_all", "peft_dora_all")])
def test_a_step_launches_fewer_kernels_than_peft(ours, theirs):
    mine, peft = bench_launches.count(ours, layers=2), bench_launches.count(theirs, layers=2)
    assert mine["counted_on"] == peft["counted_on"] == "meta"  # no host read of a device value either
    assert mine["trainable"] == peft["trainable"]  # the same work
    assert mine["launches"] < peft["launches"], (mine, peft)


def test_the_counter_skips_views_and_allocations():
    with bench_launches.CountLaunches() as c:
        x = torch.empty(4, 8, device="meta")
        y = x.reshape(32).view(4, 8).t()  # views: nothing launched
        z = torch.mm(x, y).add_(1.0)
        w = y.reshape(32)  # a transposed tensor's reshape copies: one launch
    assert dict(c.ops) == {"mm": 1, "add_": 1, "clone": 1} and z.shape == (4, 4) and w.shape == (32,)


def test_quick_run_writes_its_table(tmp_path):
    assert bench_launches.main(["--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "launches_quick.md").read_text()
    assert "| pk_lora_qv |" in md and "| peft_lora_qv |" in md and "Not GPU figures" in md
