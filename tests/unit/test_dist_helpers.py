"""peftkern.distributed without processes: environment validation, sharding, resumable order, no-op collectives."""
import logging

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler

from peftkern import health
from peftkern.app import distributed

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_without_launcher_everything_is_a_single_process(env):
    ctx = distributed.init_from_env()
    assert ctx == distributed.Context() and not ctx.enabled and ctx.is_main
    t = torch.tensor([1.0, 3.0])
    assert distributed.mean_across(t, ctx) is t and distributed.gather_objects("x", ctx) == ["x"]
    assert distributed.all_true(torch.tensor(False), ctx).item() is False
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, ctx) is model and health.unwrap(model) is model
    distributed.barrier(ctx)
    distributed.shutdown(ctx)


@pytest.mark.parametrize("values,message", [
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer"),
])
def test_bad_launcher_environment_is_named(env, values, message):
    for k, v in values.items():
        env.setenv(k, v)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        distributed.init_from_env()


def test_unknown_device_type_is_named(env):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        env.setenv(k, v)
    with pytest.raises(ValueError, match="no torch.distributed backend for 'xpu' tensors; valid: cpu, cuda"):
        distributed.init_from_env("xpu")


def test_quiet_unless_main(env):
    logger = logging.getLogger("peftkern")
    level = logger.level
    try:
        distributed.quiet_unless_main(distributed.Context(rank=1, world_size=2))
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(level)


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (9, 4, 2), (13, 6, 3), (5, 4, 4)])
def test_shards_partition_each_global_batch_like_a_distributed_sampler(n, batch, world):
    def batches(seed):
        return BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(seed)), batch, False)

    ranks = [list(distributed.ShardedBatches(batches(0), torch.Generator(), r, world)) for r in range(world)]
    for step, global_batch in enumerate(batches(0)):
        shares = [ranks[r][step] for r in range(world)]
        if len(global_batch) >= world:
            assert sorted(i for s in shares for i in s) == sorted(global_batch)
        for r, share in enumerate(shares):
            if len(global_batch) % world == 0:  # DistributedSampler's split (no padding needed)
                assert share == [global_batch[i] for i in DistributedSampler(range(len(global_batch)), world, r,
                                                                             shuffle=False)]


@pytest.mark.parametrize("n,batch,world", [(9, 4, 2), (10, 4, 4), (13, 6, 3)])
def test_share_weights_make_the_rank_average_the_global_mean(n, batch, world):
    """Σ_r weight_r·mean(loss over share_r) / world == mean over the global batch, uneven shares included."""
    losses = torch.arange(n, dtype=torch.float64) ** 2
    samplers = [distributed.ShardedBatches(BatchSampler(range(n), batch, False), torch.Generator(), r, world)
                for r in range(world)]
    for step, shares in enumerate(zip(*samplers)):
        weights = [s.share_weight() for s in samplers]
        averaged = sum(w * losses[share].mean() for w, share in zip(weights, shares)) / world
        torch.testing.assert_close(averaged, losses[list(range(n))[step * batch:(step + 1) * batch]].mean())


def test_a_resumed_epoch_continues_the_interrupted_order():
    def sampler():
        g = torch.Generator().manual_seed(7)
        return distributed.ShardedBatches(BatchSampler(RandomSampler(range(20), generator=g), 3, False), g, 1, 2)

    whole = sampler()
    first = list(whole)  # epoch 1
    second = list(whole)  # epoch 2: another order
    assert first != second
    interrupted = sampler()
    list(interrupted)
    it = iter(interrupted)
    done = [next(it), next(it)]
    state = interrupted.epoch_state.clone()
    resumed = sampler()  # a new process: a fresh generator, then the checkpointed state
    resumed.resume_epoch(state, skip=2)
    assert done + list(resumed) == second
    assert list(resumed) != second[2:]  # the next epoch draws on from there, not the same order again


def test_resume_epoch_rejects_impossible_skips():
    s = distributed.ShardedBatches(BatchSampler(range(8), 4, False), torch.Generator())
    with pytest.raises(ValueError, match="cannot skip 3 batches of an epoch of 2"):
        s.resume_epoch(torch.Generator().get_state(), 3)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        distributed.ShardedBatches([], torch.Generator(), 2, 2)
