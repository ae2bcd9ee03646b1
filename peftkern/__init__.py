"""peftkern: a kernel-optimised adapter engine (LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA).

    import peftkern
    model = peftkern.patch(model, method="pg_pos")
"""
from .api import Counts, Explanation, count, explain, merge, methods, parameter_table, patch, unmerge, unpatch
from .layer import AdaptedLinear

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "merge", "unmerge", "methods", "explain", "count", "parameter_table",
    "AdaptedLinear", "Counts", "Explanation", "__version__",
]
