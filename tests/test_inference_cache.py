"""InferenceCache: identical requests return the stored result, in generate()'s own type, and nothing else hits."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import hf_neuralcache
from hf_neuralcache import InferenceCache
from hf_neuralcache.hooks.inference import is_time_dependent
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import ForwardCounter


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def cache(tmp_path):
    c = InferenceCache(tmp_path / "inference")
    yield c
    c.close()


def ids(n=12, seed=0, batch=1):
    return torch.randint(5, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


Forwards = ForwardCounter


class Collect(BaseStreamer):
    def __init__(self):
        self.values, self.ended = [], False

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.ended = True


def test_hit_returns_the_stored_tensor_without_running_the_model(model, cache):
    prompt = ids()
    first = model.generate(prompt, max_new_tokens=6, do_sample=False, inference_cache=cache)
    with Forwards(model) as forwards:
        second = model.generate(prompt, max_new_tokens=6, do_sample=False, inference_cache=cache)
    assert forwards.count == 0
    assert torch.equal(first, second) and isinstance(second, torch.Tensor)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1 and cache.stats()["seconds_saved"] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(return_dict_in_generate=True, output_scores=True, output_logits=True),
        dict(return_dict_in_generate=True, output_scores=True, num_beams=3, num_return_sequences=2),
    ],
    ids=["greedy-dict", "beam-dict"],
)
def test_hit_returns_generate_output_of_the_same_type(model, cache, kwargs):
    prompt = ids(seed=1)
    first = model.generate(prompt, max_new_tokens=5, do_sample=False, inference_cache=cache, **kwargs)
    second = model.generate(prompt, max_new_tokens=5, do_sample=False, inference_cache=cache, **kwargs)
    assert type(second) is type(first) and cache.stats()["hits"] == 1
    for name, value in first.items():
        if name in ("past_key_values", "cache"):  # the field is `cache` from transformers 5.24
            assert second.get(name) is None
        elif isinstance(value, torch.Tensor):
            assert torch.equal(second[name], value), name
        else:
            assert all(torch.equal(a, b) for a, b in zip(second[name], value, strict=True)), name


def test_batches_are_one_request(model, cache):
    batch = ids(batch=2, seed=2)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    first = model.generate(batch, attention_mask=mask, max_new_tokens=4, pad_token_id=0, inference_cache=cache)
    second = model.generate(batch, attention_mask=mask, max_new_tokens=4, pad_token_id=0, inference_cache=cache)
    assert torch.equal(first, second) and cache.stats()["hits"] == 1
    model.generate(batch[:1], max_new_tokens=4, pad_token_id=0, inference_cache=cache)
    assert cache.stats()["misses"] == 2


def test_every_setting_that_changes_the_output_is_in_the_key(model, cache):
    prompt = ids(seed=3)
    model.generate(prompt, max_new_tokens=4, inference_cache=cache)
    model.generate(prompt, max_new_tokens=5, inference_cache=cache)
    model.generate(prompt, max_new_tokens=4, repetition_penalty=1.3, inference_cache=cache)
    window = dict(cache_implementation="sliding_window_kv", cache_config={"window": 4})
    model.generate(prompt, max_new_tokens=4, inference_cache=cache, **window)
    tiny_model("llama", seed=1).generate(prompt, max_new_tokens=4, inference_cache=cache)
    assert cache.stats()["misses"] == 5 and cache.stats()["hits"] == 0
    model.generate(prompt, max_new_tokens=4, inference_cache=cache, **window)
    assert cache.stats()["hits"] == 1


def test_sampled_calls_keep_k_answers_then_serve_one_at_random(model, tmp_path, caplog):
    prompt = ids(seed=4)
    cache = InferenceCache(tmp_path / "sampled", sampled_answers=3)
    torch.manual_seed(0)
    drawn = [model.generate(prompt, max_new_tokens=8, do_sample=True, inference_cache=cache) for _ in range(3)]
    assert cache.stats()["misses"] == 3 and cache.stats()["entries"] == 3  # the first k calls ran the model
    assert len({tuple(d[0].tolist()) for d in drawn}) > 1  # sampled, not a constant
    with ForwardCounter(model) as forwards:
        served = [model.generate(prompt, max_new_tokens=8, do_sample=True, inference_cache=cache) for _ in range(12)]
    assert forwards.count == 0 and cache.stats()["hits"] == 12
    stored = {tuple(d[0].tolist()) for d in drawn}
    assert {tuple(s[0].tolist()) for s in served} <= stored and len({tuple(s[0].tolist()) for s in served}) > 1
    torch.manual_seed(7)
    a = model.generate(prompt, max_new_tokens=8, do_sample=True, inference_cache=cache)
    torch.manual_seed(7)
    assert torch.equal(a, model.generate(prompt, max_new_tokens=8, do_sample=True, inference_cache=cache))
    one = InferenceCache(tmp_path / "one", cache_sampled=True, sampled_answers=1)  # the older switch: one sample
    first = model.generate(prompt, max_new_tokens=8, do_sample=True, inference_cache=one)
    assert all(torch.equal(first, model.generate(prompt, max_new_tokens=8, do_sample=True, inference_cache=one))
               for _ in range(3))  # fmt: skip
    never = InferenceCache(tmp_path / "never", sampled_answers=0)
    with caplog.at_level(logging.INFO, logger="hf_neuralcache"):
        for _ in range(2):
            model.generate(prompt, max_new_tokens=4, do_sample=True, inference_cache=never)
    assert never.stats()["bypassed"] == 2 and never.stats()["entries"] == 0
    assert never.stats()["bypassed_by"] == {"sampling with sampled_answers=0": 2}
    assert caplog.text.count("sampling with sampled_answers=0") == 1  # logged once per reason
    with pytest.raises(ValueError, match="sampled_answers must be an int from 0 to 64"):
        InferenceCache(tmp_path / "bad", sampled_answers=-1)


def test_unkeyable_arguments_bypass(model, cache):
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    processors = LogitsProcessorList([MinLengthLogitsProcessor(3, eos_token_id=1)])
    prompt = ids(seed=5)
    for _ in range(2):
        model.generate(prompt, max_new_tokens=4, logits_processor=processors, inference_cache=cache)
    assert cache.stats()["bypassed"] == 2 and cache.stats()["hits"] == 0
    assert cache.stats()["bypassed_by"] == {"logits_processor given": 2}


def test_ttl_expires_entries(model, tmp_path):
    cache = InferenceCache(tmp_path / "ttl", ttl=0.5)
    prompt = ids(seed=6)
    model.generate(prompt, max_new_tokens=3, inference_cache=cache)
    model.generate(prompt, max_new_tokens=3, inference_cache=cache)
    assert cache.stats()["hits"] == 1
    time.sleep(0.7)
    model.generate(prompt, max_new_tokens=3, inference_cache=cache)
    assert cache.stats()["misses"] == 2


class WordTokenizer:
    """Decodes token ids to words (just enough tokenizer for the predicate)."""

    words = {i: f"w{i}" for i in range(200)}

    def decode(self, ids, **kwargs):
        return " ".join(self.words[int(i)] for i in ids)


def test_time_dependent_prompts_are_not_cached(model, tmp_path):
    tokenizer = WordTokenizer()
    tokenizer.words = {**WordTokenizer.words, 7: "today"}
    cache = InferenceCache(tmp_path / "time", tokenizer=tokenizer)
    prompt = torch.tensor([[10, 11, 7, 12]])
    model.generate(prompt, max_new_tokens=3, inference_cache=cache)
    model.generate(prompt, max_new_tokens=3, inference_cache=cache)
    assert cache.stats()["not_cacheable"] == 2 and cache.stats()["hits"] == 0
    custom = InferenceCache(tmp_path / "custom", tokenizer=tokenizer, cacheable=lambda text: "w12" not in text)
    model.generate(prompt, max_new_tokens=3, inference_cache=custom)
    assert custom.stats()["not_cacheable"] == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What day is today?", True),
        ("What's the weather in Paris?", True),
        ("Give me the latest news on AI", True),
        ("What is the current price of bitcoin?", True),
        ("What is the capital of France?", False),
        ("Explain how a KV cache works.", False),
        ("Convert 5 km to miles", False),
        (None, False),
    ],
)
def test_default_predicate(text, expected):
    assert is_time_dependent(text) is expected


def test_streamer_gets_the_same_tokens_on_a_hit(model, cache):
    prompt = ids(seed=7)
    miss, hit = Collect(), Collect()
    model.generate(prompt, max_new_tokens=5, do_sample=False, streamer=miss, inference_cache=cache)
    model.generate(prompt, max_new_tokens=5, do_sample=False, streamer=hit, inference_cache=cache)
    assert cache.stats()["hits"] == 1 and hit.ended and miss.ended
    assert torch.equal(torch.cat([v.flatten() for v in hit.values]), torch.cat([v.flatten() for v in miss.values]))


def test_attach_with_a_per_call_bypass(model, cache):
    prompt = ids(seed=8)
    hf_neuralcache.attach(model, inference_cache=cache)
    try:
        model.generate(prompt, max_new_tokens=3)
        model.generate(prompt, max_new_tokens=3)
        with Forwards(model) as forwards:
            model.generate(prompt, max_new_tokens=3, inference_cache=False)
        assert forwards.count > 0 and cache.stats()["hits"] == 1
    finally:
        hf_neuralcache.detach(model)


def test_namespaces_are_separate(model, tmp_path):
    prompt = ids(seed=9)
    a = InferenceCache(tmp_path / "ns", namespace="a")
    b = InferenceCache(tmp_path / "ns", namespace="b")
    model.generate(prompt, max_new_tokens=3, inference_cache=a)
    model.generate(prompt, max_new_tokens=3, inference_cache=b)
    assert b.stats()["hits"] == 0 and b.stats()["misses"] == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="ttl must be seconds > 0"):
        InferenceCache(tmp_path / "x", ttl=-1)
    with pytest.raises(ValueError, match="namespace must be a str"):
        InferenceCache(tmp_path / "y", namespace=3)
