"""The recipe's checkpoint reader (zoo eval, --resume, load_from): unreadable files are named and described
(not a checkpoint, truncated or corrupt, a weight file rather than a training checkpoint), never with torch's
advice to unpickle them."""
import os

import pytest
import torch

from zoo.train.runner import read_checkpoint
from zoo.weights import WeightsFileError, save_weights


def test_bad_files(tmp_path):
    random = tmp_path / 'epoch_3.pth'
    random.write_bytes(os.urandom(4096).replace(b'PK', b'pk').replace(b'\x80', b'\x81'))
    with pytest.raises(WeightsFileError, match=r'epoch_3\.pth: not a torch checkpoint') as info:
        read_checkpoint(str(random))
    assert 'weights_only=False' not in str(info.value) and 'safely' not in str(info.value)

    truncated = tmp_path / 'epoch_4.pth'
    torch.save({'meta': {'epoch': 4}, 'state_dict': {'model.w': torch.randn(4000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(WeightsFileError, match=r'epoch_4\.pth: corrupt or truncated torch checkpoint'):
        read_checkpoint(str(truncated))

    weights = tmp_path / 'model.safetensors'
    save_weights({'w': torch.ones(2)}, weights)
    with pytest.raises(WeightsFileError, match=r'is a weight file, not a training checkpoint.*model\.pretrained'):
        read_checkpoint(str(weights))
    plain = tmp_path / 'plain.pth'
    torch.save({'w': torch.ones(2)}, plain)
    with pytest.raises(WeightsFileError, match=r"not a training checkpoint of this recipe \(no 'state_dict'\)"):
        read_checkpoint(str(plain))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        read_checkpoint(str(tmp_path / 'nope.pth'))
