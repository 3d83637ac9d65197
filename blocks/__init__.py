"""Token mixers and blocks built on the `kernels` ops. Importing this package registers every mixer."""
import importlib
import pkgutil

from ._registry import create_mixer, list_mixers, register_mixer

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith('_'):
        importlib.import_module(f'{__name__}.{_m.name}')

__all__ = ['create_mixer', 'list_mixers', 'register_mixer']
