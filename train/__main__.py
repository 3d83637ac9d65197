"""`python -m train train CONFIG ...` / `python -m train eval CONFIG CKPT` (see train/cli.py)."""
import sys

from .cli import main

sys.exit(main())
