"""Checkpoint and resume for ``peftkern finetune``: a run killed at hour 5 continues where it stopped.

A checkpoint is a directory ``<output_dir>/checkpoints/step-<N>/`` (N: optimizer steps done):

* ``state.safetensors``: the adapter state's full ``state_dict`` (``state.*``; unlike the
  saved adapter, AdaLoRA's pruned components are kept: they still carry optimizer
  state), the trained head (``head.*``) and every allocator buffer (``allocator.*``, the
  EMA importance scores included);
* ``trainer_state.pt``: optimizer and scheduler state, the data order (the sampler's
  generator state at the start of the epoch) and the RNG states (python, numpy, torch,
  CUDA) of every rank; read back with ``torch.load(weights_only=True)``;
* ``manifest.json``: step, epoch, batches done in the epoch, the loop's record (history,
  per-step losses, best dev metric), the allocator's step counters, the run config, the
  world size and the SHA-256 of both files.

Writes are atomic at the directory level: everything goes to a temporary directory next
to the checkpoints, each file fsynced, and one ``os.rename`` publishes it. A run killed
mid-save leaves a ``.tmp-*`` directory, which resume ignores and the next save removes,
and the previous checkpoint untouched; it is deleted only once the new one is in place.

Resume is exact: the same seed rebuilds the model and adapter, and then every tensor and
counter above is restored, after checking that the checkpoint fits (same config, same
world size, same tensor names and shapes) and before changing anything. The sampler
regenerates the interrupted epoch's order and skips the batches already trained, and
the RNG states are restored after the epoch's data iterator is created, the point an
uninterrupted run was at when it drew them (see ``distributed.ShardedBatches``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..factors import state_of
from ..files import fsync_dir
from ..heads import trained_outside_adapter
from ..methods.allocator import ScheduledAllocator
from . import distributed

log = logging.getLogger("peftkern")

FOLDER = "checkpoints"
# Tensor-name prefixes in a checkpoint's safetensors file: the adapter state, the parameters
# trained outside it (the head), and the rank allocator's buffers.
STATE, HEAD, ALLOCATOR = "state.", "head.", "allocator."
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
TENSORS, TRAINER, MANIFEST = "state.safetensors", "trainer_state.pt", "manifest.json"
FORMAT = "peftkern-checkpoint"
KEEP = 1  # complete checkpoints kept (older ones are deleted once a newer one is in place)
# RunConfig fields that may differ between the interrupted run and its resumption
MAY_CHANGE = ("progress", "resume", "save_every", "output_dir")


@dataclass
class RunState:
    """The training loop's own record: what a checkpoint restores besides tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch being run (1-based)
    step_in_epoch: int = 0  # batches of that epoch already trained
    history: List[Dict[str, float]] = field(default_factory=list)
    step_losses: List[torch.Tensor] = field(default_factory=list)  # finished epochs
    epoch_losses: List[torch.Tensor] = field(default_factory=list)  # the running epoch (this rank's)
    best_dev: float = -math.inf

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_losses = []


# --- RNG --------------------------------------------------------------------------------------------


def rng_state() -> Dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states (torch.load(weights_only) safe)."""
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        st = np.random.get_state(legacy=False)
        state["numpy"] = {"key": torch.from_numpy(st["state"]["key"].astype("int64")), "pos": int(st["state"]["pos"]),
                          "has_gauss": int(st["has_gauss"]), "gauss": float(st["gauss"])}
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        st = state["numpy"]
        np.random.set_state({"bit_generator": "MT19937", "state": {"key": st["key"].numpy().astype(np.uint32),
                                                                   "pos": st["pos"]},
                             "has_gauss": st["has_gauss"], "gauss": st["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


# --- what a checkpoint holds ----------------------------------------------------------------------------


def _allocator(model: nn.Module) -> Optional[ScheduledAllocator]:
    return state_of(model).rank_allocator()


def _tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {STATE + k: v for k, v in state_of(model).state_dict().items()}
    out.update({HEAD + k: v for k, v in trained_outside_adapter(model).items()})
    allocator = _allocator(model)
    if allocator is not None:
        out.update({ALLOCATOR + k: v for k, v in allocator.checkpoint()["buffers"].items()})
    return out


def _strip(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The tensors stored under ``prefix``, by their names without it."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_same_settings(want: Dict[str, Any], have: Dict[str, Any], where: Any) -> None:
    """ValueError naming the first settings in which checkpoint ``where`` (``have``) and this run (``want``)
    differ: a resume under other settings would train one run and report another."""
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {have.get(k)!r}, this run {want.get(k)!r}" for k in diff[:4])
        raise ValueError(f"checkpoint {where} was written by a different run ({shown}); resume with the same "
                         "settings, or use another --output-dir")


def _config_dict(config: Any) -> Dict[str, Any]:
    """The run config as JSON values, minus what may change between a run and its resumption."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in MAY_CHANGE}, default=str))


# --- writing --------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> str:
    """Write and fsync one file; returns its SHA-256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


class Checkpointer:
    """Saves a checkpoint every ``every`` optimizer steps. ``save`` is collective under DDP: every rank
    calls it (losses and RNG states are gathered), and rank 0 alone writes."""

    def __init__(self, out_dir: Path, config: Any, model: nn.Module, optimizer, scheduler,
                 sampler: distributed.ShardedBatches, ctx: distributed.Context, every: Optional[int],
                 before_save: Optional[Callable[[], None]] = None):
        self.folder = Path(out_dir) / FOLDER
        self.config, self.model, self.optimizer, self.scheduler = config, model, optimizer, scheduler
        self.sampler, self.ctx, self.every, self.before_save = sampler, ctx, every, before_save

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, run: RunState) -> Optional[Path]:
        if self.before_save is not None:  # the finite check: never checkpoint NaN over a good state
            self.before_save()
        partial = run.epoch_losses
        if partial and self.ctx.enabled:
            partial = list(distributed.mean_across(torch.stack(partial), self.ctx).unbind(0))
        rngs = distributed.gather_objects(rng_state(), self.ctx)
        if not self.ctx.is_main:
            return None
        return self._write(run, partial, rngs)

    def _write(self, run: RunState, partial: List[torch.Tensor], rngs: List[Dict[str, Any]]) -> Path:
        from safetensors.torch import save as st_save

        self.folder.mkdir(parents=True, exist_ok=True)
        remove_incomplete(self.folder)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in _tensors(self.model).items()}
        buffer = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "data_order": self.sampler.epoch_state, "rng": rngs}, buffer)
        allocator = _allocator(self.model)
        final = self.folder / f"step-{run.step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=self.folder))
        try:
            digests = {TENSORS: _write(tmp / TENSORS, st_save(tensors)), TRAINER: _write(tmp / TRAINER, buffer.getvalue())}
            manifest = {
                "format": FORMAT, "step": run.step, "epoch": run.epoch, "step_in_epoch": run.step_in_epoch,
                "world_size": self.ctx.world_size, "config": _config_dict(self.config),
                "history": run.history, "step_losses": [float(t) for t in run.step_losses],
                "epoch_losses": [float(t) for t in partial], "best_dev": run.best_dev,
                "allocator": None if allocator is None else {"global_step": allocator.global_step,
                                                            "total_step": allocator.schedule.total_step},
                "sha256": digests,
            }
            _write(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            fsync_dir(tmp)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed process cannot get here: resume ignores .tmp-*
            raise
        fsync_dir(self.folder)
        for old in complete(self.folder)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("peftkern: checkpoint %s", final)
        return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name (replacing one of the same step)."""
    if final.exists():
        aside = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)


def complete(folder: Path) -> List[Path]:
    """Published checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_incomplete(folder: Path) -> None:
    """Remove what interrupted saves left behind (never a published checkpoint)."""
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def latest(out_dir: Path) -> Optional[Path]:
    found = complete(Path(out_dir) / FOLDER)
    return found[-1] if found else None


# --- reading and restoring ----------------------------------------------------------------------------


@dataclass
class Loaded:
    path: Path
    manifest: Dict[str, Any]
    tensors: Dict[str, torch.Tensor]
    trainer: Dict[str, Any]


def read(path: Path) -> Loaded:
    """Read and verify a checkpoint directory; ValueError names the damaged file."""
    from safetensors.torch import load as st_load

    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(path)!r} has no {MANIFEST}; it is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(manifest_path)!r} is not valid JSON ({exc}): the checkpoint is corrupt") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{str(manifest_path)!r} is not a peftkern checkpoint manifest")
    payloads = {}
    for name in (TENSORS, TRAINER):
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {str(path)!r} lacks {name}; it is incomplete")
        payloads[name] = file.read_bytes()
        if hashlib.sha256(payloads[name]).hexdigest() != manifest.get("sha256", {}).get(name):
            raise ValueError(f"{str(file)!r} does not match its checksum in {MANIFEST}: the file is truncated or "
                             "corrupt; delete this checkpoint directory to resume from an earlier one, if any")
    try:
        tensors = st_load(payloads[TENSORS])
    except Exception as exc:  # safetensors has its own error types for each kind of damage
        raise ValueError(f"{str(path / TENSORS)!r} is not a readable safetensors file: {exc}") from exc
    try:
        trainer = torch.load(io.BytesIO(payloads[TRAINER]), weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path / TRAINER)!r} cannot be read: {exc}") from exc
    return Loaded(path, manifest, tensors, trainer)


def restore(loaded: Loaded, config: Any, model: nn.Module, optimizer, scheduler,
            sampler: distributed.ShardedBatches, ctx: distributed.Context) -> Tuple[RunState, Dict[str, Any]]:
    """Put the checkpoint into a freshly built run; returns the loop's state and this rank's RNG state
    (to be set with ``set_rng_state`` once the resumed epoch's data iterator exists).

    Everything is checked before anything is changed; ValueError names the first misfit."""
    m, where = loaded.manifest, str(loaded.path)
    check_same_settings(_config_dict(config), m.get("config", {}), where)
    if m.get("world_size") != ctx.world_size:
        raise ValueError(f"checkpoint {where} was written by {m.get('world_size')} process(es); resume with the "
                         f"same number (this run has {ctx.world_size})")
    own = _tensors(model)
    missing, unexpected = sorted(set(own) - set(loaded.tensors)), sorted(set(loaded.tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {where} does not fit this model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    for k, t in sorted(loaded.tensors.items()):  # sorted: the same first misfit whatever the file's order
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(t.shape)}, this model needs {tuple(own[k].shape)}")
    _check_optimizer(loaded.trainer["optimizer"], optimizer, where)
    rngs = loaded.trainer["rng"]
    # --- checked: now change things ---
    state = state_of(model)
    state.load_state_dict(_strip(loaded.tensors, STATE), strict=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in _strip(loaded.tensors, HEAD).items():
            params[k].copy_(v)
    allocator = _allocator(model)
    if allocator is not None:
        counters = m["allocator"]
        allocator.restore({"global_step": counters["global_step"], "total_step": counters["total_step"],
                           "buffers": _strip(loaded.tensors, ALLOCATOR)})
    optimizer.load_state_dict(loaded.trainer["optimizer"])
    scheduler.load_state_dict(loaded.trainer["scheduler"])
    sampler.resume_epoch(loaded.trainer["data_order"], m["step_in_epoch"])
    as_tensor = lambda values: [torch.tensor(v, dtype=torch.float32) for v in values]  # noqa: E731
    run = RunState(step=m["step"], epoch=m["epoch"], step_in_epoch=m["step_in_epoch"], history=m["history"],
                   step_losses=as_tensor(m["step_losses"]), epoch_losses=as_tensor(m["epoch_losses"]),
                   best_dev=m["best_dev"])
    log.warning("peftkern: resumed from %s (step %d, epoch %d)", where, run.step, run.epoch)
    return run, rngs[ctx.rank]


def resume_latest(out_dir: Path, config: Any, model: nn.Module, optimizer, scheduler,
                  sampler: distributed.ShardedBatches,
                  ctx: distributed.Context) -> Tuple[RunState, Optional[Dict[str, Any]]]:
    """``restore`` the last checkpoint in ``out_dir``; with none there, say so and start at step 0
    (so that a job relaunched with --resume after every preemption also starts the first time)."""
    found = latest(out_dir)
    if found is None:
        log.warning("peftkern: resume: no checkpoint in %s yet; starting at step 0", Path(out_dir) / FOLDER)
        return RunState(), None
    return restore(read(found), config, model, optimizer, scheduler, sampler, ctx)


def _check_optimizer(saved: Dict[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    groups = saved.get("param_groups", [])
    ours = optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        raise ValueError(f"checkpoint {where}: its optimizer has parameter groups of sizes "
                         f"{[len(g['params']) for g in groups]}, this run's has {[len(g['params']) for g in ours]}")
    params = [p for g in ours for p in g["params"]]
    for index, entry in saved.get("state", {}).items():
        for name, t in entry.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[int(index)].shape):
                raise ValueError(f"checkpoint {where}: optimizer state {name!r} of parameter {index} has shape "
                                 f"{tuple(t.shape)}, the parameter has {tuple(params[int(index)].shape)}")


__all__ = ["RunState", "Checkpointer", "Loaded", "read", "restore", "resume_latest", "latest", "complete", "remove_incomplete",
           "rng_state", "set_rng_state", "check_same_settings", "FOLDER"]
