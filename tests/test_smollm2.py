"""sliding_window_kv end to end on the embedded SmolLM2-135M-Instruct (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import pipeline

import hf_neuralcache
from hf_neuralcache import (
    CACHE_KWARG,  # "cache" from transformers 5.24, else "past_key_values"
    registry,
)
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, assert_same_generation, cached_logits, reference_logits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "adventures_of_sherlock_holmes.txt"


@pytest.fixture(scope="module")
def text_ids(smollm):
    _, tokenizer = smollm
    if DATA.exists():
        text = DATA.read_text(encoding="utf-8-sig")[3000:9000]
    else:  # the shared data sits beside the checkout; keep the suite runnable without it
        text = " ".join(f"Sentence {i} of a long and winding story about a detective." for i in range(200))
    return tokenizer(text, return_tensors="pt").input_ids[:, :300]


def test_window_at_least_length_is_exact(smollm, text_ids):
    model, _ = smollm
    kwargs = dict(cache_implementation="sliding_window_kv", cache_config={"window": 256})
    assert_same_generation(model, text_ids[:, :120], 32, 1e-4, **kwargs)


def test_small_window_equals_band_sink_reference(smollm, text_ids):
    model, _ = smollm
    padding = torch.ones_like(text_ids, dtype=torch.bool)
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=64, sink_tokens=4)
    got = cached_logits(model, cache, text_ids, padding, [150] + [1] * 30 + [7, 33, 80])
    ref = reference_logits(model, text_ids, padding, window=64, sinks=4)
    assert_close(got, ref, 1e-4, "SmolLM2 window 64")


def test_assisted_decoding_with_eviction_equals_greedy(smollm, text_ids):
    model, _ = smollm
    assistant = tiny_model("llama", vocab_size=model.config.vocab_size)
    kwargs = dict(
        max_new_tokens=48,
        min_new_tokens=48,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 32, "sink_tokens": 4},
    )
    prompt = text_ids[:, :40]
    greedy = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, assistant_model=assistant, **kwargs), greedy)


def test_bytes_held_are_bounded(smollm, text_ids):
    model, _ = smollm
    config = model.config
    cache = hf_neuralcache.create_cache("sliding_window_kv", config, window=32, sink_tokens=4)
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    expected = config.num_hidden_layers * (4 + 32) * (kv_heads * head_dim * 2 * 4 + 8)  # + the position table
    held = []
    prompt = text_ids[:, :40]
    for new in (30, 60):
        model.generate(prompt, **{CACHE_KWARG: cache}, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        held.append(cache.memory_bytes())
        prompt = torch.cat([prompt, text_ids[:, 40 + new : 41 + new]], 1)
        cache = hf_neuralcache.create_cache("sliding_window_kv", config, window=32, sink_tokens=4)
    assert held == [expected, expected]


def test_stock_pipeline_with_call_argument_and_saved_config(smollm, tmp_path, monkeypatch):
    model, tokenizer = smollm
    built = []
    create = registry.create_cache
    monkeypatch.setattr(registry, "create_cache", lambda *a, **k: built.append(a[0]) or create(*a, **k))
    messages = [{"role": "user", "content": "Name a primary colour."}]
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    plain = pipe(messages, max_new_tokens=12, do_sample=False)
    ours = pipe(
        messages,
        max_new_tokens=12,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 512},
    )
    assert built == ["sliding_window_kv"]
    assert ours[0]["generated_text"] == plain[0]["generated_text"]

    model.generation_config.cache_implementation = "sliding_window_kv"
    model.generation_config.cache_config = {"window": 512, "sink_tokens": 4}
    try:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
    finally:
        model.generation_config.cache_implementation = None
        model.generation_config.cache_config = None
    saved = pipeline("text-generation", model=str(tmp_path))
    assert saved(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"] == plain[0]["generated_text"]
    assert built == ["sliding_window_kv", "sliding_window_kv"]
