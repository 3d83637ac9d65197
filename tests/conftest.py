"""Test-wide set-up: Triton's interpreter (so Triton kernels run on CPU tensors) and offline logging."""
import os

# must be set before triton is first imported anywhere
os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
