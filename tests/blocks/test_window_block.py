"""Swin window blocks: WindowAttention against a brute-force dense computation at odd sizes, PatchMerging
against timm's, and the reference op's fused copy path against its export (pad / roll / partition) path."""
import math

import pytest
import torch
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging

import zoo.kernels.window.reference as window_ref
from zoo.blocks import create_mixer
from zoo.blocks import MixerBlock
from zoo.blocks.block import PatchMerging
from zoo.blocks.window import WindowAttention, effective_window_shift


def _axis_layout(size: int, window: int, shift: int):
    """Per padded coordinate along one axis (no roll, no partition): window id, offset inside the window,
    Swin shift region, and validity. Position r sits at r - shift (mod padded) on the shifted map."""
    padded = math.ceil(size / window) * window
    win, off, region, valid = [], [], [], []
    for r in range(padded):
        p = (r - shift) % padded
        win.append(p // window)
        off.append(p % window)
        region.append(0 if not shift or p < padded - window else (1 if p < padded - shift else 2))
        valid.append(r < size)
    return padded, *(torch.tensor(t) for t in (win, off, region, valid))


def _brute_force(mod: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Dense attention over all (query, key) pairs of the padded map, in float64, from Swin's definition."""
    mod = mod.double()
    x = x.double()
    B, H, W, C = x.shape
    nh, d = mod.num_heads, mod.head_dim
    (Mh, Mw), (Sh, Sw) = mod.window_size, mod.shift_size
    Hp, win_h, off_h, reg_h, ok_h = _axis_layout(H, Mh, Sh)
    Wp, win_w, off_w, reg_w, ok_w = _axis_layout(W, Mw, Sw)
    xp = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    xp[:, :H, :W] = x
    q, k, v = mod.qkv(xp).view(B, Hp * Wp, 3, nh, d).permute(2, 0, 3, 1, 4)
    valid = (ok_h[:, None] & ok_w[None, :]).flatten()
    k = k * valid[:, None]
    v = v * valid[:, None]  # padding is zeros, not qkv(0) = bias

    def flat(a, b):
        return (a[:, None] * 1000 + b[None, :]).flatten()

    window = flat(win_h, win_w)
    region = flat(reg_h, reg_w)
    dy = off_h[:, None].expand(Hp, Wp).flatten()
    dx = off_w[None, :].expand(Hp, Wp).flatten()
    # Swin's table: ((2Mh-1) * (2Mw-1), heads), row-major over the query-minus-key offset
    index = (dy[:, None] - dy[None, :] + Mh - 1) * (2 * Mw - 1) + (dx[:, None] - dx[None, :] + Mw - 1)
    bias = mod.relative_position_bias_table[index].permute(2, 0, 1)  # heads, N, N
    masked = (region[:, None] != region[None, :]) | ~valid[None, :]
    logits = (q * mod.scale) @ k.transpose(-2, -1) + bias - 100.0 * masked
    logits = logits.masked_fill(window[:, None] != window[None, :], float('-inf'))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, Hp, Wp, nh * d)
    return mod.proj(out)[:, :H, :W]


@pytest.mark.parametrize('hw, window, shift', [
    ((13, 17), 7, 3),  # padding and shift on both axes
    ((5, 9), 7, 3),  # H smaller than the window: padded to one window, shifted and masked
    ((7, 7), 7, 3),  # map equal to the window: the built shift still applies (backbones pick it from img_size)
    ((20, 11), (7, 5), (3, 2)),  # rectangular window
    ((16, 16), 4, 2),
])
def test_window_attention_matches_brute_force(hw, window, shift):
    mod = WindowAttention(32, num_heads=4, window_size=window, shift_size=shift)
    with torch.no_grad():
        mod.relative_position_bias_table.normal_(0, 1.0)
        mod.qkv.bias.normal_(0, 0.5)
    x = torch.randn(2, *hw, 32)
    out = mod(x)
    assert out.shape == x.shape
    expected = _brute_force(mod, x)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_effective_window_shift_rule():
    assert effective_window_shift((56, 56), (7, 7), (3, 3)) == ((7, 7), (3, 3))
    assert effective_window_shift((7, 7), (7, 7), (3, 3)) == ((7, 7), (0, 0))
    assert effective_window_shift((5, 9), (7, 7), (3, 3)) == ((5, 7), (0, 3))
    assert effective_window_shift((8, 4), (7, 7), (3, 3)) == ((7, 4), (3, 0))


def test_patch_merging_matches_timm():
    ours = PatchMerging(8)
    ref = TimmPatchMerging(8)
    ref.load_state_dict(ours.state_dict())
    for hw in [(6, 10), (7, 9)]:
        x = torch.randn(2, *hw, 8)
        out = ours(x)
        assert out.shape == (2, -(-hw[0] // 2), -(-hw[1] // 2), 16)
        assert torch.allclose(out, ref(x), atol=1e-6)


def test_mixer_registry_and_errors():
    mixer = create_mixer('window', 48, num_heads=3, window_size=7, shift_size=3)
    assert isinstance(mixer, WindowAttention)
    assert mixer.relative_position_bias_table.shape == (169, 3)
    with pytest.raises(ValueError, match='num_heads'):
        WindowAttention(48, num_heads=5)
    with pytest.raises(ValueError, match='shift_size'):
        WindowAttention(48, num_heads=3, window_size=7, shift_size=7)
    with pytest.raises(ValueError, match='attn_drop'):
        WindowAttention(48, num_heads=3, attn_drop=0.1)


def test_swin_block_any_size_and_layer_scale():
    block = MixerBlock(32, 'window', dict(window_size=7, shift_size=3), num_heads=2, layer_scale=1e-5, drop_path=0.1)
    x = torch.randn(2, 9, 15, 32, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize('hw, window, mode, shift, table', [
    ((14, 14), (7, 7), 'block', (3, 3), (7, 7)),
    ((13, 17), (7, 7), 'block', (3, 3), (7, 7)),
    ((15, 9), (7, 7), 'block', (3, 0), (8, 7)),
    ((5, 6), (7, 7), 'block', (3, 3), (7, 7)),
    ((9, 10), (4, 5), 'block', (0, 0), None),
    ((13, 10), (3, 4), 'grid', (0, 0), (5, 6)),
])
def test_reference_fused_copies_match_export_path(hw, window, mode, shift, table, monkeypatch):
    """The eager reference partitions with slice copies; under export it pads, rolls and reshapes."""
    q, k, v = (torch.randn(2, *hw, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    tab = torch.randn(2, 2 * table[0] - 1, 2 * table[1] - 1, dtype=torch.float64,
                      requires_grad=True) if table else None
    inputs = [t for t in (q, k, v, tab) if t is not None]
    grad = torch.randn(2, *hw, 2, 8, dtype=torch.float64)
    results = []
    for exporting in (False, True):
        monkeypatch.setattr(window_ref, 'is_exporting', lambda: exporting)
        out = window_ref.window_attention_ref(q, k, v, window, mode, shift, tab, None)
        results.append([out] + list(torch.autograd.grad(out, inputs, grad)))
    for a, b in zip(*results):
        assert (a - b).abs().max().item() < 1e-12


def test_reference_fused_copies_gradgradcheck():
    q, k, v = (torch.randn(1, 5, 6, 1, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    tab = torch.randn(1, 7, 7, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, tab):
        return window_ref.window_attention_ref(q, k, v, (4, 4), 'block', (2, 1), tab, None)

    assert torch.autograd.gradcheck(fn, (q, k, v, tab), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v, tab), fast_mode=True)
