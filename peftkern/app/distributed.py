"""Scale-out helpers: process groups from torchrun/accelerate, rank-0-only output, sharded batches, DDP.

``torchrun`` and ``accelerate launch`` both describe the job in environment variables
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
``init_from_env`` reads them and starts the default process group (gloo for CPU
tensors, nccl for CUDA ones). Without them, or with ``WORLD_SIZE=1``, everything here
is a no-op and a single process runs exactly as before. (accelerate 1.15 on a machine
without GPUs: ``accelerate launch --multi_gpu --num_processes 2`` goes through torchrun
and runs 2 CPU processes; ``--cpu --num_processes 2`` starts one process, as accelerate
runs several CPU processes only through mpirun.)

Data: ``ShardedBatches`` takes the *global* batches of a batch sampler (the same ones a
single process would draw) and gives each rank its share, ``batch[rank::world]``. That is
the index split of ``torch.utils.data.DistributedSampler`` (each rank takes every
world-th example of the shuffled order), applied per global batch, so that

* ``--batch-size`` keeps its meaning (the global batch, as in the papers' tables) and
  the number of optimizer steps does not depend on the number of processes;
* N processes under DDP see exactly the examples one process sees at every step, and
  ``share_weight`` rescales a rank's loss when a final, short batch splits unevenly, so
  that DDP's gradient average is the global batch mean;
* the order is resumable: it is the wrapped sampler's, whose generator state at the
  start of the epoch is recorded (``epoch_state``) and can be restored with a number of
  batches to skip (``resume_epoch``).

DDP: ``wrap_ddp`` turns on ``static_graph`` when activation checkpointing is enabled.
Reentrant checkpointing runs each block's backward as a separate graph; a factor shared
by several blocks (Tied-LoRA's tied A and B, a PG hypernetwork) then becomes ready once
per block, which DDP accepts only with a static graph. (Non-reentrant checkpointing,
transformers' default, needs nothing; the static graph is harmless for it.)
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Any, Deque, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("peftkern")

# torch.distributed backend per device type of the tensors being reduced
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job. ``world_size == 1``: a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # this module initialised the process group (and shuts it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun or "
                         "accelerate launch)") from None


def context() -> Context:
    """The job described by the environment (and the running process group, if any)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK") or 0)
    world = _env_int("WORLD_SIZE") or 1
    return Context(_env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0)


def init_from_env(device_type: str = "cpu") -> Context:
    """Start the default process group from torchrun/accelerate variables, once; validates first.

    Returns a single-process ``Context`` when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return context()
    ctx = context()
    if not ctx.enabled:
        return ctx
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={ctx.world_size} but {', '.join(missing)} not set: launch with torchrun "
                         "--nproc_per_node N or accelerate launch, which set all of "
                         f"{', '.join(ENV_KEYS)}")
    if not 0 <= ctx.rank < ctx.world_size:
        raise ValueError(f"RANK={ctx.rank} is outside 0..{ctx.world_size - 1} (WORLD_SIZE={ctx.world_size})")
    if device_type not in BACKENDS:
        raise ValueError(f"no torch.distributed backend for {device_type!r} tensors; valid: {', '.join(BACKENDS)}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; it cannot run under torchrun")
    backend = BACKENDS[device_type]
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size)
    log.info("peftkern: process group started (%s, rank %d of %d)", backend, ctx.rank, ctx.world_size)
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, started_here=True)


def shutdown(ctx: Context) -> None:
    """Destroy the process group if ``init_from_env`` started it."""
    if ctx.started_here and dist.is_initialized():
        dist.destroy_process_group()


def quiet_unless_main(ctx: Context) -> None:
    """Rank-0-only output: other ranks log errors only (their warnings would repeat rank 0's)."""
    if not ctx.is_main:
        logging.getLogger("peftkern").setLevel(logging.ERROR)


# --- collectives (each a no-op in a single process) -------------------------------------------------


def mean_across(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of ``t`` over ranks (a copy)."""
    if not ctx.enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def all_true(flag: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Logical AND of a bool scalar over ranks, so that every rank takes the same decision."""
    if not ctx.enabled:
        return flag
    out = flag.detach().to(torch.int32).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.bool()


def gather_objects(obj: Any, ctx: Context) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


# --- data -----------------------------------------------------------------------------------------


def shard(items: Sequence[int], rank: int, world: int) -> List[int]:
    """This rank's share of one global batch: every ``world``-th item from ``rank``."""
    return list(items[rank::world])


class ShardedBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch of ``batches``, resumable mid-epoch (module docstring).

    ``generator`` is the generator that ``batches`` draws its order from. Its state when an
    epoch's iteration starts is kept in ``epoch_state``; ``resume_epoch(state, skip)``
    makes the next iteration start from that state and skip the first ``skip`` batches, so
    the rest of the epoch is exactly the rest of the interrupted one.
    """

    def __init__(self, batches: Any, generator: torch.Generator, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        self.batches, self.generator, self.rank, self.world = batches, generator, rank, world
        self.epoch_state: Optional[torch.Tensor] = None
        self._resume: Optional[Tuple[torch.Tensor, int]] = None
        self._weights: Deque[float] = collections.deque()

    def resume_epoch(self, state: torch.Tensor, skip: int) -> None:
        if skip < 0 or skip > len(self):
            raise ValueError(f"cannot skip {skip} batches of an epoch of {len(self)}")
        self._resume = (state, skip)

    def __iter__(self) -> Iterator[List[int]]:
        # Restored here, in the body, and not in resume_epoch: the DataLoader draws its own seed
        # from the generator when it creates the iterator, before the first batch is asked for,
        # so this is the point that an uninterrupted run and a resumed one reach in the same state.
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            self.generator.set_state(state)
        self.epoch_state = self.generator.get_state()
        self._weights.clear()
        for i, batch in enumerate(self.batches):
            if i < skip:
                continue
            batch = list(batch)
            share = shard(batch, self.rank, self.world)
            weight = len(share) * self.world / len(batch)
            if not share:  # a final batch with fewer examples than ranks: DDP still needs every rank
                share, weight = batch[:1], 0.0
            self._weights.append(weight)
            yield share

    def share_weight(self) -> float:
        """Loss weight of the batch the loop just received: 1.0 unless a batch split unevenly.

        DDP averages gradients over ranks; with weights n_rank·world/n_global the average is
        the gradient of the global batch mean. Batches are consumed in order (one per call).
        """
        return self._weights.popleft() if self._weights else 1.0

    def __len__(self) -> int:
        return len(self.batches)


# --- models ---------------------------------------------------------------------------------------


def wrap_ddp(model: nn.Module, ctx: Context, **ddp_kwargs: Any) -> nn.Module:
    """``model`` under DistributedDataParallel, or unchanged in a single process.

    ``static_graph`` defaults to True when activation checkpointing is on (module docstring).
    """
    if not ctx.enabled:
        return model
    if "static_graph" not in ddp_kwargs and getattr(model, "is_gradient_checkpointing", False):
        ddp_kwargs["static_graph"] = True
        log.info("peftkern: DDP with static_graph=True: activation checkpointing re-runs blocks whose "
                 "adapter factors may be shared across blocks")
    device_ids = None
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        device_ids = [param.device.index]
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


__all__ = ["Context", "context", "init_from_env", "shutdown", "quiet_unless_main", "mean_across", "all_true",
           "gather_objects", "barrier", "shard", "ShardedBatches", "wrap_ddp", "BACKENDS"]
