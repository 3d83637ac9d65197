"""Every zoo model under CPU bfloat16 autocast (reduced widths, `zoo.reduced_args`): finite logits, fp32's top-1, and
logits within `TOL` of fp32's relative to the largest |fp32 logit|.

The tolerance: bf16 keeps 8 significant bits, so each rounding of an activation errs by up to u = 2^-8 (0.39%). A
reduced model rounds its activations at about 16 successive bf16 layers (stem, four stages of one or two blocks with
an attention and an MLP matmul pair, head), and each passes the error it receives on. TOL = 16 u = 1/16 (6.25%) is
the bound for 16 roundings that all err the same way; measured errors add up more like a random walk and stay well
inside it (0.3% to 2.9% of max |logit|, the worst MaxViT; README, "Precision: bfloat16 on CPU"). What fails: an
overflow (non-finite logits), a part whose error grows well beyond one rounding per layer, a flipped top-1.

The batch and classifier make top-1 meaningful: four seeded random images and a head that scores each image's
fp32 features (centred on the batch mean) along its own unit direction, so each image is its own class with a clear
margin. The test asserts the fp32 margin between top-1 and top-2 exceeds 2 TOL (the most the gap can shrink when
every logit moves by at most TOL) before comparing top-1.
"""
import pytest
import timm
import torch

import zoo

MODELS = zoo.list_zoo_models()
TOL = 2.0 ** -4  # 16 bf16 roundings of u = 2^-8 each
BATCH = 4
# VOLO's class token at init is almost all the learned token itself (after the final norm, the images differ by 1-5%
# of its size), so the matched head's logits are small differences of large features and bf16's error reaches ~10%
# of them, in timm's VOLO alike; pooling the tokens (class token included: the class attention still runs) keeps
# the measurement meaningful
EXTRA_ARGS = {'zoo_volo_': dict(global_pool='avg')}


def _matched_head(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Replace the classifier by BATCH classes, class i scoring (f - mean f) . unit(f_i - mean f) on the fp32
    pre-logits features f of `x`: image i's logit is the largest in its row."""
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(BATCH)
        fc = model.get_classifier()
        mean = feats.mean(0)
        directions = feats - mean
        directions = directions / directions.norm(dim=1, keepdim=True)
        fc.weight.copy_(directions)
        fc.bias.copy_(-(directions @ mean))
        # other classifiers add to the logits (VOLO's token-labeling head): zeroed, so the matched head decides
        names = model.pretrained_cfg['classifier']
        for name in ([] if isinstance(names, str) else names[1:]):
            other = model.get_submodule(name)
            other.weight.zero_()
            other.bias.zero_()


@pytest.mark.parametrize('name', MODELS)
def test_bf16_autocast_matches_fp32(name):
    torch.manual_seed(0)
    extra = next((v for k, v in EXTRA_ARGS.items() if name.startswith(k)), {})
    model = timm.create_model(name, **zoo.reduced_args(name), **extra).eval()
    size = max(64, model.min_input_size)
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    _matched_head(model, x)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16  # the classifier ran under autocast, so the test measures bf16
    assert torch.isfinite(out).all()
    scale = ref.abs().max()
    top2 = ref.topk(2, dim=1).values
    margin = float((top2[:, 0] - top2[:, 1]).min() / scale)
    assert margin > 2 * TOL, f'fp32 top-1 margin {margin:.3f} of max |logit|: too small for a top-1 comparison'
    assert torch.equal(ref.argmax(1), torch.arange(BATCH))
    rel = float((out.float() - ref).abs().max() / scale)
    assert rel <= TOL, f'bf16 logits differ from fp32 by {rel:.4f} of max |logit| (tolerance {TOL})'
    assert torch.equal(out.argmax(1), ref.argmax(1))
