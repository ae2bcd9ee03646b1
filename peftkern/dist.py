"""What the engine asks of torch.distributed: whether a run is distributed, which process writes files, and
whether a tensor is an FSDP2 shard. Some things must not happen there (casts batched outside DDP's gradient hooks, a dtype put
back under them) and some cannot run on shards (AdaLoRA's allocator, a restore into them)."""
from __future__ import annotations

import torch


def initialized() -> bool:
    """Whether this process is part of a torch.distributed run (DDP, FSDP2, any process group)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of a distributed run, or a process that is not part of one: the one that writes files."""
    return not initialized() or torch.distributed.get_rank() == 0


def world_size() -> int:
    """The number of processes of a distributed run, 1 outside one."""
    return torch.distributed.get_world_size() if initialized() else 1


def is_shard(t: torch.Tensor) -> bool:
    """Whether ``t`` is an FSDP2 shard (a DTensor), whole only inside its module's forward."""
    return type(t).__name__ == "DTensor"


__all__ = ["initialized", "is_main_process", "world_size", "is_shard"]
