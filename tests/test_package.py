"""One import package: everything installs under `zoo` (zoo.kernels, zoo.blocks, zoo.weights, zoo.train,
zoo.bench, zoo/configs), so nothing generic lands at top level, a user's own `weights/` folder or `train.py`
does not shadow us, the wheel carries the configs, and the editable install is a plain path static tools read."""
import glob
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC = ('kernels', 'blocks', 'weights', 'train', 'bench', 'configs')


def _run(args, cwd, timeout=300, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, **(env or {})}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def careless_cwd(tmp_path):
    """A working directory like a new user's: a weights/ folder, a train.py, a kernels.py and a blocks/ package."""
    (tmp_path / 'weights').mkdir()
    (tmp_path / 'weights' / 'resnet.pth').write_bytes(b'not ours')
    (tmp_path / 'blocks').mkdir()
    (tmp_path / 'blocks' / '__init__.py').write_text('raise ImportError("the user\'s own blocks package")\n')
    for name in ('train.py', 'kernels.py', 'bench.py'):
        (tmp_path / name).write_text(f'raise SystemExit("the user\'s own {name} ran")\n')
    return tmp_path


def test_user_files_do_not_shadow_the_package(careless_cwd):
    res = _run([sys.executable, '-m', 'zoo.train', 'train', '--help'], careless_cwd)
    assert res.returncode == 0 and 'usage' in res.stdout and 'ran' not in res.stdout + res.stderr, res.stderr[-2000:]
    code = ('import zoo.kernels, zoo.blocks, zoo.weights, zoo.train, zoo.bench, os; '
            'print(*(os.path.realpath(m.__file__) for m in (zoo.kernels, zoo.blocks, zoo.weights, zoo.train, '
            'zoo.bench)), sep="\\n")')
    res = _run([sys.executable, '-c', code], careless_cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(line.startswith(str(REPO)) for line in res.stdout.split()), res.stdout
    zoo_cmd = shutil.which('zoo')
    if zoo_cmd:  # the console script of the README's install
        res = _run([zoo_cmd, 'list', 'swin*'], careless_cwd)
        assert res.returncode == 0 and 'swin_tiny' in res.stdout, res.stderr[-2000:]


def test_nothing_generic_at_top_level(tmp_path):
    code = ('import importlib.util, json; import zoo; '
            f'print(json.dumps({{n: bool(importlib.util.find_spec(n)) for n in {GENERIC!r}}}))')
    res = _run([sys.executable, '-c', code], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == '{' + ', '.join(f'"{n}": false' for n in GENERIC) + '}'


def test_editable_install_is_a_static_path():
    """A plain directory on the path (no import hook), holding only the zoo package: pyright / editors resolve it."""
    pths = [p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, '__editable__*attention_zoo*.pth'))]
    if not pths:
        pytest.skip('attention-zoo is not installed in editable mode here (the README installs it with pip -e)')
    lines = [ln.strip() for ln in Path(pths[0]).read_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and not lines[0].startswith('import'), lines
    importable = [n for n in os.listdir(lines[0]) if not n.endswith(('.egg-info', '.dist-info'))]
    assert importable == ['zoo'] and Path(lines[0], 'zoo', 'kernels', 'window', 'reference.py').is_file()


def test_wheel_holds_one_package_with_configs(tmp_path):
    src = tmp_path / 'src_copy'
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        '.git', '__pycache__', '*.egg-info', 'build', 'work_dirs', 'tests', '*.onnx', 'wandb'))
    res = _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                str(tmp_path / 'dist'), str(src)], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / 'dist').glob('*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split('/')[0] for n in names}
    assert top == {'zoo', 'attention_zoo-0.1.0.dist-info'}, top
    for need in ('zoo/kernels/window/triton.py', 'zoo/blocks/block.py', 'zoo/train/demo.py',
                 'zoo/configs/classification/cbam_resnet18_digits.py', 'zoo/configs/_base_/default_runtime.py',
                 'zoo/bench/suites/models/default.toml'):
        assert need in names, need

    target = tmp_path / 'site'
    zipfile.ZipFile(wheel).extractall(target)
    code = ('from zoo.train.runner import load_config; from zoo.train.demo import config_dir; '
            'cfg = load_config("configs/classification/cbam_resnet18_digits.py"); '
            'print(config_dir(), cfg.model.model_name)')
    res = _run([sys.executable, '-c', code], tmp_path, env={'PYTHONPATH': str(target)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == [str(target / 'zoo' / 'configs'), 'cbam_resnet18']
