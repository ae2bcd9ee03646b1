"""peftkern: a kernel-optimised adapter engine (LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA).

    import peftkern
    model = peftkern.patch(model, method="pg_pos")

The engine is this package's top level (api, patching, layer, factors, targets, methods,
hypernets, ops, io, health); ``peftkern.app`` is the fine-tuning application built on it
(the ``peftkern`` command line, GLUE training, checkpoints, distributed runs).
"""
from .api import (Counts, Explanation, count, disable_adapter, explain, load, load_peft, merge, methods,
                  orthogonal_regularization, parameter_table, patch, rank_pattern, save, unmerge, unpatch)
from .health import NonFiniteError, check_finite
from .peft_format import export_peft
from .layer import AdaptedLinear
from .version import __version__

__all__ = [
    "patch", "unpatch", "merge", "unmerge", "disable_adapter", "methods", "explain", "count", "parameter_table",
    "AdaptedLinear", "Counts", "Explanation", "__version__",
    "save", "load", "export_peft", "load_peft",
    "orthogonal_regularization", "rank_pattern", "AllocatorCallback", "check_finite", "NonFiniteError",
]


def __getattr__(name):  # AllocatorCallback imports transformers' Trainer stack (~2 s): load it on first use
    if name == "AllocatorCallback":
        from .app.callbacks import AllocatorCallback
        return AllocatorCallback
    raise AttributeError(f"module 'peftkern' has no attribute {name!r}")
