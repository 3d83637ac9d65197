"""Suites: small declarative TOML files saying which subjects, which anchors, which sizes.

The built-in suites live in bench/suites/<group>/<name>.toml, group = models | mixers | ops | gpu (`zoo bench
--list`); any other .toml file with the same keys runs with `zoo bench <group> path/to/suite.toml`.

    title = "Neighborhood attention op vs natten and dense masked attention"
    kind = "ops"                      # ops | mixers | models
    modes = ["fwd", "fwdbwd"]         # fwd; fwdbwd = forward + backward (models: a training step)
    precisions = ["fp32"]             # fp32 | bf16 (CPU autocast; ops: input dtype) | fp16 (CUDA)
    sizes = [14, 28, 56]              # map sides S (S x S tokens); models: input sizes. Ops also take tables:
                                      # {size = 56, heads = 3, shift = 3} (per-shape heads and op kwargs)
    threads = 1                       # optional: repeats, warmup, min_time, memory, device, batch, img_size,
    heads = 2                         #   dim, num_heads (mixers), heads, head_dim (ops), anchor, every_mixer
    head_dim = 32

    [[subjects]]                      # what we measure
    name = "neighborhood_attention"   # a registry name (zoo.kernels op, create_mixer name, timm model)
    kwargs = {kernel_size = 7, backend = "torch"}
    anchor = "natten"                 # the label of the anchor its ratios are taken against
    # speed_of_light = "dense"        # ops: the dense anchor; the report adds each subject's analytic bound
    # bound_tile = 8                  #   (flops.gna_bounds, box tiles of this side) and the fraction realised

    [[anchors]]                       # what it is compared with, measured in the same run
    name = "natten"                   # registry name or a code anchor of bench/anchors.py
    modes = ["fwd"]                   # entry keys: name, label, kwargs, anchor, patch, modes, max_tokens, reduced,
                                      # weights_from (models: a timm model whose weights, seed 0, load into this one)
    max_tokens = 3136
"""
import copy
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .subjects import KINDS, MODES, OP_KWARGS, PRECISIONS, Entry, check_name, op_family

__all__ = ['Suite', 'SuiteError', 'GROUPS', 'SUITE_DIR', 'list_suites', 'load_suite', 'suite_from_names',
           'find_suite']

SUITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'suites')
GROUPS = ('models', 'mixers', 'ops', 'gpu')
_GROUP_KIND = {'models': 'models', 'mixers': 'mixers', 'ops': 'ops', 'gpu': 'ops'}

# top-level keys and their defaults
DEFAULTS: Dict[str, Any] = dict(
    title='', description='', kind=None, device='cpu', modes=['fwd'], precisions=['fp32'], sizes=None,
    threads=None, repeats=5, warmup=1, min_time=0.0, memory=True, batch=1, dim=96, num_heads=3, heads=2,
    head_dim=32, anchor=None, every_mixer=False, speed_of_light=None, bound_tile=8, subjects=[], anchors=[],
)
_SIZE_DEFAULT = {'ops': [14, 28, 56], 'mixers': [14, 28, 56], 'models': [224]}
ENTRY_KEYS = ('name', 'label', 'kwargs', 'anchor', 'patch', 'modes', 'max_tokens', 'reduced', 'weights_from')


class SuiteError(ValueError):
    """A suite (file or command line) that cannot run: the message says what was expected and what was given."""


@dataclass
class Suite:
    """A loaded, checked suite. `params` holds the top-level keys (DEFAULTS filled in)."""
    name: str
    group: str
    params: Dict[str, Any]
    entries: List[Entry] = field(default_factory=list)
    path: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.params['kind']

    @property
    def stem(self) -> str:
        """The output file name: <group>_<name>."""
        return f'{self.group}_{self.name}'

    def shapes(self) -> List[Dict[str, Any]]:
        """One dict per size: {'size': S, ...} with batch (and for ops heads, head_dim) filled in."""
        p = self.params
        out = []
        for s in p['sizes']:
            shape = dict(s) if isinstance(s, dict) else dict(size=s)
            shape.setdefault('batch', p['batch'])
            if self.kind == 'ops':
                shape.setdefault('heads', p['heads'])
                shape.setdefault('head_dim', p['head_dim'])
            out.append(shape)
        return out


def _close(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.6)
    return f'; did you mean {", ".join(close)}?' if close else ''


def _check_keys(where: str, data: Dict[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            raise SuiteError(f'{where}: unknown key {key!r}{_close(key, allowed)} (expected keys: {", ".join(allowed)})')


def _positive_int(where: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SuiteError(f'{where}: expected an integer >= {low}, got {value!r}')


def _check(suite: Suite, where: str) -> Suite:
    p = suite.params
    if p['kind'] not in KINDS:
        raise SuiteError(f'{where}: kind: expected one of {", ".join(KINDS)}, got {p["kind"]!r}')
    kind = p['kind']
    if p['device'] not in ('cpu', 'cuda'):
        raise SuiteError(f"{where}: device: expected 'cpu' or 'cuda', got {p['device']!r}")
    for key, allowed in (('modes', MODES), ('precisions', PRECISIONS)):
        values = p[key]
        if not isinstance(values, list) or not values or any(v not in allowed for v in values):
            raise SuiteError(f'{where}: {key}: expected a non-empty list of {", ".join(allowed)}, got {values!r}')
    if p['threads'] is not None:
        _positive_int(f'{where}: threads', p['threads'])
    for key, low in (('repeats', 1), ('warmup', 0), ('batch', 1), ('dim', 1), ('num_heads', 1), ('heads', 1),
                     ('head_dim', 1)):
        _positive_int(f'{where}: {key}', p[key], low)
    if not isinstance(p['min_time'], (int, float)) or p['min_time'] < 0:
        raise SuiteError(f'{where}: min_time: expected seconds >= 0, got {p["min_time"]!r}')
    if kind == 'mixers' and p['dim'] % p['num_heads']:
        raise SuiteError(f'{where}: num_heads: expected a divisor of dim {p["dim"]}, got {p["num_heads"]}')
    if p['sizes'] is None:
        p['sizes'] = list(_SIZE_DEFAULT[kind])
    if not isinstance(p['sizes'], list) or not p['sizes']:
        raise SuiteError(f'{where}: sizes: expected a non-empty list, got {p["sizes"]!r}')
    for s in p['sizes']:
        if isinstance(s, dict):
            if kind != 'ops':
                raise SuiteError(f'{where}: sizes: tables are for ops suites; {kind} take integers, got {s!r}')
            if 'size' not in s:
                raise SuiteError(f'{where}: sizes: each table needs size = S, got {s!r}')
            for key in ('size', 'heads', 'head_dim', 'batch'):
                if key in s:
                    _positive_int(f'{where}: sizes: {key}', s[key])
        else:
            _positive_int(f'{where}: sizes', s)
    if all(isinstance(s, int) for s in p['sizes']):
        p['sizes'] = sorted(set(p['sizes']))
    labels = [e.label for e in suite.entries]
    if p['speed_of_light'] is not None and (kind != 'ops' or p['speed_of_light'] not in labels):
        raise SuiteError(f'{where}: speed_of_light: expected the label of the dense anchor of an ops suite '
                         f'(entries: {", ".join(labels)}), got {p["speed_of_light"]!r}')
    _positive_int(f'{where}: bound_tile', p['bound_tile'])
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SuiteError(f'{where}: labels must be unique; {dupes} repeat (give entries a label)')
    if not any(not e.is_anchor for e in suite.entries):
        raise SuiteError(f'{where}: expected at least one subject ([[subjects]] or every_mixer = true)')
    from .anchors import PATCHES
    for e in suite.entries:
        at = f'{where}: {"anchor" if e.is_anchor else "subject"} {e.label!r}'
        problem = check_name(kind, e.name)
        if problem:
            raise SuiteError(f'{at}: {problem}')
        for a in e.anchor or ():
            if a not in labels or a == e.label:
                raise SuiteError(f'{at}: anchor {a!r} is not another entry of the suite{_close(a, labels)} '
                                 f'(entries: {", ".join(labels)})')
        if e.patch is not None and (kind != 'models' or e.patch not in PATCHES):
            raise SuiteError(f'{at}: patch: expected one of {sorted(PATCHES)} (models only), got {e.patch!r}')
        if e.weights_from is not None and (kind != 'models' or check_name(kind, e.weights_from)):
            raise SuiteError(f'{at}: weights_from: expected a timm model name (models only), got {e.weights_from!r}')
        if e.modes is not None and (not e.modes or any(m not in MODES for m in e.modes)):
            raise SuiteError(f'{at}: modes: expected a non-empty list of {", ".join(MODES)}, got {e.modes!r}')
        if e.max_tokens is not None:
            _positive_int(f'{at}: max_tokens', e.max_tokens)
        if not isinstance(e.kwargs, dict):
            raise SuiteError(f'{at}: kwargs: expected a table, got {e.kwargs!r}')
        if kind == 'ops':
            allowed = OP_KWARGS[op_family(e.name)]
            shape_keys = {k for s in p['sizes'] if isinstance(s, dict) for k in s} - {'size', 'heads', 'head_dim',
                                                                                     'batch'}
            for key in list(e.kwargs) + sorted(shape_keys):
                if key not in allowed:
                    raise SuiteError(f'{at}: unknown op argument {key!r}{_close(key, allowed)} (the '
                                     f'{op_family(e.name)} ops take: {", ".join(allowed)})')
    return suite


def _entry(where: str, data: Any, is_anchor: bool) -> Entry:
    if not isinstance(data, dict) or 'name' not in data:
        raise SuiteError(f'{where}: expected a table with a name, got {data!r}')
    _check_keys(where, data, ENTRY_KEYS)
    return Entry(**copy.deepcopy(data), is_anchor=is_anchor)


def build_suite(data: Dict[str, Any], name: str, group: str, where: str, path: Optional[str] = None) -> Suite:
    """A checked Suite from the parsed file contents `data`."""
    _check_keys(where, data, list(DEFAULTS))
    params = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(data)}
    if params['kind'] is None:
        params['kind'] = _GROUP_KIND[group]
    if group == 'gpu':
        params['device'] = data.get('device', 'cuda')
    entries = [_entry(f'{where}: subjects[{i}]', e, False) for i, e in enumerate(params.pop('subjects'))]
    entries += [_entry(f'{where}: anchors[{i}]', e, True) for i, e in enumerate(params.pop('anchors'))]
    if params['every_mixer']:
        if params['kind'] != 'mixers':
            raise SuiteError(f'{where}: every_mixer: only mixers suites take it (this one is {params["kind"]})')
        import zoo.blocks
        named = {e.name for e in entries}
        entries = [Entry(n) for n in zoo.blocks.list_mixers() if n not in named] + entries
    for e in entries:
        if not e.is_anchor and e.anchor is None and params['anchor'] is not None and e.label != params['anchor']:
            e.anchor = [params['anchor']]
    return _check(Suite(name, group, params, entries, path), where)


def load_suite(path: str, group: str) -> Suite:
    """Load and check a suite file."""
    where = os.path.relpath(path) if os.path.isabs(path) else path
    try:
        with open(path, 'rb') as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SuiteError(f'no such suite file: {path!r}') from None
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f'{where}: not valid TOML ({e})') from None
    return build_suite(data, os.path.splitext(os.path.basename(path))[0], group, where, path)


def list_suites() -> List[Tuple[str, str, str]]:
    """(group, name, title) of every built-in suite."""
    out = []
    for group in GROUPS:
        folder = os.path.join(SUITE_DIR, group)
        for fname in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if fname.endswith('.toml'):
                with open(os.path.join(folder, fname), 'rb') as f:
                    out.append((group, fname[:-5], tomllib.load(f).get('title', '')))
    return out


def find_suite(group: str, name: str) -> Optional[str]:
    """The path of built-in suite `name` of `group`, or of the suite file `name`; None if neither."""
    if name.endswith('.toml'):
        return name
    path = os.path.join(SUITE_DIR, group, name + '.toml')
    return path if os.path.isfile(path) else None


def suite_from_names(group: str, names: Sequence[str], base: Optional[Suite]) -> Suite:
    """An ad-hoc suite of registry names ('OURS=ANCHOR' pairs them), with `base`'s settings (the group's
    default suite) but none of its entries."""
    params = copy.deepcopy(base.params) if base is not None else {'kind': _GROUP_KIND[group]}
    params = {k: v for k, v in params.items() if k in DEFAULTS and k not in ('anchor', 'every_mixer')}
    params.update(title=f'{", ".join(names)}', description='', subjects=[], anchors=[])
    seen: Dict[str, Dict[str, Any]] = {}
    for item in names:
        ours, sep, anchor = item.partition('=')
        if sep and not (ours and anchor):
            raise SuiteError(f'expected NAME or OURS=ANCHOR, got {item!r}')
        if anchor:
            seen.setdefault(anchor, dict(name=anchor, is_anchor=True))
        entry = seen.setdefault(ours, dict(name=ours))
        entry.pop('is_anchor', None)
        if anchor:
            entry.setdefault('anchor', []).append(anchor)
    for data in seen.values():
        (params['anchors'] if data.pop('is_anchor', False) else params['subjects']).append(data)
    return build_suite(params, 'custom', group, 'command line')
