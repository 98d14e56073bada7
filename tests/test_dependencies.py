"""The declared dependencies are the true ones: floors, platform markers, and Triton being optional."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types
import venv
from pathlib import Path

import pytest
import torch
from hf_neuralcache.kernels import dispatch
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "generate_smoke.py"


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name: Requirement(line) for line in project["dependencies"]}


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_triton_is_required_on_linux_only():
    """Triton has wheels for Linux only; elsewhere the package installs without it and runs the PyTorch path."""
    marker = _requirements()["triton"].marker
    assert marker is not None, "triton needs a sys_platform == 'linux' marker"
    assert marker.evaluate({"sys_platform": "linux"})
    assert not marker.evaluate({"sys_platform": "darwin"}) and not marker.evaluate({"sys_platform": "win32"})


@pytest.mark.parametrize("name", ["torch", "accelerate", "safetensors", "tqdm"])
def test_floors_are_not_below_those_of_the_installed_transformers(name):
    ours = _floor(_requirements()[name])
    theirs = [Requirement(line) for line in importlib.metadata.requires("transformers") or []]
    theirs = [_floor(r) for r in theirs if r.name == name and _floor(r) is not None]
    assert theirs, f"the installed transformers names no floor for {name}"
    assert ours is not None and ours >= max(theirs), f"{name}>={ours} is below transformers' own {name}>={max(theirs)}"


@pytest.mark.parametrize("how", ["--no-triton", "--old-triton"], ids=["triton-missing", "triton-without-knobs"])
def test_generates_with_each_cache_without_a_usable_triton(how):
    """`import triton` failing (macOS, Windows) or a Triton without `triton.knobs` (< 3.4): the PyTorch path runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SMOKE), how], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT / "tests"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "paged_kv",
        "sliding_window_kv",
        "tensor_cache",
    ]


def test_an_old_triton_takes_the_pytorch_path_with_one_warning(monkeypatch):
    from hf_neuralcache.kernels import paged_attention

    cuda_like = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    cpu_like = types.SimpleNamespace(is_cuda=False, device=torch.device("cpu"))
    dispatch.triton_available.cache_clear()
    monkeypatch.setattr(dispatch, "_triton_version", lambda: (3, 1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        with pytest.warns(RuntimeWarning, match=r"need triton >= 3\.2, found 3\.1: using the PyTorch path"):
            assert not dispatch.use_triton(cuda_like)
        assert not paged_attention.use_triton(cuda_like)
        assert not dispatch.triton_interpreting()
        monkeypatch.setattr(dispatch, "_triton_version", lambda: (3, 6))  # compiled kernels yes, interpreter no
        dispatch.triton_available.cache_clear()
        assert dispatch.use_triton(cuda_like) and not dispatch.use_triton(cpu_like)
        assert not dispatch.triton_interpreting()
        monkeypatch.setattr(dispatch, "_triton_version", lambda: None)  # not installed
        dispatch.triton_available.cache_clear()
        assert not dispatch.use_triton(cuda_like) and not paged_attention.use_triton(cuda_like)
    finally:
        dispatch.triton_available.cache_clear()


def _installed_torch() -> str:
    return torch.__version__.split("+")[0]


@pytest.mark.slow
def test_lowest_allowed_versions_install_and_generate(tmp_path):
    """Every dependency at its floor (`name==floor`), in a fresh venv: install, import, generate with each cache.

    torch stays at the installed release: PyPI has only CUDA builds of older ones (GBs) and PyTorch's CPU index may
    be unreachable. The oldest transformers we allow is this run's; the default run covers the newest.
    """
    floors = {name: _floor(req) for name, req in _requirements().items()}
    pins = [f"{name}=={floor}" for name, floor in sorted(floors.items()) if name != "torch" and floor is not None]
    constraints = tmp_path / "floors.txt"
    constraints.write_text("\n".join([*pins, f"torch=={_installed_torch()}"]) + "\n")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--constraint", str(constraints)]
    install = subprocess.run([*pip, str(ROOT)], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    for pin in pins:
        assert pin.lower() in listed.replace("_", "-"), f"{pin} not installed:\n{listed}"
    result = subprocess.run([str(python), str(SMOKE)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "paged_kv",
        "sliding_window_kv",
        "tensor_cache",
    ]
