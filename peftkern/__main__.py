"""``python -m peftkern ...`` is the ``peftkern`` console script."""
import sys

from .cli import main

sys.exit(main())
