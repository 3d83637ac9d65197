"""Anchors that are code, not registry names: the formulations ours is compared with.

Suites name them like any subject (`name = "natten"`); registry anchors (timm's Swin / MaxViT / ResNet, the
'global' and 'window' mixers) need no code and are named directly.

Ops (q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d); called as `fn(inputs, **kwargs)` by `subjects`):
  natten              natten.functional.na2d (CPU: its Flex backend, forward only, no RPB)
  sdpa_neighborhood   F.scaled_dot_product_attention over all tokens, (heads, N, N) float mask: RPB on the
                      neighborhood, -inf elsewhere (O(N^2) memory)
  sdpa_dense          dense F.scaled_dot_product_attention over all tokens, no mask (1-D / 2-D / 3-D maps): the
                      speed-of-light reference of the sparse 'gna' op
  natten_gna          natten.functional.na2d / na3d with kernel_size / stride / dilation / is_causal (CPU: Flex,
                      forward only)
  sdpa_window         pad / roll / partition copies + SDPA with a materialised float mask (bias + shift mask)
  routed_gather       the official BiFormer formulation (ops/bra_legacy.py): `torch.gather` of the routed
                      K/V out of a broadcast view, then explicit softmax attention
  flex_routed         FlexAttention on region-major tokens with a block mask from the routing
Model patches (a context entered around every call of a model subject, `patch = "gather_baseline"`):
  gather_baseline     every BiFormer routed mixer runs `routed_attention_gather` instead of our op
"""
import contextlib
import warnings
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = ['routed_attention_gather', 'gather_baseline', 'sdpa_window_attention', 'sdpa_neighborhood_attention',
           'neighborhood_dense_mask', 'dense_sdpa', 'natten_gna', 'flex_routed_attention', 'natten_na2d', 'OP_ANCHORS',
           'FORWARD_ONLY_ON_CPU', 'PATCHES']


def routed_attention_gather(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_win: int,
        topk: int,
        *,
        scale: Optional[float] = None,
        idx: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """GATHER BASELINE (official formulation). q, k: (B, H, W, heads, dk); v: (B, H, W, heads, dv) ->
    (B, H, W, heads, dv). Same signature and results as `zoo.kernels.routing.routed_attention`.

    The routed K/V are copied top-k times by `torch.gather` over a broadcast view; its backward allocates a
    gradient of S^2 copies of K/V and reduces it (the official "gather backward").
    """
    from zoo.kernels.routing import default_scale, is_global, region_routing, routed_attention
    if is_global(topk):
        return routed_attention(q, k, v, n_win, topk, scale=scale, backend='torch')
    B, H, W, nh, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(q, topk) if scale is None else scale
    p2, wh, ww = n_win * n_win, H // n_win, W // n_win
    w2 = wh * ww

    def regions(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, heads, d) -> (B, S^2, w^2, heads * d)
        return t.reshape(B, n_win, wh, n_win, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, p2, w2, -1)

    if idx is None:
        idx = region_routing(q, k, n_win, topk, scale)
    topk = idx.shape[-1]
    kv = torch.cat([regions(k), regions(v)], dim=-1)  # official: one kv tensor, [k | v] channels
    c = kv.shape[-1]
    kv_sel = torch.gather(kv.view(B, 1, p2, w2, c).expand(-1, p2, -1, -1, -1), dim=2,
                          index=idx.view(B, p2, topk, 1, 1).expand(-1, -1, -1, w2, c))  # B, S^2, topk, w^2, c
    k_sel, v_sel = kv_sel.split([nh * dk, nh * dv], dim=-1)
    k_sel = k_sel.reshape(B * p2, topk * w2, nh, dk).permute(0, 2, 3, 1)  # (B S^2), heads, dk, topk w^2
    v_sel = v_sel.reshape(B * p2, topk * w2, nh, dv).transpose(1, 2)  # (B S^2), heads, topk w^2, dv
    q_pix = regions(q).reshape(B * p2, w2, nh, dk).transpose(1, 2)  # (B S^2), heads, w^2, dk
    attn = ((q_pix * scale) @ k_sel).softmax(dim=-1)
    out = attn @ v_sel  # (B S^2), heads, w^2, dv
    out = out.reshape(B, n_win, n_win, nh, wh, ww, dv).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, nh, dv)


@contextlib.contextmanager
def gather_baseline() -> Iterator[None]:
    """Within: every BiLevelRoutingAttention mixer runs the gather baseline instead of our op."""
    import zoo.blocks.routing as routing_mixer
    prev = routing_mixer.routed_attention
    routing_mixer.routed_attention = routed_attention_gather
    try:
        yield
    finally:
        routing_mixer.routed_attention = prev


def sdpa_window_attention(q, k, v, window, shift, table, scale):
    """Partitioned SDPA with a materialised float mask; (B, H, W, heads, d) in and out."""
    from zoo.kernels.window.reference import window_partition, window_reverse, window_tables
    B, H, W, nh, d = q.shape
    wh, ww = window
    ph, pw = (-H) % wh, (-W) % ww
    index, mask = window_tables(H, W, window, shift, 'block', window, q.device)

    def split(t):
        t = F.pad(t, (0, 0, 0, 0, 0, pw, 0, ph)) if ph or pw else t
        t = torch.roll(t, (-shift[0], -shift[1]), (1, 2)) if any(shift) else t
        return window_partition(t, window).transpose(2, 3).flatten(0, 1)  # B*nW, heads, N, d

    bias = table.flatten(1)[:, index].to(q.dtype)[None]  # 1, heads, N, N (broadcasts over windows)
    if mask is not None:  # per-window mask: materialise (B * nW, heads, N, N)
        bias = (bias + mask[:, None].to(q.dtype)).expand(B, -1, -1, -1, -1).flatten(0, 1)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias, scale=scale)
    out = out.unflatten(0, (B, -1)).transpose(2, 3)
    out = window_reverse(out, window, (H + ph, W + pw))
    out = torch.roll(out, shift, (1, 2)) if any(shift) else out
    return out[:, :H, :W]


def neighborhood_dense_mask(sizes, kernel, stride, dilation, causal, rpb=None) -> torch.Tensor:
    """(heads or 1, N, N) float mask of generalized neighborhood attention over all N tokens: the relative-position
    bias (or 0) on each query's neighborhood, -inf elsewhere; built from the per-axis windows (the AND of the axes)."""
    from zoo.kernels.neighborhood.reference import gna_axis_mask
    allowed, offsets = None, None
    for a, n in enumerate(sizes):
        ok, rel = gna_axis_mask(n, kernel[a], stride[a], dilation[a], causal[a])
        rel = (rel + kernel[a] - 1).clamp(0, 2 * kernel[a] - 2)  # a table index (any, off the neighbourhood)
        if allowed is None:
            allowed, offsets = ok, rel
        else:
            allowed = (allowed[:, None, :, None] & ok[None, :, None, :]).flatten(2).flatten(0, 1)
            offsets = (offsets[:, None, :, None] * (2 * kernel[a] - 1) + rel[None, :, None, :]).flatten(2).flatten(0, 1)
    values = torch.zeros(1, *allowed.shape) if rpb is None else rpb.flatten(1)[:, offsets]
    return values.masked_fill(~allowed, float('-inf'))


def sdpa_neighborhood_attention(q, k, v, kernel, dilation, rpb, scale):
    """Dense SDPA over all tokens with a (heads, N, N) float mask: RPB on the neighborhood, -inf elsewhere."""
    B, H, W, nh, d = q.shape
    N = H * W
    mask = neighborhood_dense_mask((H, W), kernel, (1, 1), dilation, (False, False), rpb).to(q.dtype)

    def heads_first(t):
        return t.reshape(B, N, nh, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask[None],
                                         scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, nh, d)


def dense_sdpa(q, k, v, scale=None):
    """Dense attention over all tokens (no mask): the speed-of-light reference of a sparse attention.
    q, k, v: (B, *spatial, heads, d) -> same."""
    B, nh, d = q.shape[0], q.shape[-2], q.shape[-1]

    def heads_first(t):
        return t.reshape(B, -1, nh, t.shape[-1]).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


def natten_gna(q, k, v, kernel_size=7, stride=1, dilation=1, is_causal=False, scale=None):
    """natten 0.21's na2d / na3d by the rank of q (CPU: Flex, forward only, no RPB). Raises ImportError without
    natten and natten's NotImplementedError where its CPU backend cannot run (fp64, head_dim not a power of 2)."""
    from natten.functional import na2d, na3d
    op = na3d if q.dim() == 6 else na2d
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return op(q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal, scale=scale)


def flex_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, idx: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Routed attention through FlexAttention (compiled on CUDA). q, k: (B, H, W, heads, dk); v: (B, H, W,
    heads, dv); idx: (B, n_win^2, topk) -> (B, H, W, heads, dv). Tokens are permuted to region-major order so
    every region is a contiguous block of w^2 tokens; the block mask comes from the routing (built per call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from zoo.kernels.routing import from_regions, to_regions
    B, H, W, nh, _ = q.shape
    p2, w2 = n_win * n_win, (H // n_win) * (W // n_win)
    routed = torch.zeros(B, p2, p2, dtype=torch.bool, device=q.device).scatter_(2, idx, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, q_idx // w2, kv_idx // w2]

    N = H * W
    block_mask = create_block_mask(mask_mod, B, None, N, N, device=q.device)
    qr, kr, vr = (to_regions(t, n_win).reshape(B, nh, N, -1) for t in (q, k, v))
    fn = torch.compile(flex_attention) if q.is_cuda else flex_attention
    with warnings.catch_warnings():  # uncompiled on CPU: torch says so on every call
        warnings.simplefilter('ignore')
        out = fn(qr, kr, vr, block_mask=block_mask, scale=scale)
    return from_regions(out.reshape(B, nh, p2, w2, -1), n_win, (H, W))


def natten_na2d(q, k, v, kernel, dilation, scale, stride=1, is_causal=False):
    """natten's 2-D neighborhood attention (its own backend choice; no RPB). Raises ImportError without natten."""
    from natten.functional import na2d
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        causal = tuple(is_causal) if isinstance(is_causal, list) else is_causal  # a TOML array
        return na2d(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal, scale=scale)


# op anchors: name -> (op family, fn(inputs, **params)); inputs and params as `subjects.OP_FAMILIES` builds them
OP_ANCHORS: Dict[str, tuple] = {
    'natten': ('neighborhood', lambda t, kernel_size=7, dilation=1, scale=None, stride=1, is_causal=False, **_:
               natten_na2d(t['q'].detach(), t['k'].detach(), t['v'].detach(), kernel_size, dilation, scale, stride,
                           is_causal)),
    'sdpa_neighborhood': ('neighborhood', lambda t, kernel_size=7, dilation=1, scale=None, **_:
                          sdpa_neighborhood_attention(t['q'], t['k'], t['v'], (kernel_size,) * 2, (dilation,) * 2,
                                                      t.get('rpb'), scale)),
    'sdpa_dense': ('gna', lambda t, **_: dense_sdpa(t['q'], t['k'], t['v'])),
    'natten_gna': ('gna', lambda t, kernel_size=7, stride=1, dilation=1, is_causal=False, **_: natten_gna(
        t['q'].detach(), t['k'].detach(), t['v'].detach(), kernel_size, stride, dilation, is_causal)),
    'sdpa_window': ('window', lambda t, window_size=7, shift=0, scale=None, **_: sdpa_window_attention(
        t['q'], t['k'], t['v'], (window_size,) * 2, (shift,) * 2, t['rpb'], scale)),
    'routed_gather': ('routing', lambda t, n_win=7, topk=4, **_: routed_attention_gather(
        t['q'], t['k'], t['v'], n_win, topk, idx=t['idx'])),
    'flex_routed': ('routing', lambda t, n_win=7, topk=4, **_: flex_routed_attention(
        t['q'], t['k'], t['v'], n_win, t['idx'], t['scale'])),
}

# anchors without a CPU backward: measured forward only on CPU
FORWARD_ONLY_ON_CPU = {'natten': 'natten has no CPU backward (Flex)', 'natten_gna': 'natten has no CPU backward (Flex)',
                       'flex_routed': 'no CPU backward in torch'}

PATCHES: Dict[str, Callable[[], contextlib.AbstractContextManager]] = {'gather_baseline': gather_baseline}
