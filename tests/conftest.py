"""Test-wide set-up: Triton's interpreter (so Triton kernels run on CPU tensors) and offline logging."""
import io
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


# relative tolerance and floor of `assert_close_to_scale` by dtype: a whole network in float32 adds up the rounding
# of different op orders, thread counts and CPU kernels (~1e-7 per op, amplified with depth)
_SCALE_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float = None, floor: float = None,
                           msg: str = '') -> None:
    default_rel, default_floor = _SCALE_TOL.get(want.dtype, (1e-2, 1e-3))
    scale = want.abs().max().item()
    atol = max(default_floor if floor is None else floor, (default_rel if rel is None else rel) * scale)
    assert got.shape == want.shape, f'{msg} shape {tuple(got.shape)} != {tuple(want.shape)}'
    err = (got - want).abs().max().item()
    assert err <= atol, f'{msg} max abs error {err:.3e} > {atol:.3e} (max |want| = {scale:.3e})'


@pytest.fixture
def assert_close_to_scale():
    """assert_close_to_scale(got, want, rel=None, floor=None): max|got - want| <= max(floor, rel * max|want|).

    The tolerance follows the compared tensor's scale (logits of a randomised network may be 1 or 1000), so a
    check holds at any thread count and on any CPU; defaults by dtype (float32: rel 1e-5, floor 1e-6)."""
    return _assert_close_to_scale


def _script_round_trip(module: torch.nn.Module) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.fixture(scope='session')
def script_round_trip():
    """script_round_trip(module): `module` compiled by torch.jit.script, saved and loaded back (so nothing in it
    calls into Python)."""
    return _script_round_trip


GPU_COMPILE_PREAMBLE = r"""
import json, os
os.environ.pop('TRITON_INTERPRET', None)
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def build(fn, sig, const, capability, **options):
    kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget('cuda', capability, 32), options=options)
    assert kernel.asm['cubin'], 'no cubin'
    return kernel.metadata.shared
"""
SHARED_MEMORY_LIMIT = 99 * 1024  # bytes per block on sm_80 / sm_86


def _compile_for_gpu(script: str, count: int, timeout: int = 900) -> dict:
    """Run `script` (after GPU_COMPILE_PREAMBLE; it prints a JSON {kernel: shared bytes}) with Triton's CUDA
    compiler and no GPU; assert `count` kernels compiled and each fits SHARED_MEMORY_LIMIT."""
    import json
    import os
    import subprocess
    import sys
    import triton.backends
    if 'nvidia' not in triton.backends.backends:
        pytest.skip('this triton build has no CUDA backend to compile with')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    res = subprocess.run([sys.executable, '-c', GPU_COMPILE_PREAMBLE + script], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(shared) == count, sorted(shared)
    for key, nbytes in shared.items():
        assert nbytes <= SHARED_MEMORY_LIMIT, f'{key}: {nbytes} bytes of shared memory'
    return shared


@pytest.fixture
def compile_for_gpu():
    """`_compile_for_gpu`: compile Triton kernels for a CUDA target without a GPU."""
    return _compile_for_gpu


def _official_checkpoint(layout, path):
    """A release-layout checkpoint (``{'model': state_dict}``, as the official training scripts save it) of random
    tensors with the (name, shape) pairs of `layout`, written to `path`; returns (state_dict, path)."""
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in layout}
    torch.save({'model': state}, path)
    return state, path


@pytest.fixture
def official_checkpoint():
    """`_official_checkpoint(layout, path) -> (state_dict, path)`."""
    return _official_checkpoint


def pytest_collection_finish(session):
    """Tests import the one package (`zoo.kernels`, ...): a top-level `kernels` / `blocks` / ... from this
    checkout (on sys.path through the working directory) would be a second copy of the same modules."""
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    stray = [name for name in ('kernels', 'blocks', 'weights', 'train', 'bench')
             if getattr(sys.modules.get(name), '__file__', None) and Path(sys.modules[name].__file__).resolve()
             .is_relative_to(repo)]
    if stray:
        raise pytest.UsageError(f'tests imported the top-level package(s) {stray} from {repo}; '
                                f'import them as zoo.{stray[0]} (one import package)')
