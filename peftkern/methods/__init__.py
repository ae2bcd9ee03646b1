"""Registered methods. Importing this package registers every built-in method."""
# Each module registers its methods on import. The list is explicit, on purpose.
from . import (  # noqa: E402,F401
                       adalora,
                       hyper_adalora,
                       pg,  # noqa: E402,F401  pg_fixed, pg_trainable, pg_pos
                       tied,  # noqa: E402,F401  lora, tied_lora, vera
)
from .registry import (
                       DEFAULT_RANK,
                       LearningRates,
                       Method,
                       default_lr,
                       get,
                       names,
                       parse_options,
                       register,
                       summaries,
                       with_training_length,
)

__all__ = ["DEFAULT_RANK", "LearningRates", "Method", "default_lr", "get", "names", "parse_options", "register",
           "summaries", "with_training_length"]
