"""``python -m peftkern ...`` is the ``peftkern`` console script (peftkern/app/cli.py)."""
import sys

from .app.cli import main

sys.exit(main())
