"""Compatibility with plain transformers: saved checkpoints, attention implementations, composite models, and
models that use none of our caches (issue 12, points 4, 5, 7 and 9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composite_helpers import COMPOSITE, TEXT_ONLY, greedy, inputs, tiny
from transformers import DynamicCache, masking_utils

import hf_neuralcache
from hf_neuralcache.models import tiny_model
from hf_neuralcache.registry import CACHE_KWARG
from hf_neuralcache.testing import assert_close

IDS = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
TESTS = Path(__file__).parent
CACHES = ("paged_kv", "sliding_window_kv", "tensor_cache")


def plain_python(code: str) -> str:
    """Run `code` in a fresh interpreter that never imports hf_neuralcache; return its last line of output."""
    script = f"{code}\nimport sys\nassert 'hf_neuralcache' not in sys.modules, 'hf_neuralcache was imported'\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=TESTS, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


# ---- point 9: importing hf_neuralcache changes no model that does not use our caches -------------------------------
def test_import_changes_no_model_that_does_not_use_our_caches():
    names = COMPOSITE + TEXT_ONLY
    line = plain_python(
        f"""
import json
from composite_helpers import greedy, tiny
print(json.dumps({{name: greedy(tiny(name), name) for name in {names!r}}}))
"""
    )
    without = json.loads(line)
    for name in names:
        assert greedy(tiny(name), name) == without[name], name


def test_mask_hook_takes_the_cache_by_keyword():
    model = tiny_model("llama")
    embeds, mask = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long)
    original = masking_utils._preprocess_mask_arguments.__neuralcache_original__
    for cache in (DynamicCache(config=model.config), None):
        got = masking_utils._preprocess_mask_arguments(
            config=model.config, inputs_embeds=embeds, attention_mask=mask, cache=cache, position_ids=None, layer_idx=0
        )
        assert repr(got) == repr(original(model.config, embeds, mask, cache, None, 0))


# ---- point 9: composite models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("name", COMPOSITE)
def test_composite_models_generate_dynamic_cache_tokens(name, cache):
    model = tiny(name, attn_implementation="neuralcache" if cache == "tensor_cache" else "sdpa")
    assert greedy(model, name, cache_implementation=cache) == greedy(model, name)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "neuralcache"])
def test_gemma3_image_blocks_stay_bidirectional_with_our_caches(attention):
    model, x = tiny("gemma3", attn_implementation=attention), inputs("gemma3")
    with torch.no_grad():
        expected = model(**x, **cache_like(model)).logits
        causal_only = model(**{k: v for k, v in x.items() if k != "token_type_ids"}, **cache_like(model)).logits
        assert not torch.allclose(causal_only, expected, atol=1e-3)  # the image block's overlay matters here
        for name in CACHES if attention == "neuralcache" else ("paged_kv", "sliding_window_kv"):
            got = model(**x, **{CACHE_KWARG: hf_neuralcache.create_cache(name, model.config)}).logits
            assert_close(got, expected, 1e-5, f"{attention} {name}")


def cache_like(model):
    return {CACHE_KWARG: DynamicCache(config=model.config)}
