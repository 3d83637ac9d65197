"""`python -m zoo.train train CONFIG ...` / `python -m zoo.train eval CONFIG CKPT` (see train/cli.py)."""
import sys

from .cli import main

sys.exit(main())
