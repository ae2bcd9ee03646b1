"""The version of peftkern (one place: setup.py, io and the package read it here)."""
__version__ = "0.1.0"
