"""paged_kv: exact generation in every mode, page sharing and copy-on-write, rollback, the budget, bad options."""

from __future__ import annotations

import pytest
import torch
from hf_neuralcache.kernels.paged_attention import gather_pages
from transformers import DynamicCache

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.caches.paged import PageBudgetExceededError, PagedKVCache
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, assert_same_generation, cached_logits, reference_logits

IDS = torch.randint(3, 256, (2, 37), generator=torch.Generator().manual_seed(0))
NEW = torch.tensor([[10], [11], [12]])


def paged(model, **config) -> PagedKVCache:
    return hf_neuralcache.create_cache("paged_kv", model.config, **config)


def assert_consistent(cache: PagedKVCache) -> None:
    """Reference counts are the table's counts, free pages are exactly the unreferenced ones."""
    pages = cache.pages
    counts = torch.bincount(pages.table.flatten(), minlength=pages.capacity)
    assert torch.equal(pages.refs, counts)
    assert sorted(pages.free) == (counts == 0).nonzero().flatten().tolist()
    assert pages.table.shape[1] == -(-cache.get_seq_length() // pages.page_size)


@pytest.mark.parametrize(
    "attn, page_size", [("sdpa", 1), ("sdpa", 16), ("eager", 4), ("neuralcache", 4), ("neuralcache", 16)]
)
def test_greedy_equals_dynamic_cache(attn, page_size):
    model = tiny_model("llama", attn_implementation=attn)
    out = assert_same_generation(
        model, IDS, 12, 1e-5, cache_implementation="paged_kv", cache_config={"page_size": page_size}
    )
    assert isinstance(out[CACHE_KWARG], PagedKVCache)
    assert_consistent(out[CACHE_KWARG])


@pytest.mark.parametrize("arch, attn", [("gemma2", "neuralcache"), ("gemma3_text", "sdpa")])
def test_softcap_and_native_sliding_layers(arch, attn):
    model = tiny_model(arch, attn_implementation="eager")  # sliding window 16 < 37 + 24 tokens: the window masks
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True)
    ref = model.generate(IDS, return_dict_in_generate=True, **kwargs)  # SDPA takes no softcap: eager is the reference
    model.set_attn_implementation(attn)
    out = model.generate(IDS, cache_implementation="paged_kv", return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert_close(torch.stack(out.logits), torch.stack(ref.logits), 1e-4, f"{arch} logits")


@pytest.mark.parametrize("attn", ["sdpa", "neuralcache"])
def test_beam_search_and_return_sequences_equal_dynamic_cache(attn):
    model = tiny_model("llama", attn_implementation=attn)
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=3, do_sample=False, output_scores=True)
    kwargs.update(return_dict_in_generate=True)
    ref = model.generate(IDS, **kwargs)
    out = model.generate(IDS, cache_implementation="paged_kv", cache_config={"page_size": 4}, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert_close(out.sequences_scores, ref.sequences_scores, 1e-5, "beam scores")
    assert_consistent(out[CACHE_KWARG])


@pytest.mark.parametrize("attn", ["sdpa", "neuralcache"])
def test_seeded_sampling_equals_dynamic_cache(attn):
    model = tiny_model("llama", attn_implementation=attn)
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(3)
    ref = model.generate(IDS, **kwargs)
    torch.manual_seed(3)
    out = model.generate(IDS, cache_implementation="paged_kv", **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("attn", ["sdpa", "neuralcache"])
def test_assisted_decoding_equals_greedy(attn):
    model = tiny_model("llama", attn_implementation=attn)
    assistant = tiny_model("llama", seed=1, attn_implementation=attn)  # a different model: candidates get rejected
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    greedy = model.generate(IDS[:1], **kwargs)
    paged_kwargs = dict(cache_implementation="paged_kv", cache_config={"page_size": 4}, **kwargs)
    assert torch.equal(model.generate(IDS[:1], **paged_kwargs), greedy)
    assert torch.equal(model.generate(IDS[:1], assistant_model=assistant, **paged_kwargs), greedy)


@pytest.mark.parametrize("attn", ["sdpa", "neuralcache"])
def test_left_padded_batch_and_chunked_prefill(attn):
    model = tiny_model("llama", attn_implementation=attn)
    mask = torch.ones_like(IDS)
    mask[1, :6] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    ref = model.generate(IDS, **kwargs)
    for extra in ({}, {"prefill_chunk_size": 8}):
        out = model.generate(IDS, cache_implementation="paged_kv", cache_config={"page_size": 4}, **kwargs, **extra)
        assert torch.equal(out, ref), extra


@pytest.mark.parametrize("attn", ["sdpa", "neuralcache"])
def test_padding_anywhere_and_odd_chunks_equal_full_forward(attn):
    model = tiny_model("llama", attn_implementation=attn)
    padding = torch.ones_like(IDS, dtype=torch.bool)
    padding[0, 3:5] = False  # padding after real tokens: the gathering fallback
    padding[1, :4] = False
    cache = paged(model, page_size=4)
    got = cached_logits(model, cache, IDS, padding, [9, 1, 1, 5, 3, 1, 17])
    ref = reference_logits(model, IDS, padding, window=10**6, sinks=0)
    real = padding.unsqueeze(-1).expand_as(ref)
    assert_close(got[real], ref[real], 1e-5, "chunked logits")


def test_shared_prompt_copy_on_write_and_crop():
    model = tiny_model("llama")
    cache = paged(model, page_size=4)
    with torch.no_grad():
        model(IDS[:1, :6], **{CACHE_KWARG: cache})  # pages: [full, half]
        cache.batch_repeat_interleave(3)
        assert cache.pages.pages_in_use == 2 and cache.pages.refs.tolist() == [3, 3]
        pools = cache.layers[0].k_pages.data_ptr()
        cache.reorder_cache(torch.tensor([2, 0, 0]))  # a table update, no K/V moved
        assert cache.layers[0].k_pages.data_ptr() == pools and cache.pages.refs.tolist() == [3, 3]
        model(NEW, **{CACHE_KWARG: cache})  # three different tokens into the shared half page
    # two rows copied the half page, the last holder wrote into it in place; the full page stays shared
    assert cache.pages.pages_in_use == 4 and cache.pages.refs[0] == 3
    assert_consistent(cache)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS[:1, :6].expand(3, -1), **{CACHE_KWARG: reference})
        model(NEW, **{CACHE_KWARG: reference})
    for layer, ref in zip(cache.layers, reference.layers, strict=True):
        assert_close(gather_pages(layer.k_pages, cache.pages.table, 7), ref.keys, 1e-6, "keys")
        assert_close(gather_pages(layer.v_pages, cache.pages.table, 7), ref.values, 1e-6, "values")
    cache.crop(-3)  # back to 4 tokens: the half pages are released, the full one stays
    assert cache.get_seq_length() == 4 and cache.pages.pages_in_use == 1
    assert_consistent(cache)
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.pages.refs.tolist()[0] == 1 and cache.pages.table.shape == (1, 1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0


def test_beams_share_the_prompt_memory():
    model = tiny_model("llama")
    prompt = torch.randint(3, 256, (1, 256), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=16, num_beams=8, do_sample=False, return_dict_in_generate=True)
    ref = model.generate(prompt, **kwargs)
    out = model.generate(prompt, cache_implementation="paged_kv", **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    dynamic = sum(
        t.numel() * t.element_size() for layer in ref[CACHE_KWARG].layers for t in (layer.keys, layer.values)
    )
    cache = out[CACHE_KWARG]
    pages = cache.pages
    # 16 prompt pages held once, at most 2 pages of new tokens per beam: well under 8 prompts
    assert pages.pages_in_use <= 16 + 8 * 2
    assert cache.memory_bytes() < 0.25 * dynamic


def test_budget_error_says_what_was_needed_and_leaves_the_cache_unchanged():
    model = tiny_model("llama")
    cache = paged(model, page_size=4, max_pages=9)
    with torch.no_grad():
        model(IDS[:1, :30], **{CACHE_KWARG: cache})  # 8 pages, the last one half full
        table = cache.pages.table.clone()
        with pytest.raises(PageBudgetExceededError, match=r"needs 2 more pages.*max_pages=9.*at least 10 pages"):
            model(IDS[:1, 30:37], **{CACHE_KWARG: cache})  # 2 tokens fill page 8, 5 more need 2 new pages
    assert cache.get_seq_length() == 30 and torch.equal(cache.pages.table, table)
    with pytest.raises(PageBudgetExceededError, match="max_pages=2"):
        model.generate(IDS, cache_implementation="paged_kv", cache_config={"page_size": 16, "max_pages": 2})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"page_size": 0}, r"cache_config\['page_size'\] = 0.*expected an int >= 1"),
        ({"page_size": 16.0}, r"expected an int >= 1"),
        ({"max_pages": 0}, r"cache_config\['max_pages'\] = 0.*expected None or an int >= 1"),
        ({"max_pages": True}, r"expected None or an int >= 1"),
        ({"pages": 4}, r"Unknown cache_config key\(s\) \['pages'\].*allowed keys: \['max_pages', 'page_size'\]"),
    ],
)
def test_bad_options_are_one_value_error(config, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        model.generate(IDS, cache_implementation="paged_kv", cache_config=config, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        hf_neuralcache.create_cache("paged_kv", model.config, **config)
    if "pages" not in config:  # constructed directly, the values are checked too
        with pytest.raises(ValueError, match=message):
            PagedKVCache(model.config, **config)


@pytest.mark.parametrize("q_length, window, starts", [(1, None, [0, 0]), (1, None, [0, 3]), (6, 5, [2, 0])])
def test_cpu_path_gathers_into_sdpa_like_the_reference(q_length, window, starts):
    from hf_neuralcache.kernels.paged_attention import paged_attention, paged_attention_naive

    gen = torch.Generator().manual_seed(0)
    k_pages, v_pages = torch.randn(2, 10, 2, 4, 16, generator=gen)
    table = torch.randperm(10, generator=gen)[:8].view(2, 4)
    query = torch.randn(2, 4, q_length, 16, generator=gen)
    inputs = (query, k_pages, v_pages, table, torch.tensor([15, 9]), torch.tensor(starts), 0.25, None, window)
    assert_close(paged_attention(*inputs), paged_attention_naive(*inputs), 1e-6, "gathered SDPA")


def test_neuralcache_attention_with_autograd_gathers_and_stays_exact():
    model = tiny_model("llama", attn_implementation="neuralcache")
    chunks = [(0, 20), (20, 21), (21, 30)]
    logits = {}
    for grad in (False, True):
        cache = paged(model, page_size=4)
        with torch.set_grad_enabled(grad):
            logits[grad] = [model(IDS[:, a:b], **{CACHE_KWARG: cache}).logits.detach() for a, b in chunks]
        assert cache.pages.in_place is not grad
    for step, (plain, with_grad) in enumerate(zip(logits[False], logits[True], strict=True)):
        assert_close(with_grad, plain, 1e-5, f"chunk {step}")


def test_paged_layers_expose_keys_and_values_as_dynamic_cache_does():
    model = tiny_model("llama")
    paged = hf_neuralcache.create_cache("paged_kv", model.config, page_size=4)
    dynamic = DynamicCache(config=model.config)
    assert paged.layers[0].keys is None
    with torch.no_grad():
        for chunk in (IDS[:, :20], IDS[:, 20:21], IDS[:, 21:]):
            model(chunk, past_key_values=paged)
            model(chunk, past_key_values=dynamic)
    for ours, theirs in zip(paged.layers, dynamic.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    with pytest.raises(AttributeError, match="read-only views gathered from the page pools"):
        paged.layers[0].keys = torch.zeros(1)
