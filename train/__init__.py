"""The shared training recipe on mmengine: classification and detection over any timm / zoo backbone.

`python -m zoo.train train CONFIG [--opts k=v ...] [--resume [CKPT]]`, `python -m zoo.train eval CONFIG CKPT`,
`python -m zoo.train.demo` (the embedded end-to-end job). Configs live in configs/<task>/<model>_<data>.py.
Importing this package registers its datasets, models, metrics, hooks and optimizer constructor in mmengine.
"""
import warnings

# mmengine 0.10.7 imports pkg_resources (setuptools < 81); silence its deprecation notice
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

from ._utils import ConfigError, DatasetError  # noqa: E402
from . import data, hooks, metrics, models, optim  # noqa: E402,F401
from .runner import (build_runner, check_config, find_resume_checkpoint, load_config, run_eval,  # noqa: E402
                     run_train)

__all__ = ['ConfigError', 'DatasetError', 'build_runner', 'check_config', 'find_resume_checkpoint', 'load_config',
           'run_eval', 'run_train']
