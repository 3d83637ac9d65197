"""Neighborhood attention (NA / DiNA) in pure PyTorch: the ground truth and the CPU / ONNX path.

Tensors are channels-last with heads split out: ``(B, H, W, heads, head_dim)``.

Semantics (NATTEN; verified against natten 0.17.5 with RPB and 0.21.7 without), per axis of length
``L`` with odd kernel ``k``, dilation ``d`` and ``k * d <= L``:
  * position ``i`` lives in the dilation sub-grid of residue ``r = i % d`` at sub-index ``p = i // d``;
    that sub-grid has ``L_r = ceil((L - r) / d)`` positions (ragged: the last groups may be one shorter);
  * its window is the ``k`` sub-grid positions starting at ``clamp(p - k // 2, 0, L_r - k)``: windows
    are shifted, not truncated, at the borders, so every query sees exactly ``kh * kw`` keys;
  * the relative-position bias for query sub-index ``p`` and key sub-index ``s`` is
    ``rpb[head, s_row - p_row + kh - 1, s_col - p_col + kw - 1]``.

Two implementations:
  * ``gather`` (default): the dilation sub-grids are cut into query tiles of at most ``TILE x TILE``;
    each tile gathers the halo of keys that covers all its clamped windows, ``(T + kh - 1) x (T + kw - 1)``,
    and runs a small dense attention with an additive bias / -inf mask gathered from a cached index table.
    Sub-grid permutation, padding and tiling are all folded into cached gather indices, so memory is
    O(N (T + k - 1)^2) with no N x N term, and the matmuls are batched GEMMs.
  * ``dense``: manual ``softmax(q k^T + bias) v`` over all N keys with a scattered -inf mask; O(N^2)
    memory, chosen automatically only for small maps (``DENSE_MAX_TOKENS``).

While a model is exported (``is_exporting()``), the automatic choice is `_na_export`: the gather path's tiles
and halos with fixed-size tiles, gathered separably per axis, and every index computed in the graph from the
runtime size (no cache, no branch on the size), so one ONNX export runs at any H x W.
"""
import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from .._cache import size_cache
from .._sizes import ceil_div
from ..backend import is_exporting

__all__ = ['neighborhood_attention_ref', 'na_axis_tables', 'na_tables', 'na_tile_tables', 'dense_mask',
           'use_dense', 'NATileTables', 'TILE', 'DENSE_MAX_TOKENS']

TILE = 4  # max query-tile side of the gather path (per axis, in sub-grid positions; fastest on CPU for k=3..11)
# The automatic choice takes the dense path up to this many tokens (crossover measured on a 2-core CPU
# with bench/na_cpu.py); it bounds the dense path's extra memory to heads * N^2 floats per image.
DENSE_MAX_TOKENS = 256


def _static_sizes(H, W) -> Optional[Tuple[int, int]]:
    """(H, W) as ints for the table caches, or None while dynamo traces (tables then go into the graph).

    TorchScript tracing (the legacy ONNX exporter) hands sizes over as tensors; they are frozen to
    ints so the tables become constants (only an explicit impl='gather' / 'dense' gets here while exporting:
    the automatic choice takes `_na_export`, whose tables follow the runtime size).
    """
    if torch.compiler.is_compiling():
        return None
    if isinstance(H, int) and isinstance(W, int):
        return H, W
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        return int(H), int(W)


def _div(a, b):
    return torch.div(a, b, rounding_mode='floor')


def na_axis_tables(length: int, kernel: int, dilation: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query position along one axis: key positions (length, kernel) and rpb offsets (length, kernel)."""
    i = torch.arange(length, device=device)
    r = i % dilation
    p = _div(i, dilation)
    sub_len = _div(length - r + dilation - 1, dilation)
    start = torch.minimum((p - kernel // 2).clamp(min=0), sub_len - kernel)
    sub = start[:, None] + torch.arange(kernel, device=device)[None, :]
    return r[:, None] + dilation * sub, sub - p[:, None] + kernel - 1


def _build_tables(H: int, W: int, kernel: Tuple[int, int], dilation: Tuple[int, int], device) -> Tuple[
        torch.Tensor, torch.Tensor]:
    kh, kw = kernel
    rk, rr = na_axis_tables(H, kh, dilation[0], device)
    ck, cr = na_axis_tables(W, kw, dilation[1], device)
    key_index = (rk[:, None, :, None] * W + ck[None, :, None, :]).reshape(H * W, kh * kw)
    bias_index = (rr[:, None, :, None] * (2 * kw - 1) + cr[None, :, None, :]).reshape(H * W, kh * kw)
    return key_index, bias_index


_cached_tables = size_cache(64)(_build_tables)


def na_tables(H: int, W: int, kernel: Tuple[int, int], dilation: Tuple[int, int], device=None) -> Tuple[
        torch.Tensor, torch.Tensor]:
    """Per query: key index (N, kh*kw) into the flattened map and bias index (N, kh*kw) into rpb.flatten(1)."""
    sizes = _static_sizes(H, W)
    if sizes is not None:
        H, W = sizes
        return _cached_tables(H, W, tuple(kernel), tuple(dilation), torch.device(device or 'cpu'))
    return _build_tables(H, W, kernel, dilation, device)


class NATileTables(NamedTuple):
    """Index tables of the gather path; tokens index the flattened map, N means 'zero padding token'."""
    query_index: torch.Tensor  # (tiles, T*T) query token of each tile slot
    halo_index: torch.Tensor  # (tiles, halo) key token of each halo slot
    out_index: torch.Tensor  # (N,) tile slot of each token, to undo the tiling
    mask: torch.Tensor  # (tiles, T*T, halo) additive 0 / -inf mask (the bias without rpb)
    # bias index of each (tile, query slot, halo slot) into [rpb.flatten(1), 0 (padding query), -inf (not a
    # neighbor)], stored as distinct patterns (P, T*T, halo) and the pattern of each tile (tiles,): interior
    # tiles share one pattern, so the rpb gather and its gradient scatter touch P << tiles patterns.
    bias_patterns: torch.Tensor
    tile_pattern: torch.Tensor


def _axis_tiles(length: int, kernel: int, dilation: int, tile: int, device):
    """Per axis, for each (dilation group, tile): query positions (G, nT, T), halo positions (G, nT, Th)
    (-1 = padding), rpb offsets (G, nT, T, Th) with -1 off-window and -2 for padding queries, slot of each
    position (length,) as (group, tile, offset) triples."""
    sub_max = -(-length // dilation)
    n_tiles = -(-sub_max // tile)
    T = -(-sub_max // n_tiles)
    halo = T + kernel - 1
    g = torch.arange(dilation, device=device)[:, None, None]
    t = torch.arange(n_tiles, device=device)[None, :, None]
    sub_len = _div(length - g + dilation - 1, dilation)  # (G, 1, 1): ragged groups are shorter
    p = t * T + torch.arange(T, device=device)  # (1, nT, T) query sub-index
    q_ok = p < sub_len
    q_pos = torch.where(q_ok, g + dilation * p, -1)
    # windows start at clamp(p - k//2, 0, L_g - k), non-decreasing in p: the tile's halo starts at its first
    h_sub = torch.minimum((t * T - kernel // 2).clamp(min=0), sub_len - kernel) + torch.arange(halo, device=device)
    h_pos = torch.where(h_sub < sub_len, g + dilation * h_sub, -1)
    start = torch.minimum((p - kernel // 2).clamp(min=0), sub_len - kernel)
    off = h_sub[:, :, None, :] - start[..., None]  # (G, nT, T, Th): key offset inside the query's window
    rel = torch.where((off >= 0) & (off < kernel), h_sub[:, :, None, :] - p[..., None] + kernel - 1, -1)
    rel = torch.where(q_ok[..., None], rel, -2)
    i = torch.arange(length, device=device)
    s = _div(i, dilation)
    slot = (i % dilation, _div(s, T), s % T)
    return q_pos, h_pos, rel, slot, (dilation, n_tiles, T, halo)


def _build_tile_tables(H: int, W: int, kernel: Tuple[int, int], dilation: Tuple[int, int], tile: int,
                       device, dedup: bool = True) -> NATileTables:
    kh, kw = kernel
    qr, hr, rr, (gr, tr, ar), (Gr, nTr, Tr, Hr) = _axis_tiles(H, kh, dilation[0], tile, device)
    qc, hc, rc, (gc, tc, ac), (Gc, nTc, Tc, Hc) = _axis_tiles(W, kw, dilation[1], tile, device)
    N = H * W

    def token(pr, pc):  # (G1, nT1, X), (G2, nT2, Y) -> (G1 * G2 * nT1 * nT2, X * Y) flat token or N
        pr, pc = pr[:, None, :, None, :, None], pc[None, :, None, :, None, :]
        return torch.where((pr >= 0) & (pc >= 0), pr * W + pc, N).reshape(Gr * Gc * nTr * nTc, -1)

    nb = (2 * kh - 1) * (2 * kw - 1)
    rr = rr[:, None, :, None, :, None, :, None]
    rc = rc[None, :, None, :, None, :, None, :]
    bias_index = torch.where((rr >= 0) & (rc >= 0), rr * (2 * kw - 1) + rc, nb + 1)
    bias_index = torch.where((rr == -2) | (rc == -2), nb, bias_index).reshape(Gr * Gc * nTr * nTc, Tr * Tc, Hr * Hc)
    tile_of = ((gr[:, None] * Gc + gc[None, :]) * nTr + tr[:, None]) * nTc + tc[None, :]
    out_index = (tile_of * (Tr * Tc) + ar[:, None] * Tc + ac[None, :]).reshape(N)
    mask = torch.where(bias_index > nb, float('-inf'), 0.0)
    if dedup:
        patterns, tile_pattern = torch.unique(bias_index.flatten(1), dim=0, return_inverse=True)
        patterns = patterns.view(-1, *bias_index.shape[1:])
    else:  # graph capture (torch.export): one pattern per tile, no data-dependent shapes
        patterns, tile_pattern = bias_index, torch.arange(bias_index.shape[0], device=device)
    return NATileTables(token(qr, qc), token(hr, hc), out_index, mask, patterns, tile_pattern)


_cached_tile_tables = size_cache(64)(_build_tile_tables)


def na_tile_tables(H: int, W: int, kernel: Tuple[int, int], dilation: Tuple[int, int], device=None,
                   tile: int = TILE) -> NATileTables:
    """Index tables of the gather path, cached per (H, W, kernel, dilation, tile, device)."""
    sizes = _static_sizes(H, W)
    if sizes is not None:
        H, W = sizes
        return _cached_tile_tables(H, W, tuple(kernel), tuple(dilation), tile, torch.device(device or 'cpu'))
    return _build_tile_tables(H, W, kernel, dilation, tile, device, False)


def _build_dense_mask(H: int, W: int, kernel: Tuple[int, int], dilation: Tuple[int, int], device) -> torch.Tensor:
    key_index, _ = na_tables(H, W, kernel, dilation, device)
    N = H * W
    return torch.full((N, N), float('-inf'), device=device).scatter(
        1, key_index, torch.zeros(key_index.shape, device=device))


_cached_dense_mask = size_cache(8)(_build_dense_mask)


def dense_mask(H: int, W: int, kernel: Tuple[int, int], dilation: Tuple[int, int], device=None) -> torch.Tensor:
    """Additive (N, N) mask: 0 on each query's neighborhood, -inf elsewhere."""
    sizes = _static_sizes(H, W)
    if sizes is not None:
        H, W = sizes
        return _cached_dense_mask(H, W, tuple(kernel), tuple(dilation), torch.device(device or 'cpu'))
    return _build_dense_mask(H, W, kernel, dilation, device)


def use_dense(H: int, W: int, kernel: Tuple[int, int]) -> bool:
    """Whether the automatic choice takes the dense path for this map size."""
    return H * W <= DENSE_MAX_TOKENS


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    B, H, W, nh, d = t.shape
    return t.reshape(B, H * W, nh, d).transpose(1, 2)  # B, heads, N, d


def _na_dense(q, k, v, kernel, dilation, rel_pos_bias, scale):
    B, H, W, nh, d = q.shape
    N = H * W
    logits = _heads_first(q * scale) @ _heads_first(k).transpose(-2, -1)  # B, heads, N, N
    if rel_pos_bias is None:
        logits = logits + dense_mask(H, W, kernel, dilation, q.device).to(logits.dtype)
    else:
        key_index, bias_index = na_tables(H, W, kernel, dilation, q.device)
        vals = rel_pos_bias.flatten(1)[:, bias_index].to(logits.dtype)  # heads, N, K
        bias = torch.full((nh, N, N), float('-inf'), device=q.device, dtype=logits.dtype).scatter(
            2, key_index.expand(nh, -1, -1), vals)
        logits = logits + bias
    out = logits.softmax(dim=-1) @ _heads_first(v)  # B, heads, N, d
    return out.transpose(1, 2).reshape(B, H, W, nh, d)


def _na_gather(q, k, v, kernel, dilation, rel_pos_bias, scale, tile=TILE):
    B, H, W, nh, d = q.shape
    tables = na_tile_tables(H, W, kernel, dilation, q.device, tile)

    def tokens(t):  # B, heads, N + 1, d with a zero padding token last
        t = _heads_first(t)
        return torch.cat([t, t.new_zeros(B, nh, 1, d)], dim=2)

    qt = tokens(q * scale)[:, :, tables.query_index]  # B, heads, tiles, T*T, d
    kt = tokens(k)[:, :, tables.halo_index]  # B, heads, tiles, halo, d
    vt = tokens(v)[:, :, tables.halo_index]
    logits = qt @ kt.transpose(-2, -1)  # B, heads, tiles, T*T, halo
    if rel_pos_bias is None:
        logits = logits + tables.mask.to(logits.dtype)
    else:
        table = torch.cat([rel_pos_bias.flatten(1).to(logits.dtype),
                           logits.new_tensor([0.0, float('-inf')]).expand(nh, 2)], dim=1)
        logits = logits + table[:, tables.bias_patterns].index_select(1, tables.tile_pattern)
    out = logits.softmax(dim=-1) @ vt  # B, heads, tiles, T*T, d
    out = out.reshape(B, nh, -1, d)[:, :, tables.out_index]  # B, heads, N, d
    return out.transpose(1, 2).reshape(B, H, W, nh, d)


def _export_axis_tiles(length: int, kernel: int, dilation: int, tile: int, device: torch.device) -> Tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of the export path's tiling; `length` may be symbolic or a traced 0-dim tensor.

    Fixed tiles of `tile` sub-grid positions (the last one padded), so only the tile count depends on the
    size. Returns query rows (G, nT, T) and halo rows (G, nT, Th) as positions into the axis padded with one
    zero position at index `length`; rpb offsets (G, nT, T, Th), 2k - 1 off-window and 2k for padding queries;
    and the slot of each position (length,) in the flattened (G, nT, T) layout.
    """
    n_tiles = ceil_div(ceil_div(length, dilation), tile)
    halo = tile + kernel - 1
    i = torch.arange(length, device=device)
    g = torch.arange(dilation, device=device)[:, None, None]
    t = torch.arange(n_tiles, device=device)[None, :, None]
    sub_len = (i[-1:, None, None] - g) // dilation + 1  # (G, 1, 1): positions of each dilation group
    p = t * tile + torch.arange(tile, device=device)  # (1, nT, T) query sub-index
    q_ok = p < sub_len
    # a sub-index past its group's end lands at or past `length`: clamp it onto the padding position
    q_pos = torch.minimum(g + dilation * p, i[-1:] + 1)
    # windows start at clamp(p - k//2, 0, L_g - k), non-decreasing in p: the tile's halo starts at its first
    h_sub = torch.minimum((t * tile - kernel // 2).clamp(min=0), sub_len - kernel) + torch.arange(halo, device=device)
    h_pos = torch.minimum(g + dilation * h_sub, i[-1:] + 1)
    start = torch.minimum((p - kernel // 2).clamp(min=0), sub_len - kernel)
    off = h_sub[:, :, None, :] - start[..., None]  # (G, nT, T, Th): key offset inside the query's window
    rel = torch.where((off >= 0) & (off < kernel), h_sub[:, :, None, :] - p[..., None] + kernel - 1, 2 * kernel - 1)
    rel = torch.where(q_ok[..., None], rel, 2 * kernel)
    slot = (i % dilation) * (n_tiles * tile) + i // dilation
    return q_pos, h_pos, rel, slot


def _export_gather(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, B: int, nh: int, d: int, Gr: int,
                   nTr: int, Gc: int, nTc: int) -> torch.Tensor:
    """(B, H, W, nh, d) -> (B, nh, Gr, nTr, Gc, nTc, R, C, d): the map padded by one zero row and column, gathered
    at query / halo rows (Gr, nTr, R) and columns (Gc, nTc, C) from `_export_axis_tiles`."""
    t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 1, 0, 1))
    t = t.index_select(1, rows.flatten()).index_select(2, cols.flatten())
    t = t.reshape(B, Gr, nTr, rows.shape[-1], Gc, nTc, cols.shape[-1], nh, d)
    return t.permute(0, 7, 1, 2, 4, 5, 3, 6, 8)


def _na_export(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Tuple[int, int], dilation: Tuple[int, int],
               rel_pos_bias: Optional[torch.Tensor], scale: float, tile: int = TILE) -> torch.Tensor:
    """The gather path for export (and TorchScript): same tiles-and-halos attention, everything separable per axis.

    Nothing branches on or caches by the (possibly symbolic) size, and the index tables are computed in the
    graph from it, so one exported graph runs at any size. Per axis: query / halo rows from
    `_export_axis_tiles`; keys are gathered rows-then-columns with `index_select` from the map padded by one
    zero row and column (`_export_gather`); the bias is one lookup in the rpb table padded with a -inf
    (off-window) and a 0 (padding query) row and column. No dedup (data-dependent shapes) and no 2-D token tables.
    """
    B, H, W, nh, d = q.shape
    kh, kw = kernel
    qr, hr, rr, sr = _export_axis_tiles(H, kh, dilation[0], tile, q.device)
    qc, hc, rc, sc = _export_axis_tiles(W, kw, dilation[1], tile, q.device)
    Gr, nTr, Th = hr.shape
    Gc, nTc, Tw = hc.shape
    sizes = (B, nh, d, Gr, nTr, Gc, nTc)
    qt = _export_gather(q * scale, qr, qc, *sizes).reshape(B, nh, -1, tile * tile, d)  # B, heads, tiles, T*T, d
    kt = _export_gather(k, hr, hc, *sizes).reshape(B, nh, -1, Th * Tw, d)  # B, heads, tiles, halo, d
    vt = _export_gather(v, hr, hc, *sizes).reshape(B, nh, -1, Th * Tw, d)
    logits = qt @ kt.transpose(-2, -1)  # B, heads, tiles, T*T, halo
    table = logits.new_zeros(1, 2 * kh - 1, 2 * kw - 1) if rel_pos_bias is None else rel_pos_bias.to(logits.dtype)
    table = torch.nn.functional.pad(table, (0, 1, 0, 1), value=float('-inf'))  # row / col 2k - 1: off-window
    table = torch.nn.functional.pad(table, (0, 1, 0, 1), value=0.)  # row / col 2k: padding query
    # (Gr, nTr, Gc, nTc, Tr, Tc, Thr, Thc): the tile order of qt / kt, then query slot, then halo slot
    index = (rr[:, :, None, None, :, None, :, None] * (2 * kw + 1)
             + rc[None, None, :, :, None, :, None, :]).reshape(-1, tile * tile, Th * Tw)
    logits = logits + table.flatten(1)[:, index]
    out = logits.softmax(dim=-1) @ vt  # B, heads, tiles, T*T, d
    out = out.reshape(B, nh, Gr, nTr, Gc, nTc, tile, tile, d).permute(0, 1, 2, 3, 6, 4, 5, 7, 8)
    out = out.reshape(B, nh, Gr * nTr * tile, Gc * nTc * tile, d).index_select(2, sr).index_select(3, sc)
    return out.permute(0, 2, 3, 1, 4)  # B, H, W, heads, d


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
    """2-D neighborhood attention on validated inputs. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d).

    impl: 'gather' (O(N k^2) memory), 'dense' (O(N^2) memory) or 'auto' (dense only for small maps).
    While exporting, 'auto' is always 'gather', with index tables computed in the graph from the runtime
    size, so one export runs at any size (the choice of 'dense' would depend on the export size). TorchScript
    compiles only that export form (the cached-table paths sit behind ``not torch.jit.is_scripting()``), so
    scripted code takes impl='auto' only.
    """
    H, W, d = q.shape[1], q.shape[2], q.shape[4]
    logit_scale = d ** -0.5 if scale is None else scale
    if not torch.jit.is_scripting():
        if impl == 'auto' and not is_exporting():
            impl = 'dense' if use_dense(H, W, kernel_size) else 'gather'
        if impl == 'dense':
            return _na_dense(q, k, v, kernel_size, dilation, rel_pos_bias, logit_scale)
        if impl == 'gather':
            return _na_gather(q, k, v, kernel_size, dilation, rel_pos_bias, logit_scale)
    if impl != 'auto':
        expected = "'auto', 'gather' or 'dense'" if not torch.jit.is_scripting() else "'auto' in scripted code"
        raise ValueError(f"impl: expected {expected}, got '{impl}'")
    return _na_export(q, k, v, kernel_size, dilation, rel_pos_bias, logit_scale)
