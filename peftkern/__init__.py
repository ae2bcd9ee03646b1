"""peftkern: a kernel-optimised adapter engine (LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA).

    import peftkern
    model = peftkern.patch(model, method="pg_pos")
"""
from .api import Counts, Explanation, count, explain, merge, methods, parameter_table, patch, unmerge, unpatch
from .layer import AdaptedLinear
from .allocator import orthogonal_regularization, rank_pattern
from .io import export_peft, load, save
from .health import NonFiniteError, check_finite

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "merge", "unmerge", "methods", "explain", "count", "parameter_table",
    "AdaptedLinear", "Counts", "Explanation", "__version__",
    "save", "load", "export_peft",
    "orthogonal_regularization", "rank_pattern", "AllocatorCallback", "check_finite", "NonFiniteError",
]


def __getattr__(name):  # AllocatorCallback imports transformers' Trainer stack (~2 s): load it on first use
    if name == "AllocatorCallback":
        from .callbacks import AllocatorCallback
        return AllocatorCallback
    raise AttributeError(f"module 'peftkern' has no attribute {name!r}")
