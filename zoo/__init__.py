"""Vision backbones registered in timm. `import zoo`, then `timm.create_model(name)` builds any of them."""
import fnmatch
import importlib
import pkgutil
from typing import Any, Dict, List

from ._hierarchical import HierarchicalBackbone, Stage, StageSpec, build_backbone, build_stages, default_cfg

FAMILY_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith('zoo_'))
for _name in FAMILY_MODULES:
    importlib.import_module(f'{__name__}.{_name}')


def list_zoo_models(pattern: str = '') -> List[str]:
    """Names of the models this package registers in timm (optionally filtered by a wildcard)."""
    import timm
    names = set()
    for module in FAMILY_MODULES:
        names.update(timm.list_models(pattern or '', module=module))
    return sorted(names)


def reduced_args(name: str) -> Dict[str, Any]:
    """Keyword arguments that build a narrow, shallow version of model `name` with the same structure
    (same stage count, mixers, schedules and layouts): what the per-model tests run, and a quick model to
    try a pipeline with. Each family declares them in its module's `REDUCED_ARGS` (wildcard -> kwargs)."""
    import timm
    for module in FAMILY_MODULES:
        if name in timm.list_models(module=module):
            table = getattr(importlib.import_module(f'{__name__}.{module}'), 'REDUCED_ARGS', {})
            for pattern, kwargs in table.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return dict(kwargs)
            raise KeyError(f'{module}.REDUCED_ARGS has no entry matching {name!r}')
    raise KeyError(f'unknown zoo model {name!r}; expected one of {list_zoo_models()}')


__all__ = [
    'HierarchicalBackbone', 'Stage', 'StageSpec', 'build_backbone', 'build_stages', 'default_cfg', 'list_zoo_models',
    'reduced_args', 'FAMILY_MODULES',
]
