"""Registered methods. Importing this package registers every built-in method."""
from .registry import Method, get, names, parse_options, register, summaries

# Each module registers its methods on import. The list is explicit, on purpose.
from . import tied  # noqa: E402,F401  lora, tied_lora, vera

__all__ = ["Method", "get", "names", "parse_options", "register", "summaries"]
