"""`python -m vlmo_fast ...`: the `vlmo-fast` command line (see vlmo_fast/cli.py)."""
import sys

from .cli import main

sys.exit(main())
