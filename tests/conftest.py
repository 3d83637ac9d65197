"""Test-wide set-up: Triton's interpreter (so Triton kernels run on CPU tensors) and offline logging."""
import os

# must be set before triton is first imported anywhere
os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)  # one thread per xdist worker: the workers share the cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
