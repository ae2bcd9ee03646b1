"""Writing files safely: atomic replacement, fsync, safetensors bytes, JSON of config values.

Shared by the native adapter files (native_format.py), the PEFT export (peft_format.py) and the
application's checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

log = logging.getLogger("peftkern")


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere reading it means setting it for a
    moment (os.umask), which another thread creating a file at that instant could see."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a mix.

    The file gets the mode ``open()`` would give it (0666 less the umask), as torch.save and
    safetensors do: the temporary file mkstemp makes is private (0600), which would leave an
    adapter unreadable by a server running as another user."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:  # makes the rename itself durable; not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safetensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save as st_save

    # own contiguous CPU copies: safetensors refuses tensors that share memory (tied views)
    return st_save({k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()},
                   metadata={"format": "pt", **(metadata or {})})


def read_json_object(path: Path) -> Dict[str, Any]:
    """A JSON file holding an object; ValueError saying the file is corrupt otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return value


def json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


__all__ = ["atomic_write", "fsync_dir", "safetensors_bytes", "read_json_object", "json_default"]


def remove_stale(directory: Path, names: Sequence[str], written: str) -> None:
    """Delete the files ``names`` in ``directory`` left by an earlier save of the other format: beside
    the adapter just ``written`` they would be a second, older adapter, which that format's loader
    (PEFT, or peftkern.load) would read without a word. Says which it removed."""
    stale = [n for n in names if (Path(directory) / n).is_file()]
    for n in stale:
        (Path(directory) / n).unlink()
    if stale:
        fsync_dir(Path(directory))
        log.warning("peftkern: removed %s from %s: an earlier save's files, older than the %s just written",
                    ", ".join(stale), directory, written)
