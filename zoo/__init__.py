"""Vision backbones registered in timm. `import zoo`, then `timm.create_model(name)` builds any of them."""
import importlib
import pkgutil
from typing import List

from ._hierarchical import HierarchicalBackbone, Stage, build_backbone, default_cfg

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


__all__ = ['HierarchicalBackbone', 'Stage', 'build_backbone', 'default_cfg', 'list_zoo_models', 'FAMILY_MODULES']
