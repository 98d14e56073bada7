"""Property test: whatever was cached before, a generate() call with the prefix cache equals one without it."""

from __future__ import annotations

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_neuralcache import PrefixCache
from hf_neuralcache.models import tiny_model

MODEL = tiny_model("llama", num_hidden_layers=2)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tokens(length, seed):
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@SETTINGS
@given(
    chunk=st.integers(1, 9),
    shared=st.integers(0, 30),
    tails=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 2**16)), min_size=1, max_size=3),
    pads=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    window=st.sampled_from([None, 6]),
    seed=st.integers(0, 2**16),
)
def test_prefix_cache_never_changes_tokens(chunk, shared, tails, pads, window, seed):
    """Earlier calls store prefixes of random prompts sharing a random start; later (batched, left-padded) calls
    must produce exactly the tokens of plain generation, with full, partial or no hits."""
    base = _tokens(shared, seed)
    prompts = [base + _tokens(length, tail_seed) for length, tail_seed in tails]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if window:
        kwargs.update(cache_implementation="sliding_window_kv", cache_config={"window": window, "sink_tokens": 1})
    with tempfile.TemporaryDirectory() as folder:
        cache = PrefixCache(folder, chunk_tokens=chunk)
        for prompt in prompts:  # single-row calls fill the cache
            ids = torch.tensor([prompt])
            assert torch.equal(MODEL.generate(ids, prefix_cache=cache, **kwargs), MODEL.generate(ids, **kwargs))
        rows = [prompts[i % len(prompts)] for i in range(len(pads))]
        width = max(len(r) + p for r, p in zip(rows, pads, strict=True))
        batch = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(batch)
        for b, row in enumerate(rows):
            batch[b, width - len(row) :] = torch.tensor(row)
            mask[b, width - len(row) :] = 1
        ref = MODEL.generate(batch, attention_mask=mask, **kwargs)
        assert torch.equal(MODEL.generate(batch, attention_mask=mask, prefix_cache=cache, **kwargs), ref)
        cache.close()
