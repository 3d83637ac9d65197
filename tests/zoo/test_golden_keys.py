"""Every model's state-dict layout is frozen: the (key, shape) list of each full-size model recorded before
the families moved onto the one block (golden/state_dict_keys.json) must stay equal, so saved weights and the
checkpoint key maps keep loading. A model added later is recorded by running this file with ZOO_GOLDEN_ADD=1."""
import json
import os
from pathlib import Path

import pytest
import timm

import zoo

GOLDEN = Path(__file__).parent / 'golden' / 'state_dict_keys.json'
RECORDED = json.loads(GOLDEN.read_text())


def _layout(name: str):
    return [[k, list(v.shape)] for k, v in timm.create_model(name).state_dict().items()]


def test_every_model_is_recorded():
    missing = sorted(set(zoo.list_zoo_models()) - set(RECORDED))
    if missing and os.environ.get('ZOO_GOLDEN_ADD'):
        RECORDED.update({name: _layout(name) for name in missing})
        GOLDEN.write_text(json.dumps(RECORDED, indent=0, separators=(',', ':')))
        missing = []
    assert not missing, f'record the layout of {missing}: ZOO_GOLDEN_ADD=1 pytest {__file__}'


@pytest.mark.parametrize('name', sorted(RECORDED))
def test_state_dict_layout_unchanged(name):
    got = _layout(name)
    want = RECORDED[name]
    assert len(got) == len(want)
    diff = [(g, w) for g, w in zip(got, want) if g != w]
    assert not diff, f'{name}: first differences (ours, recorded): {diff[:3]}'
