"""sliding_window_kv on tiny random models: exactness, the band-plus-sinks reference, rollback, batches, memory."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.models import TINY_ARCHITECTURES, tiny_model
from hf_neuralcache.testing import assert_close, assert_same_generation, cached_logits, reference_logits

ARCHS = sorted(TINY_ARCHITECTURES)


def _ids(batch, length, seed=0, vocab=256):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("arch", ARCHS)
def test_large_window_generate_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    kwargs = dict(cache_implementation="sliding_window_kv", cache_config={"window": 64})
    out = assert_same_generation(model, _ids(2, 12), 24, 1e-4, **kwargs)
    assert isinstance(out[CACHE_KWARG], hf_neuralcache.SlidingWindowKVCache)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "chunks",
    [[40], [12] + [1] * 28, [7, 5, 1, 1, 9, 3, 1, 13], [3] * 13 + [1]],
    ids=["prefill", "decode", "mixed", "chunk3"],
)
@pytest.mark.parametrize("pad", [0, 5], ids=["nopad", "leftpad5"])
def test_small_window_matches_band_sink_reference(arch, chunks, pad):
    """Eviction, sinks per row under left padding and multi-token steps against a full-attention reference."""
    model = tiny_model(arch)
    ids = _ids(2, 40, seed=1)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :pad] = False
    # window 8 narrows the gemma2/gemma3 native sliding layers (window 16) too, so every layer has one mask
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=8, sink_tokens=2)
    got = cached_logits(model, cache, ids, padding, chunks)
    ref = reference_logits(model, ids, padding, window=8, sinks=2)
    assert_close(got[padding], ref[padding], 1e-5, f"{arch} {chunks}")


@pytest.mark.parametrize("window", [8, 64])
def test_mistral_with_native_sliding_window(window):
    """Every layer of this Mistral is sliding (16): kept as-is under a wider window, narrowed with sinks otherwise."""
    model = tiny_model("mistral", sliding_window=16)
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=window, sink_tokens=2)
    expected = (16, 0) if window >= 16 else (window, 2)
    assert {(layer.window, layer.sink_tokens) for layer in cache.layers} == {expected}
    ids = _ids(2, 40, seed=2)
    padding = torch.ones_like(ids, dtype=torch.bool)
    got = cached_logits(model, cache, ids, padding, [20, 1, 1, 18])
    assert_close(got, reference_logits(model, ids, padding, *expected), 1e-5, f"mistral window {window}")


def test_half_precision_allocates_in_the_model_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    out = model.generate(
        _ids(1, 12),
        max_new_tokens=10,
        do_sample=False,
        return_dict_in_generate=True,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 6},
    )
    assert out[CACHE_KWARG].layers[0].keys.dtype == torch.bfloat16


def test_native_sliding_layers_keep_their_window():
    model = tiny_model("gemma2")  # layers: sliding(16), full, sliding(16), full
    wide = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=32, sink_tokens=4)
    assert [(layer.window, layer.sink_tokens, layer.is_sliding) for layer in wide.layers] == [
        (16, 0, True),
        (32, 4, False),
        (16, 0, True),
        (32, 4, False),
    ]
    narrow = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=8, sink_tokens=4)
    assert {(layer.window, layer.sink_tokens) for layer in narrow.layers} == {(8, 4)}
    # the model's own sliding layers behave as transformers' DynamicCache makes them, on long inputs too
    ids = _ids(1, 48)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ref = model.generate(ids, **kwargs)
    out = model.generate(ids, cache_implementation="sliding_window_kv", cache_config={"window": 80}, **kwargs)
    assert torch.equal(ref, out)


def _greedy_reference(model, ids, steps, window, sinks):
    seq = ids
    for _ in range(steps):
        logits = reference_logits(model, seq, torch.ones_like(seq, dtype=torch.bool), window, sinks)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_greedy_generate_small_window_equals_reference():
    model = tiny_model("llama")
    ids = _ids(2, 20)
    out = model.generate(
        ids,
        max_new_tokens=30,
        min_new_tokens=30,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 8, "sink_tokens": 2},
    )
    assert torch.equal(out, _greedy_reference(model, ids, 30, 8, 2))


@pytest.mark.parametrize("attn", ["sdpa", "neuralcache"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_assisted_decoding_equals_greedy(sinks, attn):
    """The main and the assistant cache are both rolled back by `crop` after tokens were evicted."""
    model = tiny_model("llama", seed=0, attn_implementation=attn)
    assistant = tiny_model("llama", seed=1, attn_implementation=attn)
    ids = _ids(1, 20)
    kwargs = dict(
        max_new_tokens=40,
        min_new_tokens=40,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 8, "sink_tokens": sinks},
    )
    greedy = model.generate(ids, **kwargs)
    assisted = model.generate(ids, assistant_model=assistant, **kwargs)
    lookup = model.generate(ids, prompt_lookup_num_tokens=3, **kwargs)
    assert torch.equal(assisted, greedy)
    assert torch.equal(lookup, greedy)


def test_crop_restores_the_window_exactly():
    model = tiny_model("llama")
    ids = _ids(2, 30)
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    with torch.no_grad():
        model(ids[:, :12], **{CACHE_KWARG: cache})
        snapshot = [(layer.keys.clone(), layer.values.clone(), layer.sink_slots.clone()) for layer in cache.layers]
        cache.activate_past_recording()
        model(ids[:, 12:22], **{CACHE_KWARG: cache})  # evicts everything the window held
        model(ids[:, 22:25], **{CACHE_KWARG: cache})
        cache.crop(-13)
    assert cache.get_seq_length() == 12
    for layer, (keys, values, sinks) in zip(cache.layers, snapshot, strict=True):
        window = slice(layer.sink_tokens, layer.sink_tokens + layer.capacity)
        assert torch.equal(layer.keys[:, :, window], keys[:, :, window])
        assert torch.equal(layer.values[:, :, window], values[:, :, window])
        assert torch.equal(layer.sink_slots, sinks)
    # and the continuation equals a cache that never saw the removed tokens
    fresh = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    with torch.no_grad():
        model(ids[:, :12], **{CACHE_KWARG: fresh})
        a = model(ids[:, 25:27], **{CACHE_KWARG: cache}).logits
        b = model(ids[:, 25:27], **{CACHE_KWARG: fresh}).logits
    assert_close(a, b, 1e-6, "after crop")


def test_crop_without_recording_raises_after_eviction():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=4, sink_tokens=1)
    with torch.no_grad():
        model(_ids(1, 3), **{CACHE_KWARG: cache})
        cache.crop(-1)  # nothing evicted yet: fine
        assert cache.get_seq_length() == 2
        model(_ids(1, 10), **{CACHE_KWARG: cache})
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_reorder_equals_recomputing_the_reordered_sequences():
    model = tiny_model("qwen2")
    ids = _ids(3, 20)
    beam_idx = torch.tensor([2, 0, 0])
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    with torch.no_grad():
        model(ids[:, :15], **{CACHE_KWARG: cache})
        cache.reorder_cache(beam_idx)
        got = model(ids[beam_idx, 15:], **{CACHE_KWARG: cache}).logits
    ref = reference_logits(model, ids[beam_idx], torch.ones(3, 20, dtype=torch.bool), 6, 2)[:, 15:]
    assert_close(got, ref, 1e-5, "reordered")


def test_beam_search_and_sampling():
    model = tiny_model("llama")
    ids = _ids(2, 10)
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, do_sample=False, early_stopping=True)
    ref = model.generate(ids, **beam)
    out = model.generate(ids, cache_implementation="sliding_window_kv", cache_config={"window": 64}, **beam)
    assert torch.equal(ref, out)
    small = model.generate(ids, cache_implementation="sliding_window_kv", cache_config={"window": 4}, **beam)
    assert small.shape[0] == 4
    sample = dict(do_sample=True, num_return_sequences=3, max_new_tokens=12, top_k=20)
    torch.manual_seed(7)
    ref = model.generate(ids, **sample)
    torch.manual_seed(7)
    out = model.generate(ids, cache_implementation="sliding_window_kv", cache_config={"window": 64}, **sample)
    assert torch.equal(ref, out)


def test_left_padded_batch_rows_equal_rows_alone():
    model = tiny_model("llama")
    long, short = _ids(1, 16, seed=3), _ids(1, 9, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    kwargs = dict(
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 6, "sink_tokens": 3},
    )
    out = model.generate(batch, attention_mask=mask, **kwargs)
    alone_long = model.generate(long, **kwargs)
    alone_short = model.generate(short, **kwargs)
    assert torch.equal(out[0], alone_long[0])
    assert torch.equal(out[1, 7:], alone_short[0])


def test_memory_stops_growing_once_the_window_is_full():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=16, sink_tokens=4)
    dynamic = DynamicCache(config=model.config)
    sizes, dynamic_sizes = [], []
    with torch.no_grad():
        for chunk in _ids(1, 120).split(10, dim=1):
            model(chunk, **{CACHE_KWARG: cache})
            model(chunk, **{CACHE_KWARG: dynamic})
            sizes.append(cache.memory_bytes())
            dynamic_sizes.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers))
    # per layer: (4 sinks + 16 window) x 2 kv heads x 16 dims x (keys + values) x 4 bytes, plus the position table;
    # allocated at once (a fixed shape, for torch.compile)
    per_layer = (4 + 16) * 2 * 16 * 2 * 4 + (4 + 16) * 8
    assert sizes == [per_layer * 2] * len(sizes)
    assert dynamic_sizes[-1] == 120 * 2 * 16 * 2 * 4 * 2 > sizes[-1]


def test_neuralcache_attention_reads_the_layer_state():
    sdpa = tiny_model("llama")
    ours = tiny_model("llama", attn_implementation="neuralcache")
    ids = _ids(2, 30)
    padding = torch.ones(2, 30, dtype=torch.bool)
    padding[0, :4] = False
    calls = []
    original = hf_neuralcache.attention.window_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    hf_neuralcache.attention.window_attention = spy
    try:
        outs = []
        for model in (sdpa, ours):
            cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=5, sink_tokens=2)
            outs.append(cached_logits(model, cache, ids, padding, [10, 1, 1, 8, 10]))
    finally:
        hf_neuralcache.attention.window_attention = original
    assert len(calls) == 5 * 2  # every forward of every layer took the cache-aware path
    assert_close(outs[1][padding], outs[0][padding], 1e-5, "neuralcache vs sdpa")
    # with no cache of ours in play it is exactly sdpa
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, sdpa(ids).logits)
        dyn = ours.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(dyn, sdpa.generate(ids, max_new_tokens=5, do_sample=False))


def test_chunked_prefill_in_generate():
    model = tiny_model("llama")
    ids = _ids(2, 30)
    kwargs = dict(
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        cache_implementation="sliding_window_kv",
        cache_config={"window": 6, "sink_tokens": 2},
    )
    assert torch.equal(model.generate(ids, prefill_chunk_size=7, **kwargs), model.generate(ids, **kwargs))


def test_mask_sizes_match_what_update_returns():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
    with torch.no_grad():
        for size in (4, 1, 1, 5, 1, 9, 1):
            expected = cache.get_mask_sizes(size, 0)
            layer = cache.layers[0]
            keys, _ = layer.update(*(torch.zeros(1, 2, size, 16),) * 2, step=cache.step(layer.seen, size))
            assert (keys.shape[-2], 0) == expected, size
            for other in cache.layers[1:]:
                other.update(*(torch.zeros(1, 2, size, 16),) * 2, step=cache.step(other.seen, size))


@pytest.mark.parametrize("attn", ["eager", "flex_attention"])
def test_other_attention_implementations_get_the_exact_mask(attn):
    """The mask hook builds the mask in the format each implementation's mask function gives."""
    model = tiny_model("llama", attn_implementation=attn)
    ids = _ids(2, 24, seed=5)
    padding = torch.ones_like(ids, dtype=torch.bool)
    padding[0, :3] = False
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=5, sink_tokens=2)
    got = cached_logits(model, cache, ids, padding, [10, 1, 1, 12])
    assert_close(got[padding], reference_logits(tiny_model("llama"), ids, padding, 5, 2)[padding], 1e-5, attn)


def test_causal_prefill_builds_no_mask_and_keeps_no_per_forward_state():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=64)
    masks = []
    build = cache.attention_mask
    cache.attention_mask = lambda *a, **k: masks.append(build(*a, **k)) or masks[-1]
    with torch.no_grad():
        model(_ids(2, 40), **{CACHE_KWARG: cache})  # no padding, shorter than the window: SDPA's is_causal
        model(_ids(2, 1), **{CACHE_KWARG: cache})  # the buffer has empty entries: a [B, 1, 1, K] boolean mask
    assert masks[0] is None
    assert masks[1].dtype == torch.bool and masks[1].shape == (2, 1, 1, 4 + 64)
    assert cache._step is None  # the forward's masks are not kept alive by the cache


def test_recording_left_on_stays_bounded():
    """generate leaves past recording on after assisted decoding; the journal must not grow without bound."""
    model = tiny_model("llama")
    config = {"window": 6, "sink_tokens": 2, "max_rollback": 10}
    out = model.generate(
        _ids(1, 12),
        prompt_lookup_num_tokens=3,
        max_new_tokens=20,
        do_sample=False,
        return_dict_in_generate=True,
        cache_implementation="sliding_window_kv",
        cache_config=config,
    )
    cache = out[CACHE_KWARG]
    assert all(layer.record_past for layer in cache.layers)
    entry = 2 * 16 * 2 * 4  # kv heads x head dim x (keys + values) x fp32
    bound = len(cache.layers) * (2 + 6 + 10) * (entry + 8)  # + a position per entry (table and journal)
    with torch.no_grad():
        for token in _ids(1, 200, seed=9).split(1, dim=1):
            model(token, **{CACHE_KWARG: cache})
            assert cache.memory_bytes() <= bound
    with pytest.raises(RuntimeError, match="max_rollback=10"):
        cache.crop(-11)
    cache.crop(-10)  # within the bound: restored exactly
    kept = torch.cat([out.sequences[:, :-1], _ids(1, 200, seed=9)], 1)[:, :-10]
    probe = _ids(1, 3, seed=11)
    with torch.no_grad():
        got = model(probe, **{CACHE_KWARG: cache}).logits
    full = torch.cat([kept, probe], 1)
    ref = reference_logits(model, full, torch.ones_like(full, dtype=torch.bool), 6, 2)[:, -3:]
    assert_close(got, ref, 1e-5, "after a crop with recording left on")


def test_long_prompt_under_recording_journals_at_most_max_rollback():
    model = tiny_model("llama")
    cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=8, max_rollback=5)
    cache.activate_past_recording()
    with torch.no_grad():
        model(_ids(1, 300), **{CACHE_KWARG: cache})
    assert all(layer.journal[1].shape[2] == 5 for layer in cache.layers)


def test_a_finished_cache_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model = tiny_model("llama")
    gc.disable()
    try:
        cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=4)
        with torch.no_grad():
            model(_ids(1, 6), **{CACHE_KWARG: cache})
            model(_ids(1, 1), **{CACHE_KWARG: cache})  # decode: the tag sits on the layer's own buffer
        buffer = weakref.ref(cache.layers[0].keys)
        del cache
        assert buffer() is None
    finally:
        gc.enable()


def test_direct_construction_checks_options_too():
    from hf_neuralcache import SlidingWindowKVCache

    config = tiny_model("llama").config
    with pytest.raises(ValueError, match=r"Invalid cache_config\['window'\] = 0"):
        SlidingWindowKVCache(config, window=0)
    with pytest.raises(ValueError, match=r"Invalid cache_config\['sink_tokens'\] = -1"):
        SlidingWindowKVCache(config, sink_tokens=-1)


def test_more_sinks_than_window_is_refused():
    model = tiny_model("llama")
    message = r"sliding_window_kv'.*sink_tokens=5 is larger than window=4; expected sink_tokens <= window"
    with pytest.raises(ValueError, match=message):
        model.generate(_ids(1, 5), max_new_tokens=2, cache_implementation="sliding_window_kv",
                       cache_config={"window": 4, "sink_tokens": 5})
    assert hf_neuralcache.create_cache("sliding_window_kv", model.config, window=4, sink_tokens=4).sink_tokens == 4
