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
from hf_neuralcache import registry
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


# ---- point 4: a checkpoint saved with our settings ----------------------------------------------------------------
def test_checkpoint_with_our_settings_loads_and_generates_in_plain_transformers(tmp_path):
    model = tiny_model("llama", attn_implementation="neuralcache")
    model.generation_config.cache_implementation = "sliding_window_kv"
    model.generation_config.cache_config = {"window": 6, "sink_tokens": 2}
    model.save_pretrained(tmp_path)
    assert model.generation_config.cache_implementation == "sliding_window_kv"  # the model's own config is kept
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert "cache_implementation" not in saved and "cache_config" not in saved
    assert saved["hf_neuralcache"]["cache_implementation"] == "sliding_window_kv"
    assert "hf_neuralcache" in saved["hf_neuralcache"]["note"]  # the reason, findable in the file
    assert "neuralcache" not in (tmp_path / "config.json").read_text()  # transformers never saves the attention

    line = plain_python(
        f"""
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
out = model.generate(torch.tensor({IDS.tolist()}), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                     return_dict_in_generate=True)
settings = model.generation_config.hf_neuralcache
print(json.dumps([type(out.past_key_values).__name__, model.config._attn_implementation,
                  settings["cache_implementation"], out.sequences.tolist()]))
"""
    )
    cache_type, attention, saved_name, tokens = json.loads(line)
    assert (cache_type, attention, saved_name) == ("DynamicCache", "sdpa", "sliding_window_kv")
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert tokens == tiny_model("llama").generate(IDS, **kwargs).tolist()
    window = dict(cache_implementation="sliding_window_kv", cache_config={"window": 6, "sink_tokens": 2})
    assert tokens != tiny_model("llama").generate(IDS, **kwargs, **window).tolist()  # so the cache made a difference


def test_saved_settings_are_used_once_imported_and_a_call_can_override_them(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.generation_config.cache_implementation = "tensor_cache"
    model.generation_config.cache_config = {"window": 4, "sink_tokens": 1}
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    out = loaded.generate(IDS, **kwargs)
    assert isinstance(out.past_key_values, hf_neuralcache.TensorCache) and out.past_key_values.window == 4
    explicit = model.generate(IDS, cache_implementation="tensor_cache", cache_config={"window": 4, "sink_tokens": 1},
                              **kwargs)  # fmt: skip
    assert torch.equal(out.sequences, explicit.sequences)
    assert isinstance(loaded.generate(IDS, cache_implementation="dynamic", **kwargs).past_key_values, DynamicCache)
    other = loaded.generate(IDS, cache_config={"window": 8}, **kwargs).past_key_values  # the saved name, new options
    assert isinstance(other, hf_neuralcache.TensorCache) and other.window == 8
    # generate's hooks (the prefix cache's regime) see the saved cache as if the call had passed it
    saved_call = {"cache_implementation": "tensor_cache", "cache_config": {"window": 4, "sink_tokens": 1}}
    assert registry._with_saved_settings(loaded, {}) == saved_call
    cache = DynamicCache(config=loaded.config)
    assert registry._with_saved_settings(loaded, {CACHE_KWARG: cache}) == {CACHE_KWARG: cache}
    loaded.save_pretrained(tmp_path / "b")  # saving it again keeps the settings
    saved = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert saved["hf_neuralcache"]["cache_config"] == {"window": 4, "sink_tokens": 1}


# ---- point 7: cache_config without cache_implementation -----------------------------------------------------------
def test_cache_config_without_cache_implementation_warns():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"cache_config=\{'window': 4\} is ignored: no cache_implementation.*"
                                         r"cache_implementation='sliding_window_kv'"):  # fmt: skip
        model.generate(IDS, cache_config={"window": 4}, max_new_tokens=2)


# ---- point 5: tensor_cache with any attention implementation ------------------------------------------------------
@pytest.mark.parametrize(
    "arch, attention",
    [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager"),
     ("gemma3_text", "sdpa")],
)  # fmt: skip
def test_tensor_cache_reads_its_memory_with_any_attention_implementation(arch, attention):
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, cache_config={"window": 4, "sink_tokens": 1})  # fmt: skip
    fused = tiny_model(arch, attn_implementation="neuralcache").generate(
        IDS, cache_implementation="tensor_cache", **kwargs
    )
    model = tiny_model(arch, attn_implementation=attention)
    got = model.generate(IDS, cache_implementation="tensor_cache", **kwargs)
    assert torch.equal(got.sequences, fused.sequences)
    for step, (a, b) in enumerate(zip(got.logits, fused.logits, strict=True)):
        assert_close(a, b, 1e-5, f"{arch} {attention} step {step}")
    window_only = model.generate(IDS, cache_implementation="sliding_window_kv", **kwargs)
    assert not all(torch.allclose(a, b) for a, b in zip(got.logits, window_only.logits, strict=True))  # memory read


# ---- point 9: the "neuralcache" implementation without our caches is the model's default ---------------------------
@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_neuralcache_attention_without_our_cache_is_what_the_model_runs_by_default(arch):
    ours, default = tiny_model(arch, attn_implementation="neuralcache"), tiny_model(arch)  # gemma2: eager (softcap)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, default(IDS).logits)
        assert torch.equal(ours(IDS, use_cache=False).logits, default(IDS, use_cache=False).logits)
        cache = {CACHE_KWARG: DynamicCache(config=ours.config)}
        assert torch.equal(ours(IDS, **cache).logits, default(IDS, **cache_like(default)).logits)
    for name in ("dynamic", "static"):
        kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation=name)
        assert torch.equal(ours.generate(IDS, **kwargs), default.generate(IDS, **kwargs)), name


def cache_like(model):
    return {CACHE_KWARG: DynamicCache(config=model.config)}


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
    model = tiny(name)
    assert greedy(model, name, cache_implementation=cache) == greedy(model, name)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "neuralcache"])
def test_gemma3_image_blocks_stay_bidirectional_with_our_caches(attention):
    model, x = tiny("gemma3", attn_implementation=attention), inputs("gemma3")
    with torch.no_grad():
        expected = model(**x, **cache_like(model)).logits
        causal_only = model(**{k: v for k, v in x.items() if k != "token_type_ids"}, **cache_like(model)).logits
        assert not torch.allclose(causal_only, expected, atol=1e-3)  # the image block's overlay matters here
        real = x["attention_mask"].bool()  # the outputs at padding positions are unused (and differ with eager)
        for name in CACHES:
            got = model(**x, **{CACHE_KWARG: hf_neuralcache.create_cache(name, model.config)}).logits
            assert_close(got[real], expected[real], 1e-5, f"{attention} {name}")



def _interpreted_paged_kernels():
    """Decorate the paged kernels again under the interpreter if another test module imported them compiled
    (`triton.jit` decides at decoration time; test_paged_kernels imports them when it is collected)."""
    import importlib
    import sys

    from triton.runtime.interpreter import InterpretedFunction

    for name in ("write", "decode", "prefill"):
        module = sys.modules.get(f"hf_neuralcache.kernels.paged_attention.{name}")
        if module is not None and not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
            importlib.reload(module)


@pytest.mark.parametrize("cache", CACHES)
def test_gemma3_image_blocks_on_the_kernel_paths(triton_interpreter, cache):
    """With the kernels on (Triton's interpreter on the CPU), a forward with an overlay reads the dense mask."""
    _interpreted_paged_kernels()
    model, x = tiny("gemma3", attn_implementation="neuralcache"), inputs("gemma3", batch=1)  # no padding: no mask
    with torch.no_grad():
        expected = model(**x, **cache_like(model)).logits
        got = model(**x, **{CACHE_KWARG: hf_neuralcache.create_cache(cache, model.config)}).logits
    assert_close(got, expected, 1e-5, cache)
    assert greedy(model, "gemma3", cache_implementation=cache) == greedy(tiny("gemma3"), "gemma3")
