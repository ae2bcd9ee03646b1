"""The modules trained in full next to the adapter (PEFT's ``modules_to_save``), and their originals.

A task head (a classifier, or an LM head and the input embeddings it is tied to) is trained
in place. The base model must stay reachable anyway: ``disable_adapter`` runs the base model
(PEFT's reference pass for DPO), and ``unpatch`` without merging puts the base model back
exactly. So patching keeps a frozen copy of each such module, as PEFT's
``ModulesToSaveWrapper`` keeps ``original_module``. That costs one copy of their weights for
as long as the model is patched (for an LM head tied to the embeddings: vocab × hidden
values once, as the pair is copied together and stays tied); a model with no
``modules_to_save`` pays nothing.

The copies hold their tensors as non-persistent buffers: they follow ``model.to()``, are
never trained, counted or saved. So a model patched on the meta device and materialised with
``to_empty`` (FSDP2's and distributed checkpointing's flows) has copies of uninitialised memory
that nothing can fill: using them (``disable_adapter``, ``unpatch`` without merging) raises,
naming the ways out, instead of running garbage.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .factors import state_of


def _frozen(module: nn.Module, shared: Dict[int, torch.Tensor]) -> None:
    """Turn every parameter of ``module`` (recursively) into a non-persistent buffer, keeping tensors
    that were one Parameter (tied weights) one tensor."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            t = shared.setdefault(id(p), p.detach().requires_grad_(False))
            del sub._parameters[name]
            sub.register_buffer(name, t, persistent=False)


class HeadOriginals(nn.Module):
    """Frozen copies of ``modules_to_save``, taken before training changes them (module docstring)."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        super().__init__()
        self.paths: List[str] = _with_tied_partners(model, paths)
        modules = [model.get_submodule(p) for p in self.paths]
        copies = copy.deepcopy(modules)  # one deepcopy: weights tied between them stay tied in the copies
        shared: Dict[int, torch.Tensor] = {}
        for c in copies:
            _frozen(c, shared)
        self.copies = nn.ModuleList(copies)

    lost = False  # set when to_empty gave the copies memory but no values (module docstring)

    def numel(self) -> int:
        """Values held by the copies, each tensor once (tied weights are one): what PEFT's
        ``print_trainable_parameters`` counts as the ``original_module`` of each module to save."""
        return sum(t.numel() for t in {id(b): b for b in self.buffers()}.values())

    def _apply(self, fn, recurse=True):
        was_meta = any(b.is_meta for b in self.buffers())
        out = super()._apply(fn, recurse)
        if was_meta and not any(b.is_meta for b in self.buffers()):  # only to_empty leaves meta this way
            self.lost = True
        return out

    def check(self, what: str, model: Optional[nn.Module] = None) -> None:
        """Raise ValueError where the originals cannot stand in for the trained modules: lost (module
        docstring), or (given ``model``) of another shape than them, as after ``resize_token_embeddings``."""
        if model is not None:
            for path, original in zip(self.paths, self.copies):
                live = model.get_submodule(path)
                now = {n: tuple(t.shape) for n, t in [*live.named_parameters(), *live.named_buffers()]}
                then = {n: tuple(t.shape) for n, t in original.named_buffers()}
                if now != then:
                    raise ValueError(
                        f"{what} needs the original of {path}, which no longer fits it: {path} is now {now}, its "
                        f"original {then} (resize_token_embeddings after patching?). Resize before patching, or use "
                        "peftkern.unpatch(model, merge=True), which keeps the trained modules")
        if self.lost:
            raise ValueError(
                f"{what} needs the original values of modules_to_save ({', '.join(self.paths)}), which were lost: "
                "the model was patched on the meta device and materialised with to_empty, and those frozen copies "
                "are not part of the model's state_dict. Patch the model after its base weights are loaded, or "
                "use peftkern.unpatch(model, merge=True), which keeps the trained modules")

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block, the model runs the original modules; the trained ones come back on exit.
        Raises ValueError where the originals were lost (module docstring)."""
        self.check("running the base model (disable_adapter, reference_model)", model)
        trained = [_swap(model, path, original) for path, original in zip(self.paths, self.copies)]
        try:
            yield
        finally:
            for path, module in zip(self.paths, trained):
                _swap(model, path, module)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Copy the original values back into the trained modules (their tensors stay the same objects).
        Raises ValueError where the originals were lost (module docstring)."""
        self.check("unpatch without merge", model)
        for path, original in zip(self.paths, self.copies):
            module = model.get_submodule(path)
            live = {**dict(module.named_parameters(remove_duplicate=False)),
                    **dict(module.named_buffers(remove_duplicate=False))}
            for name, value in original.named_buffers(remove_duplicate=False):  # parameters and buffers alike
                live[name].copy_(value)


def trained_outside_adapter(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every trainable parameter that the adapter state does not own (the task head), by model name.

    Found by identity against the state's parameters and by ``requires_grad``, never by name.
    A parameter shared by two modules (tied weights) appears once, under its first name.
    """
    own = {id(p) for p in state_of(model).parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and id(p) not in own}


def trained_modules(model: nn.Module) -> List[str]:
    """Paths of every module holding a parameter of ``trained_outside_adapter``, both halves of a tied
    pair included: an LM head tied to the input embeddings holds the same trained tensor, and a
    loader that restores only one of them (PEFT restores exactly the listed modules) would leave the
    other at its base values (huggingface/peft#1457, #2898).

    Raises ValueError when one of them is an adapted module's base layer (or inside one): no adapter
    file can hold it, and a loader would fail on it (PEFT with a bare KeyError)."""
    state = state_of(model)
    own = {id(p) for p in state.parameters()}
    trained = {id(p) for p in model.parameters() if p.requires_grad and id(p) not in own}
    paths = sorted({path for path, m in model.named_modules(remove_duplicate=False)
                    if any(id(p) in trained for p in m._parameters.values() if p is not None)})
    adapted = sorted({s.path for s in state.plan.slots if any(p == s.path or p.startswith(f"{s.path}.") for p in paths)})
    if adapted:  # the base layer of an adapted module, made trainable after patch (patch refuses both at once)
        raise ValueError(
            f"{', '.join(adapted[:3])}{' …' if len(adapted) > 3 else ''}: adapted, and its base weight is trainable "
            "(requires_grad=True); an adapter file holds a module adapted or trained in full, not both (so does "
            "PEFT's). Freeze it (`requires_grad_(False)`) before saving, or merge and save the whole model "
            "(`peftkern.unpatch(model, merge=True)`, then `save_pretrained`); to train a module in full, name it in "
            "`modules_to_save` at patch instead of adapting it.")
    return paths



def tied_partners(model: nn.Module, paths: Sequence[str]) -> List[str]:
    """The modules outside ``paths`` (and outside the modules they name) holding a parameter of one of them:
    the input embeddings of an LM head tied to them, and the other way round."""
    params = {id(p) for path in paths for p in model.get_submodule(path).parameters()}
    return [path for path, m in model.named_modules(remove_duplicate=False)
            if not any(path == p or path.startswith(f"{p}.") for p in paths)
            and any(id(p) in params for p in m._parameters.values() if p is not None)]


def _with_tied_partners(model: nn.Module, paths: Sequence[str]) -> List[str]:
    """``paths`` and every module holding one of their parameters (an LM head tied to the embeddings)."""
    partners = tied_partners(model, paths)
    out: List[str] = []
    for path in [*paths, *partners]:  # a module inside one already listed is swapped with it
        if path not in out and not any(path.startswith(f"{other}.") for other in [*paths, *partners] if other != path):
            out.append(path)
    return out


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    before = getattr(parent, child)
    setattr(parent, child, module)
    return before


__all__ = ["HeadOriginals", "tied_partners", "trained_outside_adapter", "trained_modules"]
