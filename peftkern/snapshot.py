"""What a writer writes: the adapter state and the trained heads as whole tensors.

Every writer (``save``, ``save_pretrained``, ``export_peft``, the Trainer's checkpoints) reads
the adapter through ``take``. Usually that is the live state itself. Two cases are not:

* **A sharded model** (FSDP2's ``fully_shard``: parameters are DTensors, each rank holding a
  shard). Their full values are gathered, which is a collective: every rank must call the
  writer (``model.save_pretrained(d, is_main_process=rank == 0)``, or ``peftkern.save`` on
  every rank), and then one rank writes. Only the adapter's and the heads' tensors are
  gathered, never the base model's.
* **A gathered state dict handed over** (``save_pretrained(d, state_dict=sd)``, what the
  Trainer does under FSDP or DeepSpeed ZeRO-3 on its main process): the values come from it,
  by their names in the model, and nothing is gathered.

In both cases the snapshot's state is a fresh CPU copy of the adapter state built from the
same plan and loaded with the full values, so that generated factors (PG, HyperAdaLoRA), the
PEFT export and AdaLoRA's pruned save all work on whole tensors; the rank allocator's
counters and scores (never sharded) are copied from the live one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from . import dist, patching
from .factors import STATE_ATTR, AdapterState, state_of
from .heads import trained_modules, trained_outside_adapter

Tensor = torch.Tensor


@dataclass
class Snapshot:
    state: AdapterState  # the live state, or a CPU copy holding the full values
    values: Optional[Dict[str, Tensor]]  # full values by model name (None: read the live model)

    def tensor(self, name: str, live: Tensor) -> Tensor:
        """The full value of the model's tensor ``name`` (``live`` is the model's own)."""
        return live.detach() if self.values is None else self.values[name]

    def heads(self, model: nn.Module) -> Dict[str, Tensor]:
        """The trained parameters outside the adapter, by model name (tied ones once)."""
        return {n: self.tensor(n, t) for n, t in trained_outside_adapter(model).items()}

    def module_tensors(self, model: nn.Module, path: str) -> Dict[str, Tensor]:
        """A trained module's state_dict entries (parameters and buffers), by their local names."""
        module = model.get_submodule(path)
        return {n: self.tensor(f"{path}.{n}", t) for n, t in module.state_dict(keep_vars=True).items()}


def take(model: nn.Module, state_dict: Optional[Mapping[str, Tensor]] = None) -> Snapshot:
    """The snapshot to write (module docstring). With sharded parameters this is a collective."""
    state = state_of(model)
    own = {f"{STATE_ATTR}.{k}": t for k, t in state.state_dict(keep_vars=True).items()}
    heads = {}
    for path in trained_modules(model):
        for n, t in model.get_submodule(path).state_dict(keep_vars=True).items():
            heads[f"{path}.{n}"] = t
    needed = {**own, **heads}
    if state_dict is None and not any(dist.is_shard(t) for t in needed.values()):
        return Snapshot(state, None)
    values: Dict[str, Tensor] = {}
    for name in sorted(needed):  # the same order on every rank: full_tensor() is an all-gather
        t = needed[name]
        if state_dict is not None and name in state_dict:
            values[name] = state_dict[name].detach().to("cpu")
        elif state_dict is not None:
            raise ValueError(f"the state_dict handed to the writer lacks {name!r}: pass the model's full state "
                             "dict (e.g. get_model_state_dict(model, options=StateDictOptions("
                             "full_state_dict=True)))")
        elif dist.is_shard(t):
            values[name] = t.full_tensor().detach().to("cpu")
        else:
            values[name] = t.detach().to("cpu")
    return Snapshot(_copy_of(state, {k[len(STATE_ATTR) + 1:]: values[k] for k in own}), values)


def _copy_of(state: AdapterState, values: Dict[str, Tensor]) -> AdapterState:
    """A fresh CPU state of the same plan holding ``values`` (and the live allocator's state)."""
    plan = dataclasses.replace(state.plan, device=torch.device("cpu"))
    copy = patching.new_state(plan)  # with DoRA's magnitudes where the plan has them
    copy.load_state_dict(values, strict=True)
    allocator = state.rank_allocator()
    if allocator is not None:
        copy.rank_allocator().restore(allocator.checkpoint())
    return copy.train(state.training)


__all__ = ["Snapshot", "take"]
