"""Registered methods. Importing this package registers every built-in method."""
from .registry import (DEFAULT_RANK, LearningRates, Method, default_lr, get, names, parse_options, register,
                       summaries, with_training_length)

# Each module registers its methods on import. The list is explicit, on purpose.
from . import tied  # noqa: E402,F401  lora, tied_lora, vera
from . import adalora, hyper_adalora  # noqa: E402,F401
from . import pg  # noqa: E402,F401  pg_fixed, pg_trainable, pg_pos

__all__ = ["DEFAULT_RANK", "LearningRates", "Method", "default_lr", "get", "names", "parse_options", "register",
           "summaries", "with_training_length"]
