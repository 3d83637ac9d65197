"""What the engine measures: ops, mixers and models named from the registries (and `anchors`), built into
callables per shape, mode and precision.

Kinds and names:
  ops     zoo.kernels ops (window_attention, neighborhood_attention, routed_attention, linear_attention;
          neighborhood_attention_nd: neighborhood_attention / neighborhood_attention_3d with stride and causal, on
          S x S or depth x S x S maps, op family 'gna') and the code anchors of `bench.anchors.OP_ANCHORS`; inputs q, k, v of (batch, S, S, heads, head_dim) plus each
          op family's tables (relative-position bias, routing index, normaliser features)
  mixers  `zoo.blocks.create_mixer(name, dim, num_heads=..., **kwargs)`, on one (1, S, S, dim) map
  models  timm names (zoo's included, `import zoo` registers them), on (batch, 3, img_size, img_size)
Modes: 'fwd' (eval, no autograd) and 'fwdbwd': for ops and mixers the forward plus the gradients of the inputs
and parameters against a fixed cotangent; for models a training step (forward, cross-entropy, backward, AdamW).
Precisions: 'fp32'; 'bf16' / 'fp16': mixers and models under `torch.autocast` on the suite's device (CPU: bf16),
ops with inputs in that dtype (a kernel has no autocast rule; tables stay fp32).
"""
import contextlib
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['Entry', 'KINDS', 'MODES', 'PRECISIONS', 'OP_KWARGS', 'known_names', 'check_name', 'build_subject',
           'close_matches']

KINDS = ('ops', 'mixers', 'models')
MODES = ('fwd', 'fwdbwd')
PRECISIONS = ('fp32', 'bf16', 'fp16')

# kwargs each op family accepts (suite entries and shapes): checked when a suite loads
OP_KWARGS: Dict[str, Tuple[str, ...]] = {
    'window': ('window_size', 'shift', 'mode', 'backend', 'rpb'),
    'neighborhood': ('kernel_size', 'dilation', 'backend', 'impl', 'rpb', 'stride', 'is_causal'),
    'routing': ('n_win', 'topk', 'backend'),
    'linear': ('normalizer', 'backend'),
    # generalized neighborhood attention on 2-D maps, or 3-D ones when the shape gives a depth (S x S x depth)
    'gna': ('kernel_size', 'stride', 'dilation', 'is_causal', 'rpb', 'backend', 'depth'),
}


@dataclass
class Entry:
    """One subject or anchor of a suite: a registry (or anchor) name, its kwargs, and what it is compared with."""
    name: str
    label: str = ''
    kwargs: Dict[str, Any] = field(default_factory=dict)
    anchor: Optional[List[str]] = None  # labels of the entries this one's ratios are taken against (a str: one)
    patch: Optional[str] = None  # models: a context of `anchors.PATCHES` around every call
    modes: Optional[List[str]] = None  # a subset of the suite's modes
    max_tokens: Optional[int] = None  # skipped above this many tokens (O(N^2) anchors)
    reduced: bool = False  # models: the family's reduced test width (`zoo.reduced_args`)
    weights_from: Optional[str] = None  # models: a timm model built as the anchors are; its weights load into this
    is_anchor: bool = False

    def __post_init__(self):
        self.label = self.label or self.name
        if isinstance(self.anchor, str):
            self.anchor = [self.anchor]


def _tuple(value: Any) -> Any:
    """A TOML array (a list) as the tuple the ops take per axis; anything else unchanged."""
    return tuple(value) if isinstance(value, list) else value


def _ours_ops() -> Dict[str, Tuple[str, Callable]]:
    from zoo.kernels import (
        linear_attention, neighborhood_attention, neighborhood_attention_3d, routed_attention, window_attention)
    from zoo.kernels.neighborhood.reference import neighborhood_attention_ref

    def window(t, window_size=7, shift=0, mode='block', backend=None, rpb=True, **_):
        return window_attention(t['q'], t['k'], t['v'], window_size, mode=mode, shift=shift,
                                rel_pos_bias=t['rpb'] if rpb else None, backend=backend)

    def neighborhood(t, kernel_size=7, dilation=1, backend=None, impl=None, rpb=True, stride=1, is_causal=False,
                     **_):
        bias = t['rpb'] if rpb else None
        if impl is not None:  # one path of the reference forced ('gather' or the O(N^2) 'dense')
            return neighborhood_attention_ref(t['q'], t['k'], t['v'], (kernel_size,) * 2, (dilation,) * 2, bias,
                                              impl=impl)
        # GNA arguments only when set, so NA entries call the op as before
        causal = _tuple(is_causal)
        gna = {} if stride == 1 and causal is False else dict(stride=stride, is_causal=causal)
        return neighborhood_attention(t['q'], t['k'], t['v'], kernel_size, dilation, rel_pos_bias=bias,
                                      backend=backend, **gna)

    def routing(t, n_win=7, topk=4, backend=None, **_):
        return routed_attention(t['q'], t['k'], t['v'], n_win, topk, idx=t['idx'], backend=backend)

    def linear(t, normalizer='flatten', backend=None, **_):
        return linear_attention(t['q'], t['k'], t['v'], normalizer=normalizer, scale=t['scale'],
                                q_norm=t.get('q_norm'), k_norm=t.get('k_norm'), backend=backend)

    def gna(t, kernel_size=7, stride=1, dilation=1, is_causal=False, backend=None, rpb=False, **_):
        op = neighborhood_attention_3d if t['q'].dim() == 6 else neighborhood_attention
        return op(t['q'], t['k'], t['v'], kernel_size, dilation, rel_pos_bias=t['rpb'] if rpb else None,
                  backend=backend, stride=stride, is_causal=is_causal)

    return {'neighborhood_attention_nd': ('gna', gna),
            'window_attention': ('window', window), 'neighborhood_attention': ('neighborhood', neighborhood),
            'routed_attention': ('routing', routing), 'linear_attention': ('linear', linear)}


def known_names(kind: str) -> List[str]:
    """Every name a suite of `kind` may use."""
    if kind == 'ops':
        from .anchors import OP_ANCHORS
        return sorted(_ours_ops()) + sorted(OP_ANCHORS)
    if kind == 'mixers':
        import zoo.blocks
        return zoo.blocks.list_mixers()
    import timm
    import zoo  # noqa: F401  (registers the zoo models)
    return timm.list_models()


def close_matches(name: str, names: Sequence[str]) -> List[str]:
    return difflib.get_close_matches(name, list(names), n=4, cutoff=0.6)


def check_name(kind: str, name: str) -> Optional[str]:
    """None if `name` is a known subject of `kind`, else an error naming the close matches."""
    if kind == 'models':
        import timm
        import zoo  # noqa: F401
        if timm.is_model(name):
            return None
    elif name in known_names(kind):
        return None
    names = known_names(kind)
    close = close_matches(name, names)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    where = {'ops': f'zoo.kernels ops and bench anchors: {names}', 'mixers': f'registered mixers: {names}',
             'models': 'timm names, zoo models included (`zoo list`)'}[kind]
    return f'unknown {kind[:-1]} {name!r}{hint} ({where})'


def op_family(name: str) -> str:
    from .anchors import OP_ANCHORS
    return {**_ours_ops(), **OP_ANCHORS}[name][0]


# --------------------------------------------------------------------------------------------- precision

def dtype_of(precision: str):
    import torch
    return {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]


def autocast(precision: str, device: str):
    import torch
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype_of(precision))


# --------------------------------------------------------------------------------------------- subjects

class Subject:
    """A built entry: `calls(shape, precision)` gives {'fwd': fn, 'fwdbwd': fn} over fixed inputs."""
    entry: Entry
    device: str

    def params(self) -> Optional[int]:
        return None

    def tokens(self, shape: Dict[str, Any]) -> Optional[int]:
        return shape['size'] ** 2

    def calls(self, shape: Dict[str, Any], precision: str) -> Dict[str, Callable[[], Any]]:
        raise NotImplementedError


def _grads(out, targets, cotangent):
    import torch
    return torch.autograd.grad(out, targets, cotangent.to(out.dtype), allow_unused=True)


class OpSubject(Subject):
    def __init__(self, entry: Entry, device: str, batch: int):
        from .anchors import OP_ANCHORS
        self.entry, self.device, self.batch = entry, device, batch
        self.family, self.fn = {**_ours_ops(), **OP_ANCHORS}[entry.name]

    def params_for(self, shape: Dict[str, Any]) -> Dict[str, Any]:
        extra = {k: v for k, v in shape.items() if k not in ('size', 'heads', 'head_dim', 'batch')}
        return {**self.entry.kwargs, **extra}

    def inputs(self, shape: Dict[str, Any], precision: str) -> Dict[str, Any]:
        """q, k, v and the family's tables at `shape`, from a fixed seed (the same for every entry)."""
        import torch
        params = self.params_for(shape)
        dtype, dev = dtype_of(precision), self.device
        g = torch.Generator().manual_seed(0)
        depth = (params['depth'],) if params.get('depth') else ()
        dims = (shape.get('batch', self.batch),) + depth + (shape['size'], shape['size'], shape['heads'],
                                                           shape['head_dim'])

        def t(rand=torch.randn, scale=1.0):
            return (scale * rand(dims, generator=g)).to(dev, dtype).requires_grad_()

        if self.family == 'linear':  # non-negative feature maps (any sign for InLine), as the mixers make them
            normalizer = params.get('normalizer', 'flatten')
            feature = torch.randn if normalizer == 'inline' else torch.rand
            out = dict(q=t(feature), k=t(feature), v=t(), scale=shape['head_dim'] ** -0.5)
            if normalizer == 'mala':
                out.update(q_norm=t(feature), k_norm=t(feature))
            return out
        out = dict(q=t(), k=t(), v=t())
        if self.family in ('window', 'neighborhood') or (self.family == 'gna' and params.get('rpb')):
            side = 2 * params.get('window_size' if self.family == 'window' else 'kernel_size', 7) - 1
            table = 0.1 * torch.randn(shape['heads'], *[side] * (len(dims) - 3), generator=g)
            out['rpb'] = table.to(dev).requires_grad_()
        if self.family == 'routing':
            from zoo.kernels.routing import default_scale, region_routing
            topk = params.get('topk', 4)
            with torch.no_grad():
                out['idx'] = region_routing(out['q'], out['k'], params.get('n_win', 7), topk,
                                            (shape['heads'] * shape['head_dim']) ** -0.5)
            out['scale'] = default_scale(out['q'], topk)
        return out

    def calls(self, shape, precision):
        import torch
        tensors = self.inputs(shape, precision)
        params = self.params_for(shape)
        targets = [v for v in tensors.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        cot = torch.randn(tensors['v'].shape, generator=torch.Generator().manual_seed(1)).to(self.device)

        def fwd():
            with torch.no_grad():
                return self.fn(tensors, **params)

        def fwdbwd():
            return _grads(self.fn(tensors, **params), targets, cot)
        return dict(fwd=fwd, fwdbwd=fwdbwd)


class MixerSubject(Subject):
    def __init__(self, entry: Entry, device: str, dim: int, num_heads: int):
        self.entry, self.device, self.dim, self.num_heads = entry, device, dim, num_heads
        self._built: Dict[str, Any] = {}

    def module(self, size: Optional[int] = None):
        """The mixer; kwargs written "{size}" take the map side (a table as large as the map)."""
        import torch
        import zoo.blocks
        kwargs = {k: (size if v == '{size}' else v) for k, v in self.entry.kwargs.items()}
        key = repr(sorted(kwargs.items()))
        if key not in self._built:
            torch.manual_seed(0)
            self._built[key] = zoo.blocks.create_mixer(self.entry.name, self.dim, num_heads=self.num_heads,
                                                       **kwargs).to(self.device)
        return self._built[key]

    def params(self):
        size = 7 if any(v == '{size}' for v in self.entry.kwargs.values()) else None
        return sum(p.numel() for p in self.module(size).parameters())

    def calls(self, shape, precision):
        import torch
        size, module = shape['size'], self.module(shape['size'])
        gen = torch.Generator().manual_seed(size)
        x = torch.randn(1, size, size, self.dim, generator=gen).to(self.device)
        cot = torch.randn(1, size, size, self.dim, generator=gen).to(self.device)
        params = [p for p in module.parameters() if p.requires_grad]

        def fwd():
            if module.training:
                module.eval()
            with torch.no_grad(), autocast(precision, self.device):
                return module(x)

        def fwdbwd():
            if not module.training:
                module.train()
            xg = x.detach().requires_grad_()
            with autocast(precision, self.device):
                y = module(xg)
            return _grads(y, [xg] + params, cot)
        return dict(fwd=fwd, fwdbwd=fwdbwd)


class ModelSubject(Subject):
    def __init__(self, entry: Entry, device: str):
        import timm
        import torch

        import zoo
        from .anchors import PATCHES
        self.entry, self.device = entry, device
        kwargs = {**(zoo.reduced_args(entry.name) if entry.reduced else {}), **entry.kwargs}
        torch.manual_seed(0)
        self.model = timm.create_model(entry.name, **kwargs).to(device)
        if entry.weights_from:  # the anchor's own weights (seed 0), through this model's family key map
            import importlib

            from zoo.weights.keymap import remap_state_dict
            torch.manual_seed(0)
            source = timm.create_model(entry.weights_from).state_dict()
            key_map = importlib.import_module(type(self.model).__module__).KEY_MAP
            self.model.load_state_dict(remap_state_dict(source, self.model, key_map, source=entry.weights_from))
        self.patch = PATCHES[entry.patch] if entry.patch else contextlib.nullcontext
        self._opt = None

    def params(self):
        return sum(p.numel() for p in self.model.parameters())

    def tokens(self, shape):
        return None

    def calls(self, shape, precision):
        import torch
        import torch.nn.functional as F
        model, patch = self.model, self.patch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape['batch'], 3, shape['size'], shape['size'], generator=g).to(self.device)
        y = torch.randint(0, model.num_classes or 1, (shape['batch'],), generator=g).to(self.device)

        def fwd():
            if model.training:
                model.eval()
            with torch.no_grad(), autocast(precision, self.device), patch():
                return model(x)

        def fwdbwd():
            if not model.training:
                model.train()
            if self._opt is None:
                self._opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
            self._opt.zero_grad(set_to_none=True)
            with autocast(precision, self.device), patch():
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            self._opt.step()
            return loss.detach()
        return dict(fwd=fwd, fwdbwd=fwdbwd)


def build_subject(kind: str, entry: Entry, device: str, suite_params: Dict[str, Any]) -> Subject:
    if kind == 'ops':
        return OpSubject(entry, device, suite_params['batch'])
    if kind == 'mixers':
        return MixerSubject(entry, device, suite_params['dim'], suite_params['num_heads'])
    return ModelSubject(entry, device)
