"""Property tests: any chunking, padding, window and rollback sequence matches the band-plus-sinks reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, cached_logits, reference_logits

MODEL = tiny_model("llama", num_hidden_layers=1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ids(batch, length, seed):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@st.composite
def chunkings(draw, max_length=36):
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=10))
    total, out = 0, []
    for size in sizes:
        size = min(size, max_length - total)
        if size > 0:
            out.append(size)
            total += size
    return out


@SETTINGS
@given(
    chunks=chunkings(),
    window=st.integers(1, 12),
    sinks=st.integers(0, 4),
    pads=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_matches_reference(chunks, window, sinks, pads, seed):
    assume(sinks <= window)  # more sinks than window is refused
    length = sum(chunks)
    ids = _ids(2, length, seed)
    padding = torch.ones(2, length, dtype=torch.bool)
    for row, pad in enumerate(pads):
        padding[row, : min(pad, length - 1)] = False
    cache = hf_neuralcache.create_cache("sliding_window_kv", MODEL.config, window=window, sink_tokens=sinks)
    got = cached_logits(MODEL, cache, ids, padding, chunks)
    ref = reference_logits(MODEL, ids, padding, window, sinks)
    assert_close(got[padding], ref[padding], 1e-5, f"chunks={chunks} window={window} sinks={sinks} pads={pads}")
    assert cache.memory_bytes() <= cache.layers[0].memory_bytes() * len(cache.layers)


@SETTINGS
@given(
    rounds=st.lists(st.tuples(st.integers(1, 24), st.integers(0, 8)), min_size=1, max_size=6),
    window=st.integers(1, 8),
    sinks=st.integers(0, 3),
    max_rollback=st.integers(8, 20),
    seed=st.integers(0, 2**16),
)
def test_any_rollback_sequence_matches_reference(rounds, window, sinks, max_rollback, seed):
    """Rounds of (feed n tokens, crop k <= n of them), as assisted decoding does, then a check forward."""
    assume(sinks <= window)  # more sinks than window is refused
    pool = _ids(1, 160, seed)  # up to 6 rounds x 24 tokens, then the probe
    cache = hf_neuralcache.create_cache(
        "sliding_window_kv", MODEL.config, window=window, sink_tokens=sinks, max_rollback=max_rollback
    )
    cache.activate_past_recording()
    kept, cursor = pool[:, :0], 0
    with torch.no_grad():
        for fed, crop in rounds:
            chunk = pool[:, cursor : cursor + fed]
            cursor += fed
            MODEL(chunk, **{CACHE_KWARG: cache})
            crop = min(crop, fed)
            cache.crop(-crop)
            kept = torch.cat([kept, chunk[:, : fed - crop]], 1)
        assert cache.get_seq_length() == kept.shape[1]
        probe = pool[:, 150:153]
        got = MODEL(probe, **{CACHE_KWARG: cache}).logits
    full = torch.cat([kept, probe], 1)
    ref = reference_logits(MODEL, full, torch.ones_like(full, dtype=torch.bool), window, sinks)[:, -3:]
    assert_close(got, ref, 1e-5, f"rounds={rounds} window={window} sinks={sinks}")
