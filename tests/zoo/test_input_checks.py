"""The shared input check of every zoo backbone (HierarchicalBackbone._check_input): a clear error for a
uint8 image that says how to make the float, normalised tensor the model expects."""
import re

import pytest
import timm
import torch

import zoo


@pytest.mark.parametrize('name', ['swin_tiny', 'cbam_resnet18', 'nat_tiny', 'maxvit_tiny'])
def test_uint8_image_says_float_normalised_and_how(name):
    model = timm.create_model(name, **zoo.reduced_args(name)).eval()
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(TypeError, match=r'expected a float image tensor, normalised .* got dtype torch\.uint8') as e:
            call(image)
    msg = str(e.value)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    assert str(tuple(mean)) in msg and str(tuple(std)) in msg and 'timm.data.create_transform' in msg
    # the recipe in the message, run as written, gives an input the model takes
    expr = re.search(r'x = (.*?); from PIL', msg).group(1)
    x = eval(expr, {'torch': torch, 'x': image})
    torch.testing.assert_close(x, (image.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) /
                               torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
