"""The repo's kernels/ folder ships as hf_neuralcache.kernels, never as a top-level `kernels` module."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import hf_neuralcache.kernels
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_into_the_package():
    assert Path(hf_neuralcache.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    from hf_neuralcache.kernels.window_attention import naive

    assert Path(naive.__file__).resolve() == REPO / "kernels" / "window_attention" / "naive.py"


def test_no_top_level_kernels_module_from_us(tmp_path):
    # from a neutral folder, `kernels` is either absent or PyPI's package, never the repo folder
    code = (
        "import importlib.util, hf_neuralcache;"
        "spec = importlib.util.find_spec('kernels');"
        "print(spec.origin if spec else 'absent')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(REPO / "kernels") not in out.stdout, out.stdout  # (a virtualenv inside the checkout may hold PyPI's)


def test_wheel_ships_kernels_inside_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("hf_neuralcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_neuralcache/kernels/window_attention/naive.py" in names
    assert "hf_neuralcache/caches/sliding_window.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    # every package folder of the source tree is in the wheel (pyproject lists them by hand)
    for init in [*REPO.glob("hf_neuralcache/**/__init__.py"), *REPO.glob("kernels/**/__init__.py")]:
        rel = init.relative_to(REPO).as_posix()
        packaged = rel if rel.startswith("hf_neuralcache/") else "hf_neuralcache/" + rel
        assert packaged in names, f"{rel} is missing from the wheel: add its package to pyproject.toml"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_generates(tmp_path):
    """The pip path: build the wheel, `pip install` it into a new venv (dependencies from the package index), then
    import it from a neutral folder and generate with each cache on a tiny model."""
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run(
        [*build, str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("hf_neuralcache-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # this one's build: no CUDA download on a CPU machine
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", str(wheel), torch_pin], capture_output=True, text=True, timeout=1200
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    where = subprocess.run(
        [python, "-c", "import hf_neuralcache.kernels as k, importlib.util as u; print(k.__file__, u.find_spec('kernels'))"],  # noqa: E501
        capture_output=True, text=True, cwd=tmp_path, check=True,
    ).stdout  # fmt: skip
    assert str(env_dir) in where and "hf_neuralcache/kernels/__init__.py" in where, where
    assert str(REPO) not in where, where
    smoke = subprocess.run(
        [python, str(REPO / "tests" / "generate_smoke.py")], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert [line.split()[1] for line in smoke.stdout.splitlines() if line.startswith("ok ")] == [
        "paged_kv",
        "sliding_window_kv",
        "tensor_cache",
    ]
