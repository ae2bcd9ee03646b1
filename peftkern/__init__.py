"""peftkern: a kernel-optimised adapter engine (LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA, DoRA).

    import peftkern
    model = peftkern.patch(model, method="pg_pos")

The engine is this package's top level (api, patching, layer, factors, targets, methods,
hypernets, ops, the file formats, health); ``peftkern.app`` is the fine-tuning application
built on it (the ``peftkern`` command line, GLUE and SFT training, checkpoints, distributed
runs).

The public names below are imported on first use: ``import peftkern`` alone costs nothing,
so that ``peftkern --help`` does not wait for torch and transformers.
"""
import logging
import sys
import types

from .version import __version__


class _OptionalHubKernel(logging.Filter):
    """bitsandbytes (imported by transformers and PEFT whenever it is installed) tries, at import, to
    fetch an optional CPU 4-bit GEMM kernel from the Hugging Face hub and logs a warning when it
    cannot (offline, or an untrusted publisher). Its own CPU kernel runs instead, and nothing here
    depends on the hub one: the warning is noise for our users, so it is dropped (and only it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalHubKernel())

# public name -> module that defines it (relative to this package)
_PUBLIC = {
    **{name: ".api" for name in (
        "Counts", "Explanation", "count", "explain", "load", "load_peft", "merge", "methods",
        "orthogonal_regularization", "parameter_table", "patch", "rank_pattern", "save", "unmerge", "unpatch")},
    "disable_adapter": ".reference", "reference_model": ".reference",
    "NonFiniteError": ".health", "check_finite": ".health",
    "export_peft": ".peft_format",
    "AdaptedLinear": ".layer",
    "AllocatorCallback": ".app.callbacks",  # imports transformers' Trainer stack (~2 s)
}

__all__ = [
    "patch", "unpatch", "merge", "unmerge", "disable_adapter", "reference_model", "methods", "explain", "count",
    "parameter_table",
    "AdaptedLinear", "Counts", "Explanation", "__version__",
    "save", "load", "export_peft", "load_peft",
    "orthogonal_regularization", "rank_pattern", "AllocatorCallback", "check_finite", "NonFiniteError",
]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'peftkern' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``peftkern.methods`` is the public function, and also the name of the subpackage that registers
    the methods. Importing a subpackage sets it as an attribute of its parent; here the function
    keeps the name (as it did when this file imported everything eagerly), and the subpackage is
    reached by its import path (``from peftkern.methods import registry``)."""

    def __setattr__(self, name, value):
        if name == "methods" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
