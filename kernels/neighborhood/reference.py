"""Generalized neighborhood attention (GNA: NA, DiNA, strided and blocked, causal) in pure PyTorch, 1-D / 2-D / 3-D.

The CPU production path, the export / TorchScript path and the ground truth of the Triton kernels.
Tensors are channels-last with heads split out: ``(B, *spatial, heads, head_dim)``.

Semantics (NATTEN 0.21.7 ``na1d / na2d / na3d``): the mask is the AND of one mask per axis. Per axis of length
``n`` with kernel ``k``, stride ``s`` and dilation ``d`` (``s <= k``, ``k * d <= n``):
  * position ``i`` lives in dilation group ``g = i % d`` at sub-index ``p = i // d``; the group has
    ``L_g = ceil((n - g) / d)`` positions (ragged groups when d does not divide n); keys come from the same group;
  * non-causal: the stride group of ``p`` has leader ``l = min((p // s) * s + s // 2, L_g - 1)``, the window
    centre is ``clamp(l, k // 2, L_g - 1 - right)`` with ``right = k // 2 - (1 - k % 2)`` (even kernels have one
    more key on the left), and the window is the ``k`` sub-positions around it: every query of a stride group
    shares it, windows shift (not shrink) at the borders;
  * causal: ``l = min((p // s) * s + s - 1, L_g - 1)``, keys ``l - k < p' <= p`` (fewer than k early on);
  * the optional relative-position bias of query ``p`` and key ``p'`` is ``rpb[head, ..., p' - p + k - 1, ...]``
    per axis (offsets in the dilation group), as NATTEN <= 0.17 defined it; not defined with a causal axis.

Implementation: per axis, the dilation groups are cut into query tiles of ``T`` sub-positions (a multiple of the
stride, so a tile holds whole stride groups) and each tile gathers the halo of keys covering all its windows,
``T - s + k`` positions (windows are monotone in the query). The tiles of all axes multiply into N-D tiles; each
runs one small dense attention (``F.scaled_dot_product_attention``, fp32 accumulation) under a 0 / -inf mask or
bias gathered from the per-axis offsets. Memory is O(N (T - s + k)^n) with no N x N term; a blocked configuration
(``s == k``, ``T == s``) gathers exactly its k keys per tile and needs no mask at all. In eager mode the tiles run
in batches of one shape each: per axis, a tile keeps only its real queries (a partial last tile is smaller, a tile
past a short dilation group is dropped) and the halo positions its windows reach (border windows shift rather than
slide, so border tiles reach fewer keys), so no padding query or unreachable key is computed; the tables are
cached per size. While exporting or scripted they are computed in the graph from the runtime size as one padded
batch, so one export runs at any size. ``impl='dense'`` is the same code with one tile per dilation group (small maps).
"""
import itertools
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .._cache import size_cache
from .._sizes import ceil_div
from ..backend import is_exporting

__all__ = ['neighborhood_attention_ref', 'gna_ref', 'gna_axis_window', 'gna_axis_mask', 'gna_tables', 'GNATables', 'GNATiles', 'tile_sizes',
           'use_dense', 'TILE', 'TILE_WIDE', 'TILE_1D', 'TILE_BIAS', 'TILE_MATH', 'DENSE_MAX_TOKENS']

# Query-tile targets (sub-grid positions per axis, rounded to a multiple of the stride), measured on CPU with the
# flash SDPA kernel: a tile of Tq queries computes its whole halo of scores, so smaller tiles waste fewer scores
# but pay more per-tile overhead, which its backward pays again. Best measured: 4 per axis (16 queries in 2-D, 64
# in 3-D) forward; with gradients 8 x 4 in 2-D; 16 in 1-D.
TILE = 4  # every axis, but the one below
TILE_WIDE = 8  # the first axis (height) in 2-D with gradients
TILE_1D = 16  # 1-D: or the kernel, if larger
# With a relative-position bias: a fixed one (inference) gathers whole batches per head, where halo bytes
# dominate (larger tiles share more of their halo); a learned one takes the math path, whose unfused score
# matrices favour smaller tiles.
TILE_BIAS = 8
TILE_MATH = 4
# On large maps the eager path gathers and attends about this many bytes of keys and values at a time (both passes
# with gradients, see `_ChunkedTiles`): cache-sized chunks, and allocations small enough that malloc keeps reusing
# them (forward alone at 112^2: 1.06-1.13x faster while malloc reuses the memory, up to 2.7x when it does not).
CHUNK_BYTES = 2 ** 20
# The automatic choice takes the dense path up to this many tokens: it bounds the extra memory to heads * N^2.
DENSE_MAX_TOKENS = 256


def _div(a, b: int):
    return torch.div(a, b, rounding_mode='floor')


def gna_axis_window(p: torch.Tensor, length: torch.Tensor, kernel: int, stride: int,
                    causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last key sub-index (inclusive) of the window of query sub-index `p` in a group of `length`."""
    if causal:
        lead = torch.minimum(_div(p, stride) * stride + (stride - 1), length - 1)
        return (lead - kernel + 1).clamp(min=0), p
    left = kernel // 2
    right = left - (1 - kernel % 2)
    lead = torch.minimum(_div(p, stride) * stride + stride // 2, length - 1)
    centre = torch.minimum(lead.clamp(min=left), length - 1 - right)
    return centre - left, centre + right


def gna_axis_mask(length: int, kernel: int, stride: int, dilation: int,
                  causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One axis over all positions: allowed (length, length) query-key pairs and key - query offsets in the
    dilation group (length, length). The N-D mask is the AND of the axes' (dense anchors and bounds, not the op)."""
    i = torch.arange(length)
    group, sub = i % dilation, _div(i, dilation)
    start, end = gna_axis_window(sub, _div(length - group + dilation - 1, dilation), kernel, stride, causal)
    allowed = (group[:, None] == group[None, :]) & (sub[None, :] >= start[:, None]) & (sub[None, :] <= end[:, None])
    return allowed, sub[None, :] - sub[:, None]


def tile_sizes(kernel: List[int], stride: List[int], target: Optional[int] = None, grad: bool = False) -> List[int]:
    """Query-tile side per axis: the stride on a blocked axis (stride == kernel: a tile gathers exactly its k keys
    and needs no mask) or when the stride is 4 or more (one stride group per tile), else the multiple of the stride
    nearest to `target`, by default the measured per-axis targets (TILE, TILE_WIDE with `grad`, TILE_1D)."""
    n = len(kernel)
    sides: List[int] = []
    for a in range(n):
        k, s = kernel[a], stride[a]
        t = (max(16, k) if n == 1 else (8 if grad and n == 2 and a == 0 else 4)) if target is None else target
        sides.append(s if s == k or s >= 4 else s * max(1, (t + s // 2) // s))  # TorchScript: no globals above
    return sides


def _axis_tiles(length: int, kernel: int, stride: int, dilation: int, causal: bool, tile: int, dense: bool,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor]:
    """One axis: per (dilation group, tile) = P tiles, query positions (P, T) and halo positions (P, Th) in the
    full axis (-1: padding), key offsets (P, T, Th) (p' - p + k - 1 in the window, 2k - 1 off it, 2k for a
    padding query), the tile (length,) and slot (length,) of every position, and per tile its number of queries
    (P,) (a prefix of its slots) and of halo positions its windows reach (P,) (a prefix of its halo).
    `length` may be symbolic."""
    i = torch.arange(length, device=device)
    if dense:  # one tile per group covering all of it (eager only: sizes are ints)
        tile = ceil_div(ceil_div(length, dilation), stride) * stride
    n_tiles = ceil_div(ceil_div(length, dilation), tile)
    halo = ceil_div(length, dilation) if dense else tile - stride + kernel
    g = torch.arange(dilation, device=device)[:, None, None]
    t = torch.arange(n_tiles, device=device)[None, :, None]
    group_len = _div(i[-1:, None, None] - g, dilation) + 1  # (G, 1, 1): ragged groups are shorter
    p = t * tile + torch.arange(tile, device=device)  # (1, nT, T)
    q_ok = p < group_len
    start, end = gna_axis_window(p, group_len, kernel, stride, causal)  # (G, nT, T)
    h0 = torch.zeros_like(start[..., :1]) if dense else start[..., :1]  # windows are monotone: the first starts
    h = h0 + torch.arange(halo, device=device)  # (G, nT, Th)
    h_ok = (h >= 0) & (h < group_len)
    hq = h[:, :, None, :]
    in_window = (hq >= start[..., None]) & (hq <= end[..., None]) & h_ok[:, :, None, :]
    rel = torch.where(in_window, hq - p[..., None] + (kernel - 1), 2 * kernel - 1)
    rel = torch.where(q_ok[..., None], rel, 2 * kernel)
    q_pos = torch.where(q_ok, g + dilation * p, -1)
    h_pos = torch.where(h_ok, g + dilation * h, -1)
    sub = _div(i, dilation)
    tile_of = (i - dilation * sub) * n_tiles + _div(sub, tile)
    slot = sub - _div(sub, tile) * tile
    P = dilation * n_tiles
    count = q_ok.sum(-1).reshape(P)
    reach = torch.where(q_ok, end, -1).amax(-1, keepdim=True) - h0 + 1
    return (q_pos.reshape(P, tile), h_pos.reshape(P, halo), rel.reshape(P, tile, halo), tile_of, slot, count,
            reach.clamp(min=0).reshape(P))


def _place(t: torch.Tensor, axis: int, n: int, groups: List[int]) -> torch.Tensor:
    """View a per-axis table (its dims in `groups` order) so it broadcasts into the N-D layout whose dims are
    [P_1..P_n] [T_1..T_n] [Th_1..Th_n] (one block per entry of `groups`, `axis` within each)."""
    shape: List[int] = []
    for j in range(len(groups)):
        for a in range(n):
            shape.append(t.shape[j] if a == axis else 1)
    return t.reshape(shape)


class GNATiles(NamedTuple):
    """One batch of equally shaped tiles (its slots in the tables' query and halo indices follow the batches
    before it)."""
    # index of each (tile, query slot, halo slot) into the padded bias table (see `_bias_table`), stored as distinct
    # patterns (U, Tq, Tk) and the pattern of each tile (tiles,): interior tiles share one pattern, so the rpb
    # gather and its gradient scatter touch U << tiles patterns (no dedup in graph form: U = tiles)
    bias_patterns: torch.Tensor
    tile_pattern: torch.Tensor
    mask: Optional[torch.Tensor]  # (1, tiles, Tq, Tk) additive 0 / -inf mask, None when nothing is masked
    tile_shape: List[int]  # [tiles, Tq, Tk]


class GNATables(NamedTuple):
    """Index tables of one configuration at one size; tokens index the flattened map. The tiles come in one or
    more batches of one shape each (eager: one per shape of query tile and halo, so border and partial tiles
    compute no padding; graph form: one padded batch)."""
    # padding slots read token 0: their scores are masked (keys) or their outputs never read (queries)
    query_index: torch.Tensor  # (sum of tiles * Tq,) query token of each tile slot, batch after batch
    halo_index: torch.Tensor  # (sum of tiles * Tk,) key token of each halo slot
    out_index: torch.Tensor  # (N,) row of each token in the batches' outputs, concatenated
    parts: List[GNATiles]


def _combine(qs: List[torch.Tensor], hs: List[torch.Tensor], rels: List[torch.Tensor], sizes: List[int],
             kernel: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis tiles (P_a, T_a), halos (P_a, Th_a) and offsets (P_a, T_a, Th_a) -> N-D tiles (P, Tq) query tokens,
    (P, Tk) halo tokens, their padding flags and (P, Tq, Tk) indices into the padded bias table."""
    n = len(qs)
    device = qs[0].device
    q_tok = torch.zeros([1], dtype=torch.long, device=device)
    h_tok = torch.zeros([1], dtype=torch.long, device=device)
    q_bad = torch.zeros([1], dtype=torch.bool, device=device)
    h_bad = torch.zeros([1], dtype=torch.bool, device=device)
    bias = torch.zeros([1], dtype=torch.long, device=device)
    token_stride = 1
    bias_stride = 1
    for a in range(n):
        token_stride = token_stride * sizes[a]
        bias_stride = bias_stride * (2 * kernel[a] + 1)
    P, Tq, Tk = 1, 1, 1
    for a in range(n):
        token_stride = token_stride // sizes[a]
        bias_stride = bias_stride // (2 * kernel[a] + 1)
        q_tok = q_tok + _place(qs[a], a, n, [0, 1]) * token_stride
        h_tok = h_tok + _place(hs[a], a, n, [0, 2]) * token_stride
        q_bad = q_bad | _place(qs[a] < 0, a, n, [0, 1])
        h_bad = h_bad | _place(hs[a] < 0, a, n, [0, 2])
        bias = bias + _place(rels[a], a, n, [0, 1, 2]) * bias_stride
        P, Tq, Tk = P * qs[a].shape[0], Tq * qs[a].shape[1], Tk * hs[a].shape[1]
    return (q_tok.reshape(P, Tq), q_bad.reshape(P, Tq), h_tok.reshape(P, Tk), h_bad.reshape(P, Tk),
            bias.reshape(P, Tq, Tk))


def _tiles(bias: torch.Tensor, kernel: List[int], eager: bool) -> GNATiles:
    P, Tq, Tk = bias.shape[0], bias.shape[1], bias.shape[2]
    zeros = _bias_table(None, kernel, torch.float32, bias.device).reshape(-1)[bias]  # (P, Tq, Tk) 0 / -inf
    mask: Optional[torch.Tensor] = zeros.unsqueeze(0)
    patterns, tile_pattern = bias, torch.arange(P, device=bias.device)
    if eager:
        if not bool((zeros != 0).any()):  # e.g. blocked attention on a map the kernel divides
            mask = None
        patterns, tile_pattern = torch.unique(bias.reshape(P, -1), dim=0, return_inverse=True)
        patterns = patterns.reshape(-1, Tq, Tk)
    return GNATiles(patterns, tile_pattern, mask, [P, Tq, Tk])


def _build_tables(sizes: List[int], kernel: List[int], stride: List[int], dilation: List[int], causal: List[bool],
                  tile: List[int], dense: bool, device: torch.device, eager: bool, split: bool = True) -> GNATables:
    n = len(sizes)
    axes = [_axis_tiles(sizes[a], kernel[a], stride[a], dilation[a], causal[a], tile[a], dense, device)
            for a in range(n)]
    if not torch.jit.is_scripting():
        if eager and split:
            return _build_parts(axes, sizes, kernel)
    q_tok, q_bad, h_tok, h_bad, bias = _combine([ax[0] for ax in axes], [ax[1] for ax in axes],
                                                [ax[2] for ax in axes], sizes, kernel)
    tile_flat = torch.zeros([1], dtype=torch.long, device=device)
    slot_flat = torch.zeros([1], dtype=torch.long, device=device)
    for a in range(n):
        tile_flat = tile_flat * axes[a][0].shape[0] + axes[a][3].reshape([-1 if b == a else 1 for b in range(n)])
        slot_flat = slot_flat * axes[a][0].shape[1] + axes[a][4].reshape([-1 if b == a else 1 for b in range(n)])
    out_index = (tile_flat * q_tok.shape[1] + slot_flat).reshape(-1)
    return GNATables(torch.where(q_bad, 0, q_tok).reshape(-1), torch.where(h_bad, 0, h_tok).reshape(-1), out_index,
                     [_tiles(bias, kernel, eager)])


def _build_parts(axes: List[Tuple[torch.Tensor, ...]], sizes: List[int], kernel: List[int]) -> GNATables:
    """Eager tables: per axis, tiles grouped by (queries, halo reach) and cut to it; one batch per combination."""
    classes = []
    for _, _, _, _, _, count, reach in axes:
        shapes = torch.unique(torch.stack([count, reach], 1), dim=0).tolist()
        classes.append([(torch.nonzero((count == c) & (reach == r))[:, 0], c, r) for c, r in shapes if c > 0])
    n_tokens = 1
    for s in sizes:
        n_tokens *= s
    out_index = torch.full([n_tokens], -1, dtype=torch.long, device=axes[0][0].device)
    parts: List[GNATiles] = []
    q_index: List[torch.Tensor] = []
    h_index: List[torch.Tensor] = []
    rows = 0
    for combo in itertools.product(*classes):
        qs = [ax[0][idx, :c] for ax, (idx, c, r) in zip(axes, combo)]
        hs = [ax[1][idx, :r] for ax, (idx, c, r) in zip(axes, combo)]
        rels = [ax[2][idx, :c, :r] for ax, (idx, c, r) in zip(axes, combo)]
        q_tok, _, h_tok, _, bias = _combine(qs, hs, rels, sizes, kernel)  # cut to real slots: no padding
        out_index[q_tok.reshape(-1)] = torch.arange(rows, rows + q_tok.numel(), device=q_tok.device)
        rows += q_tok.numel()
        q_index.append(q_tok.reshape(-1))
        h_index.append(h_tok.reshape(-1))
        parts.append(_tiles(bias, kernel, True))
    assert rows == n_tokens and bool((out_index >= 0).all()), 'GNA tiles must cover every token once'
    return GNATables(torch.cat(q_index), torch.cat(h_index), out_index, parts)


_cached_tables = size_cache(64)(_build_tables)


def _cache_key(x):
    return tuple(x)


def gna_tables(sizes: List[int], kernel: List[int], stride: List[int], dilation: List[int], causal: List[bool],
               tile: Optional[List[int]] = None, dense: bool = False, device=None, split: bool = True) -> GNATables:
    """The index tables of the tiled path (cached per configuration and size; eager sizes only). split=False: one
    padded batch of tiles (the form `_tiled_per_head` takes)."""
    tile = tile_sizes(kernel, stride) if tile is None else list(tile)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        sizes = [int(s) for s in sizes]
    return _cached_tables(_cache_key(sizes), _cache_key(kernel), _cache_key(stride), _cache_key(dilation),
                          _cache_key(causal), _cache_key(tile), dense, torch.device(device or 'cpu'), True, split)


def _bias_table(rel_pos_bias: Optional[torch.Tensor], kernel: List[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """(heads or 1, 2k_1 + 1, ...) table: rpb (or 0) at offsets 0..2k-2, -inf at 2k - 1 (off-window) on any
    axis, 0 at 2k (padding query) on any axis, so a padding query never has an all -inf row."""
    n = len(kernel)
    if rel_pos_bias is None:
        table = torch.zeros([1] + [2 * kernel[a] - 1 for a in range(n)], dtype=dtype, device=device)
    else:
        table = rel_pos_bias.to(dtype)
    pad: List[int] = []
    for _ in range(n):
        pad = pad + [0, 1]
    table = F.pad(table, pad, value=float('-inf'))
    return F.pad(table, pad, value=0.)


def use_dense(sizes: List[int]) -> bool:
    """Whether the automatic choice takes the dense path for this map size."""
    n_tokens = 1
    for s in sizes:
        n_tokens = n_tokens * s
    return n_tokens <= DENSE_MAX_TOKENS


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N, heads, e) -> (N, B * heads * e): one row per token (a view when B == 1), so every gather and its
    gradient scatter move whole rows (index_select along any other dim runs an order of magnitude slower on CPU)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _learned(bias: Optional[torch.Tensor]) -> bool:
    """Whether `bias` needs its score gradient, which the fused kernel does not give (the matmul path)."""
    return bias is not None and bias.requires_grad and torch.is_grad_enabled()


def _per_image_head(index: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """index (L,) into one (image, head) -> (groups * L,) into `groups` blocks of `stride` rows."""
    return (torch.arange(groups, device=index.device)[:, None] * stride + index).reshape(-1)


def _tiled_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: GNATables, bias: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """`_tiled_attention` with a bias (heads or 1, P, Tq, Tk) on a batch, on tables of one batch of tiles: tiles
    are gathered straight into (B, heads * P, T, d), contiguous for batched matmuls, so the bias broadcasts over
    the batch. A bias that needs its gradient, which the fused kernel does not give, takes matmuls and a plain
    softmax (SDPA's own math path also scans for fully masked rows, which never occur here)."""
    B, N, nh, d = q.shape
    dv = v.shape[-1]
    P, Tq, Tk = tables.parts[0].tile_shape[0], tables.parts[0].tile_shape[1], tables.parts[0].tile_shape[2]
    qi = _per_image_head(tables.query_index, B * nh, N)
    ki = _per_image_head(tables.halo_index, B * nh, N)
    qt = q.transpose(1, 2).reshape(-1, d).index_select(0, qi).view(B, -1, Tq, d)
    kt = k.transpose(1, 2).reshape(-1, d).index_select(0, ki).view(B, -1, Tk, d)
    vt = v.transpose(1, 2).reshape(-1, dv).index_select(0, ki).view(B, -1, Tk, dv)
    bias = bias.to(q.dtype).expand(nh, P, Tq, Tk).reshape(1, nh * P, Tq, Tk)
    if _learned(bias):
        out = torch.softmax(torch.matmul(qt, kt.transpose(-2, -1)) * scale + bias, dim=-1) @ vt
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale)
    oi = _per_image_head(tables.out_index, B * nh, P * Tq).view(B, nh, N).transpose(1, 2).reshape(-1)
    return out.reshape(-1, dv).index_select(0, oi).view(B, N, nh, dv)


def _per_head(bias: Optional[torch.Tensor], batch: int) -> bool:
    """Whether a bias takes `_tiled_per_head`: per head on a batch, or learned."""
    return bias is not None and ((bias.shape[0] != 1 and batch != 1) or _learned(bias))


def _chunks(tables: GNATables, masks: List[Optional[torch.Tensor]], slot_bytes: int, chunk_bytes: int):
    """(query slots, halo slots, mask, tiles, Tq, Tk) of every chunk of every batch, in output order; a halo slot
    gathers `slot_bytes` of keys and values."""
    q0, h0 = 0, 0
    for part, mask in zip(tables.parts, masks):
        P, Tq, Tk = part.tile_shape
        chunk = _chunk_tiles(P, Tk * slot_bytes, chunk_bytes)
        for c0 in range(0, P, chunk):
            n = min(chunk, P - c0)
            yield (tables.query_index[q0 + c0 * Tq:q0 + (c0 + n) * Tq], tables.halo_index[h0 + c0 * Tk:h0 + (c0 + n) * Tk],
                   None if mask is None else mask[c0:c0 + n], n, Tq, Tk)
        q0, h0 = q0 + P * Tq, h0 + P * Tk


def _gather(rq: torch.Tensor, rk: torch.Tensor, rv: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, n: int,
            G: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (N, G * e) and the slots of n tiles -> the tiles as strided views (n, G, T, e) of the gathered
    (n, T, G, e), the layout the CPU flash kernel reads."""
    return (rq.index_select(0, qi).view(n, -1, G, rq.shape[1] // G).transpose(1, 2),
            rk.index_select(0, ki).view(n, -1, G, rk.shape[1] // G).transpose(1, 2),
            rv.index_select(0, ki).view(n, -1, G, rv.shape[1] // G).transpose(1, 2))


def _eager_tiles(rq: torch.Tensor, rk: torch.Tensor, rv: torch.Tensor, tables: GNATables,
                 masks: List[Optional[torch.Tensor]], scale: float, G: int, chunk_bytes: int,
                 with_lse: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Eager tables, chunk by chunk: gather, attend (the flash kernel; with its log-sum-exp if `with_lse`) ->
    output rows in (batch, tile, slot) order (R, G * dv) and the chunks' log-sum-exps."""
    d, dv = rq.shape[1] // G, rv.shape[1] // G
    outs: List[torch.Tensor] = []
    lses: List[torch.Tensor] = []
    for qi, ki, m, n, Tq, Tk in _chunks(tables, masks, G * (d + dv) * rq.element_size(), chunk_bytes):
        qt, kt, vt = _gather(rq, rk, rv, qi, ki, n, G)
        if with_lse:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=m,
                                                                                scale=scale)
            lses.append(lse)
        else:
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=scale)
        outs.append(o.transpose(1, 2).reshape(n * Tq, G * dv))  # (n, Tq, G, dv) in memory
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), lses


class _ChunkedTiles(torch.autograd.Function):
    """The eager training path on large maps (CPU, shared masks, no autocast): `_eager_tiles` in both passes,
    saving only q, k, v, the output rows and the log-sum-exps; the backward gathers each chunk again and adds its
    gradients in place, so no halo-sized buffer (4-5x the keys and values at stride 1) lives between the passes."""

    @staticmethod
    def forward(ctx, rq, rk, rv, tables, masks, scale, G, chunk_bytes):
        rows, lses = _eager_tiles(rq, rk, rv, tables, masks, scale, G, chunk_bytes, with_lse=True)
        ctx.save_for_backward(rq, rk, rv, rows, *lses)
        ctx.tables, ctx.masks, ctx.scale, ctx.G, ctx.chunk_bytes = tables, masks, scale, G, chunk_bytes
        return rows.index_select(0, tables.out_index)

    @staticmethod
    def backward(ctx, grad):
        rq, rk, rv, rows, *lses = ctx.saved_tensors
        G = ctx.G
        d, dv = rq.shape[1] // G, rv.shape[1] // G
        grad = grad.index_select(0, ctx.tables.query_index)  # eager tables: each slot is one real query
        dq, dk, dvv = torch.zeros_like(rq), torch.zeros_like(rk), torch.zeros_like(rv)
        r0 = 0
        chunks = _chunks(ctx.tables, ctx.masks, G * (d + dv) * rq.element_size(), ctx.chunk_bytes)
        for (qi, ki, m, n, Tq, Tk), lse in zip(chunks, lses):
            qt, kt, vt = _gather(rq, rk, rv, qi, ki, n, G)
            ot = rows[r0:r0 + n * Tq].view(n, Tq, G, dv).transpose(1, 2)
            go = grad[r0:r0 + n * Tq].view(n, Tq, G, dv).transpose(1, 2)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                go, qt, kt, vt, ot, lse, 0.0, False, attn_mask=m, scale=ctx.scale)
            dq.index_add_(0, qi, gq.transpose(1, 2).reshape(n * Tq, G * d))
            dk.index_add_(0, ki, gk.transpose(1, 2).reshape(n * Tk, G * d))
            dvv.index_add_(0, ki, gv.transpose(1, 2).reshape(n * Tk, G * dv))
            r0 += n * Tq
        return dq, dk, dvv, None, None, None, None, None


def _tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: GNATables,
                     masks: List[Optional[torch.Tensor]], scale: float, chunk_bytes: int = 0) -> torch.Tensor:
    """q, k, v (B, N, heads, d); per batch of tiles a mask None, (1, P, Tq, Tk) (shared by the heads) or
    (heads, P, Tq, Tk) -> (B, N, heads, d). Tiles are strided views (P, B * heads, T, d) of the gathered rows
    (P, T, B * heads, d), the layout the CPU flash kernel reads and writes, so nothing is copied between the gathers
    and the attention; a shared mask broadcasts over batch and heads (and a per-head bias over the heads of one
    image). chunk_bytes (eager tables only): > 0, no gradients: batches whose keys and values exceed
    4 * chunk_bytes gather and attend chunks of about chunk_bytes, each chunk's halo still in cache when the
    attention reads it; < 0, with gradients: the same in both passes (`_ChunkedTiles`) when all tiles' keys and
    values exceed 4 * -chunk_bytes; else one gather per input for all batches (so its gradient is one scatter)."""
    B, N, nh, d = q.shape
    if len(masks) == 1:
        bias = masks[0]
        if bias is not None and _per_head(bias, B):
            return _tiled_per_head(q, k, v, tables, bias, scale)
    dv = v.shape[-1]
    rq, rk, rv = _rows(q), _rows(k), _rows(v)
    shared: List[Optional[torch.Tensor]] = []
    for m in masks:
        shared.append(None if m is None else m.to(q.dtype).transpose(0, 1))  # (P, 1 or heads, Tq, Tk)
    if not torch.jit.is_scripting():
        if chunk_bytes > 0:
            out = _eager_tiles(rq, rk, rv, tables, shared, scale, B * nh, chunk_bytes)[0]
            return out.index_select(0, tables.out_index).view(N, B, nh, dv).transpose(0, 1)
        halo_bytes = tables.halo_index.numel() * B * nh * (d + dv) * q.element_size()
        if (chunk_bytes < 0 and halo_bytes > -4 * chunk_bytes and q.device.type == 'cpu'
                and not torch.is_autocast_enabled('cpu')):
            out = _ChunkedTiles.apply(rq, rk, rv, tables, shared, scale, B * nh, -chunk_bytes)
            return out.view(N, B, nh, dv).transpose(0, 1)
    q_sizes: List[int] = []
    h_sizes: List[int] = []
    for part in tables.parts:
        q_sizes.append(part.tile_shape[0] * part.tile_shape[1])
        h_sizes.append(part.tile_shape[0] * part.tile_shape[2])
    qg = rq.index_select(0, tables.query_index).split(q_sizes)
    kg = rk.index_select(0, tables.halo_index).split(h_sizes)
    vg = rv.index_select(0, tables.halo_index).split(h_sizes)
    outs: List[torch.Tensor] = []
    for c, mask in enumerate(shared):
        P, Tq, Tk = tables.parts[c].tile_shape[0], tables.parts[c].tile_shape[1], tables.parts[c].tile_shape[2]
        qt = qg[c].view(P, Tq, B * nh, d).transpose(1, 2)
        kt = kg[c].view(P, Tk, B * nh, d).transpose(1, 2)
        vt = vg[c].view(P, Tk, B * nh, dv).transpose(1, 2)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        outs.append(o.transpose(1, 2).reshape(P * Tq, B * nh * dv))  # (P, Tq, B * heads, dv) in memory
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, tables.out_index).view(N, B, nh, dv).transpose(0, 1)


def _chunk_bytes(grad: bool) -> int:
    """Chunk size of the eager path: CHUNK_BYTES without gradients, -CHUNK_BYTES with them."""
    return -CHUNK_BYTES if grad else CHUNK_BYTES


def _chunk_tiles(tiles: int, tile_bytes: int, chunk_bytes: int) -> int:
    """Tiles per chunk of a batch whose tiles gather `tile_bytes` of keys and values each: all of them unless
    they exceed 4 * chunk_bytes (> 0), else equal chunks of about chunk_bytes."""
    total = tiles * tile_bytes
    if chunk_bytes <= 0 or total <= 4 * chunk_bytes:
        return tiles
    return ceil_div(tiles, ceil_div(total, chunk_bytes))


def gna_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: List[int], stride: List[int],
            dilation: List[int], is_causal: List[bool], rel_pos_bias: Optional[torch.Tensor] = None,
            scale: Optional[float] = None, impl: str = 'auto', tile: Optional[List[int]] = None) -> torch.Tensor:
    """N-D generalized neighborhood attention on validated inputs.

    q, k, v: (B, *spatial, heads, head_dim) (v may have its own head_dim) -> (B, *spatial, heads, v head_dim).
    kernel_size, stride, dilation, is_causal: one entry per spatial axis. rel_pos_bias: (heads, 2k_1 - 1, ...).
    impl: 'gather' (tiles and halos, O(N) memory), 'dense' (one tile per dilation group: O(N^2)) or 'auto' (dense only for small
    maps; always the in-graph tiled form while exporting or scripted). tile: query-tile side per axis (eager).
    """
    n = len(kernel_size)
    sizes: List[int] = []
    for a in range(n):
        sizes.append(q.shape[1 + a])
    logit_scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl not in ('auto', 'gather', 'dense'):
        raise ValueError(f"impl: expected 'auto', 'gather' or 'dense', got '{impl}'")
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if tile is None:
        target: Optional[int] = None
        if rel_pos_bias is not None:  # TILE_MATH for a learned bias (unfused scores), TILE_BIAS for a fixed one
            target = 4 if _learned(rel_pos_bias) else 8
        tile = tile_sizes(kernel_size, stride, target, grad)
    if not torch.jit.is_scripting():
        if not is_exporting() and not torch.compiler.is_compiling():
            if impl == 'auto':
                impl = 'dense' if use_dense(sizes) else 'gather'
            split = not _per_head(rel_pos_bias, q.shape[0])  # the per-head path takes one batch of tiles
            tables = gna_tables(sizes, kernel_size, stride, dilation, is_causal, tile, impl == 'dense', q.device, split)
            return _run(q, k, v, tables, kernel_size, rel_pos_bias, logit_scale, _chunk_bytes(grad))
    if impl == 'dense':
        raise ValueError("impl: 'dense' runs in eager mode only (its tables depend on the size); use 'auto'")
    tables = _build_tables(sizes, kernel_size, stride, dilation, is_causal, tile, False, q.device, False)
    return _run(q, k, v, tables, kernel_size, rel_pos_bias, logit_scale)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: GNATables, kernel_size: List[int],
         rel_pos_bias: Optional[torch.Tensor], logit_scale: float, chunk_bytes: int = 0) -> torch.Tensor:
    n = len(kernel_size)
    B, nh, d = q.shape[0], q.shape[-2], q.shape[-1]
    table: Optional[torch.Tensor] = None
    if rel_pos_bias is not None:
        table = _bias_table(rel_pos_bias, kernel_size, rel_pos_bias.dtype, q.device).reshape(nh, -1)
    masks: List[Optional[torch.Tensor]] = []
    for part in tables.parts:
        mask = part.mask
        if table is not None:
            patterns = part.bias_patterns
            mask = table.index_select(1, patterns.reshape(-1)).reshape(nh, patterns.shape[0], patterns.shape[1],
                                                                       patterns.shape[2])
            mask = mask.index_select(1, part.tile_pattern)  # heads, P, Tq, Tk
        masks.append(mask)
    N = q.shape[1]
    for a in range(1, n):
        N = N * q.shape[1 + a]
    out = _tiled_attention(q.reshape(B, N, nh, d), k.reshape(B, N, nh, d), v.reshape(B, N, nh, v.shape[-1]),
                           tables, masks, logit_scale, chunk_bytes)
    return out.reshape(list(q.shape[:-1]) + [v.shape[-1]])


def neighborhood_attention_ref(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: Tuple[int, int],
        dilation: Tuple[int, int] = (1, 1),
        rel_pos_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        impl: str = 'auto',
) -> torch.Tensor:
    """2-D NA / DiNA (stride 1, not causal) on validated inputs: (B, H, W, heads, d) -> (B, H, W, heads, d)."""
    return gna_ref(q, k, v, [kernel_size[0], kernel_size[1]], [1, 1], [dilation[0], dilation[1]], [False, False],
                   rel_pos_bias, scale, impl)
