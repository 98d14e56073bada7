"""PrefixCache: exact reuse of prompt-prefix K/V across calls, cache implementations, batches and decoding modes."""

from __future__ import annotations

import logging

import pytest
import torch

import hf_neuralcache
from hf_neuralcache import PrefixCache
from hf_neuralcache.hooks.fingerprint import model_fingerprint
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import ForwardCounter, assert_close

CT = 8  # chunk tokens in the tiny-model tests


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def prefix(tmp_path):
    cache = PrefixCache(tmp_path / "prefix", chunk_tokens=CT)
    yield cache
    cache.close()


def ids(n, seed=0, batch=1):
    return torch.randint(5, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


ForwardLengths = ForwardCounter


def test_full_hit_is_exact_and_computes_one_token(model, prefix):
    prompt = ids(4 * CT)
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, prefix_cache=prefix), ref)
    assert prefix.stats()["misses"] == 1 and prefix.stats()["entries"] == 4
    with ForwardLengths(model) as seen:
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, prefix_cache=prefix), ref)
    assert seen.lengths[0] == 1  # 31 tokens loaded, the last one recomputed for its logits
    stats = prefix.stats()
    assert stats["hits"] == 1 and stats["tokens_reused"] == 4 * CT - 1


def test_partial_hit_is_exact_and_prefills_only_the_rest(model, prefix):
    shared = ids(3 * CT + 3)
    model.generate(shared, max_new_tokens=1, prefix_cache=prefix)
    question = torch.cat([shared, ids(11, seed=1)], dim=1)
    ref = model.generate(question, max_new_tokens=6, do_sample=False)
    with ForwardLengths(model) as seen:
        got = model.generate(question, max_new_tokens=6, do_sample=False, prefix_cache=prefix)
    assert torch.equal(got, ref)
    assert seen.lengths[0] == question.shape[1] - 3 * CT
    assert prefix.stats()["partial_hits"] == 1


def test_logits_match_within_1e5(model, prefix):
    prompt = ids(5 * CT + 2, seed=3)
    kwargs = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompt, **kwargs)
    model.generate(prompt, prefix_cache=prefix, **kwargs)
    hit = model.generate(prompt, prefix_cache=prefix, **kwargs)
    assert prefix.stats()["hits"] == 1
    for a, b in zip(hit.logits, ref.logits, strict=True):
        assert_close(a, b, 1e-5, "logits with a prefix hit")


@pytest.mark.parametrize(
    "cache_implementation, cache_config",
    [(None, None), ("dynamic", None), ("sliding_window_kv", {"window": 12, "sink_tokens": 2})],
    ids=["default", "dynamic", "sliding_window_kv"],
)
def test_every_cache_implementation(model, prefix, cache_implementation, cache_config):
    prompt = ids(5 * CT + 1, seed=4)
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
    if cache_config:
        kwargs["cache_config"] = cache_config
    ref = model.generate(prompt, **kwargs)
    for _ in range(2):
        assert torch.equal(model.generate(prompt, prefix_cache=prefix, **kwargs), ref)
    assert prefix.stats()["hits"] == 1


def test_regimes_do_not_mix(model, prefix):
    prompt = ids(3 * CT + 1, seed=5)
    model.generate(prompt, max_new_tokens=2, prefix_cache=prefix)
    window = dict(cache_implementation="sliding_window_kv", cache_config={"window": 8, "sink_tokens": 1})
    model.generate(prompt, max_new_tokens=2, prefix_cache=prefix, **window)
    assert prefix.stats()["misses"] == 2  # a window computes other K/V than full attention


@pytest.mark.parametrize(
    "mode",
    [dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(prefill_chunk_size=5)],
    ids=["greedy", "beams", "beams-return2", "chunked-prefill"],
)
def test_left_padded_batches(model, prefix, mode):
    batch = ids(3 * CT + 2, seed=6, batch=3)
    mask = torch.ones_like(batch)
    mask[1, :5], mask[2, : CT + 1] = 0, 0
    batch[mask == 0] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **mode)
    ref = model.generate(batch, **kwargs)
    for _ in range(2):
        assert torch.equal(model.generate(batch, prefix_cache=prefix, **kwargs), ref)
    assert prefix.stats()["tokens_reused"] > 0


def test_sampling_with_seed(model, prefix):
    prompt = ids(3 * CT + 4, seed=7)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(1)
    ref = model.generate(prompt, **kwargs)
    model.generate(prompt, max_new_tokens=1, prefix_cache=prefix)
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, prefix_cache=prefix, **kwargs), ref)


def test_assisted_decoding(model, prefix):
    assistant = tiny_model("llama", seed=2)
    prompt = ids(3 * CT + 4, seed=8)
    ref = model.generate(prompt, max_new_tokens=10, do_sample=False)
    model.generate(prompt, max_new_tokens=1, prefix_cache=prefix)
    got = model.generate(prompt, max_new_tokens=10, do_sample=False, assistant_model=assistant, prefix_cache=prefix)
    assert torch.equal(got, ref)
    assert prefix.stats()["hits"] == 1


def test_other_models_dtypes_and_namespaces_never_hit(model, tmp_path):
    prompt = ids(3 * CT, seed=9)
    directory = tmp_path / "shared"
    first = PrefixCache(directory, chunk_tokens=CT)
    model.generate(prompt, max_new_tokens=1, prefix_cache=first)
    other = tiny_model("llama", seed=1)  # same architecture, other weights
    other.generate(prompt, max_new_tokens=1, prefix_cache=first)
    wide = tiny_model("llama").to(torch.float64)
    wide.generate(prompt, max_new_tokens=1, prefix_cache=first)
    tenant = PrefixCache(directory, chunk_tokens=CT, namespace="tenant-b")
    model.generate(prompt, max_new_tokens=1, prefix_cache=tenant)
    assert first.stats()["misses"] == 3 and first.stats()["hits"] == 0
    assert tenant.stats()["misses"] == 1
    model.generate(prompt, max_new_tokens=1, prefix_cache=tenant)
    assert tenant.stats()["hits"] == 1  # the tenant's own entry


def test_fingerprint_follows_in_place_weight_changes():
    model = tiny_model("llama")
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(model) != before


def test_cost_check_skips_loads_predicted_slower(model, prefix):
    prompt = ids(4 * CT + 1, seed=10)
    ref = model.generate(prompt, max_new_tokens=4, do_sample=False)
    model.generate(prompt, max_new_tokens=1, prefix_cache=prefix)
    prefix.store.forget_ram()

    def slow_disk(record):
        record["disk_bytes_per_second"] = 1.0  # one byte per second: never worth loading
        return record

    prefix.store.update_record("measurements", slow_disk)
    assert prefix.estimates(model)["prefill_seconds_per_token"] > 0  # measured by the first call
    with ForwardLengths(model) as seen:
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, prefix_cache=prefix), ref)
    assert seen.lengths[0] == prompt.shape[1]
    assert prefix.stats()["skipped_by_cost"] == 1 and prefix.stats()["tokens_reused"] == 0


def test_attach_detach_and_per_call_switch_off(model, prefix):
    prompt = ids(2 * CT + 1, seed=11)
    hf_neuralcache.attach(model, prefix_cache=prefix)
    try:
        model.generate(prompt, max_new_tokens=1)
        model.generate(prompt, max_new_tokens=1)
        assert prefix.stats()["hits"] == 1
        model.generate(prompt, max_new_tokens=1, prefix_cache=False)
        assert prefix.stats()["hits"] == 1 and prefix.stats()["misses"] == 1
    finally:
        hf_neuralcache.detach(model)
    model.generate(prompt, max_new_tokens=1)
    assert prefix.stats()["hits"] == 1


def test_bad_arguments(tmp_path, model):
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        PrefixCache(tmp_path / "a", chunk_tokens=0)
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        PrefixCache(tmp_path / "b", eviction_policy="random")
    with pytest.raises(ValueError, match="prefix_cache must be an hf_neuralcache.PrefixCache"):
        model.generate(ids(4), max_new_tokens=1, prefix_cache="yes")
    hf_neuralcache.InferenceCache(tmp_path / "c")
    with pytest.raises(ValueError, match="holds a 'inference' cache"):
        PrefixCache(tmp_path / "c")


def test_ram_tier_and_disk_tier_stay_within_bounds(model, tmp_path, caplog):
    per_chunk = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 16 * 4 * CT
    cache = PrefixCache(tmp_path / "bounded", chunk_tokens=CT, ram_bytes=3 * per_chunk, disk_bytes=1 << 20)
    for seed in range(12):
        model.generate(ids(6 * CT + 1, seed=100 + seed), max_new_tokens=1, prefix_cache=cache)
    assert cache.store.ram.currsize <= 3 * per_chunk
    assert cache.store.volume() <= 1 << 20
    on_disk = sum(p.stat().st_size for p in (tmp_path / "bounded" / "entries").rglob("*") if p.is_file())
    assert on_disk <= (1 << 20) + (4 << 20)  # the bound plus SQLite's write-ahead log
    with caplog.at_level(logging.INFO, logger="hf_neuralcache.hooks"):
        tiny = PrefixCache(tmp_path / "tiny", chunk_tokens=CT, disk_bytes=1000)
        model.generate(ids(2 * CT + 1), max_new_tokens=1, prefix_cache=tiny)
    assert tiny.stats()["entries"] == 0 and "exceeds disk_bytes=1000" in caplog.text


def test_a_second_process_object_reuses_the_disk_tier(model, tmp_path):
    prompt = ids(3 * CT + 1, seed=12)
    writer = PrefixCache(tmp_path / "p", chunk_tokens=CT)
    model.generate(prompt, max_new_tokens=1, prefix_cache=writer)
    writer.close()
    reader = PrefixCache(tmp_path / "p", chunk_tokens=CT, ram_bytes=0)
    ref = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, prefix_cache=reader), ref)
    assert reader.stats()["hits"] == 1 and reader.stats()["bytes_loaded"] > 0


@pytest.mark.parametrize(
    "architecture, overrides",
    [("mistral", {"sliding_window": 8}), ("gemma2", {}), ("qwen2", {})],
    ids=["mistral-native-sliding", "gemma2-hybrid-softcap", "qwen2"],
)
def test_other_architectures(tmp_path, architecture, overrides):
    model = tiny_model(architecture, **overrides)
    cache = PrefixCache(tmp_path / "p", chunk_tokens=CT)
    prompt = ids(3 * CT + 5, seed=13)
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
    for _ in range(2):
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, prefix_cache=cache), ref)
    assert cache.stats()["hits"] == 1


def test_least_frequently_used_policy_is_applied(tmp_path):
    cache = PrefixCache(tmp_path / "lfu", eviction_policy="least-frequently-used")
    assert cache.store.disk.eviction_policy == "least-frequently-used"
    cache.close()
    assert PrefixCache(tmp_path / "lfu").store.disk.eviction_policy == "least-recently-used"  # the argument wins


@pytest.mark.parametrize("mode", ["training_free", "paper", "learned"])
def test_tensor_cache_is_rebuilt_from_the_stored_prefix(tmp_path, mode):
    """The window and the memory of a tensor_cache rebuilt from loaded prefix K/V give the tokens of a cold run.

    The prefix hook feeds the loaded K/V through `cache.update`, so every mode (the fitted `"learned"` memory too)
    writes the evicted pairs into its memory as a prefill would."""
    model = tiny_model("llama", attn_implementation="neuralcache")
    prompt = ids(5 * CT + 1, seed=6)
    config = {"window": 12, "sink_tokens": 2, "mode": mode}  # 41 tokens: 27 evicted into the memory
    if mode == "learned":  # a params folder (as saved next to a model), with a memory large enough to matter
        params = hf_neuralcache.TensorCacheParams.initial(model, window=12, sink_tokens=2, features=4, seed=1)
        for name in params.tensors:
            if name.endswith("write_log"):
                params.tensors[name].fill_(-1.0)
        params.save_pretrained(tmp_path / "params")
        config["params"] = str(tmp_path / "params")
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="tensor_cache", cache_config=config)
    ref = model.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
    cache = PrefixCache(tmp_path / "prefix", chunk_tokens=CT)
    for _ in range(2):
        out = model.generate(prompt, prefix_cache=cache, output_logits=True, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits, strict=True):
            assert_close(a, b, 1e-5, "logits with a prefix hit into a tensor_cache")
    assert cache.stats()["hits"] == 1 and cache.stats()["tokens_reused"] == 5 * CT
    cache.close()


def test_refitted_params_in_the_same_folder_are_a_miss(tmp_path):
    """The prefix key names what the learned memory's folder holds, not its path: after a refit into the same folder
    the K/V stored with the old parameters (their lower layers' memory shaped them) are not reused."""
    model = tiny_model("llama", attn_implementation="neuralcache")
    prompt = ids(5 * CT + 1, seed=6)

    def write(seed):
        params = hf_neuralcache.TensorCacheParams.initial(model, window=12, sink_tokens=2, features=4, seed=seed)
        for name in params.tensors:
            if name.endswith("write_log"):
                params.tensors[name].fill_(-1.0)
        params.save_pretrained(tmp_path / "params")

    config = {"window": 12, "sink_tokens": 2, "mode": "learned", "params": str(tmp_path / "params")}
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="tensor_cache", cache_config=config)
    cache = PrefixCache(tmp_path / "prefix", chunk_tokens=CT)
    write(seed=1)
    model.generate(prompt, prefix_cache=cache, **kwargs)
    model.generate(prompt, prefix_cache=cache, **kwargs)
    assert cache.stats()["hits"] == 1
    write(seed=2)  # refit into the same folder
    ref = model.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
    out = model.generate(prompt, prefix_cache=cache, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert cache.stats()["hits"] == 1  # a miss: the old K/V are not reused
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert_close(a, b, 1e-5, "logits after a refit")
    params = hf_neuralcache.TensorCacheParams.from_pretrained(tmp_path / "params")  # an object: keyed by content too
    object_kwargs = dict(kwargs, cache_config=dict(config, params=params))
    model.generate(prompt, prefix_cache=cache, **object_kwargs)
    model.generate(prompt, prefix_cache=cache, **object_kwargs)
    assert cache.stats()["hits"] == 2
    params.tensors["layers.0.k_bias"] += 0.5  # the same object, edited: a miss
    model.generate(prompt, prefix_cache=cache, **object_kwargs)
    assert cache.stats()["hits"] == 2
    cache.close()
