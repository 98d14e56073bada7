"""tensor_cache with retained tokens (`cache_config["retain"]`): the choice, the memory writes, rollback, beams,
kernels, torch.compile, the prefix cache and the option errors."""

from __future__ import annotations

import pytest
import torch

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG
from hf_neuralcache.caches.retention import RetainedTokens
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import ForwardCounter, assert_close, assert_same_generation, cached_logits


def _ids(batch, length, seed=0, vocab=256):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model(arch="llama", **kwargs):
    return tiny_model(arch, attn_implementation="neuralcache", **kwargs)


def _learned(model, window, sink_tokens):
    from test_learned_kernels import _learned_params  # a memory large enough to matter, a visible decay

    return {k: v for k, v in _learned_params(model, window, sink_tokens).items() if k in ("mode", "params")}


def _states(cache):
    """Every tensor a layer holds: window, memory, and the pool (positions, keys, values, scores)."""
    out = []
    for layer in cache.layers:
        out += [layer.ring.keys, layer.ring.values, *[t for t in layer.state if t is not None]]
        out += layer.pool.tensors()
    return out


def _feed(model, cache, ids, chunks, start=0):
    logits = []
    with torch.no_grad():
        for size in chunks:
            logits.append(model(ids[:, start : start + size], **{CACHE_KWARG: cache}).logits)
            start += size
    return torch.cat(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_pool_holding_every_evicted_token_is_exact(arch):
    """Window + pool >= the sequence: nothing reaches the memory, and generate gives transformers' tokens."""
    model = _model(arch)
    out = assert_same_generation(model, _ids(2, 12), 20, 1e-4, cache_implementation="tensor_cache",
                                 cache_config={"window": 6, "sink_tokens": 2, "retain": 40})  # fmt: skip
    for layer in out[CACHE_KWARG].layers:
        assert int(layer.state.count.sum()) == 0
        assert int((layer.pool.positions >= 0).sum(-1).min()) == 12 + 19 - 6 - 2  # every pair that left the window


def _select_reference(scores, pool_pos, ev_pos, valid, size):
    """Per head: keep the `size` best valid candidates; the losers in position order."""
    kept, lost = [], []
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            cands = [(float(scores[b, h, i]), int(p)) for i, p in enumerate(list(pool_pos[b, h]) + list(ev_pos))]
            ok = [i for i in range(len(cands)) if (cands[i][1] >= 0 if i < size else bool(valid[b, i - size]))]
            best = sorted(ok, key=lambda i: -cands[i][0])[:size]
            kept.append(sorted(cands[i][1] for i in best))
            lost.append(sorted(cands[i][1] for i in ok if i not in best))
    return kept, lost


@pytest.mark.parametrize(("carry", "span"), [(0.0, None), (0.5, None), (0.5, 3), (0.5, 8), (0.25, 1)])
def test_select_keeps_the_best_scored_and_writes_the_rest_oldest_first(carry, span):
    torch.manual_seed(0)
    batch, heads, size, m, dim = 2, 3, 5, 4, 8
    pool = RetainedTokens(size, carry, carry_span=span)
    pool.init(torch.zeros(batch, heads, 1, dim), torch.zeros(batch, heads, 1, dim))
    pool.keys, pool.values = torch.randn(batch, heads, size, dim), torch.randn(batch, heads, size, dim)
    pool.positions = torch.stack([torch.randperm(10)[:size] for _ in range(batch * heads)]).view(batch, heads, size)
    pool.positions[1, :, 0] = -1  # an empty place in the second sequence (every head alike)
    pool.scores = torch.rand(batch, heads, size)
    before = [t.clone() for t in pool.tensors()]
    keys, values = torch.randn(batch, heads, m, dim), torch.randn(batch, heads, m, dim)
    positions = torch.arange(10, 10 + m)
    valid = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # a sink or padding is never kept
    queries = 3
    weights = torch.rand(batch, heads, queries, size + m)
    visible = torch.ones(batch, queries, size + m, dtype=torch.bool)
    visible[:, 0, -1] = False  # the newest leaving pair is after the first query
    weights = torch.where(visible.unsqueeze(1), weights, 0.0)
    score = weights.sum(2) / visible.sum(1).unsqueeze(1)
    if span is None:  # carry per forward
        score[..., :size] += carry * before[3]
    else:  # carry per `span` queries: 3 queries see every pool entry, so `carry ** (3 / span)` of it is kept
        kept = carry ** (queries / span)
        score[..., :size] = score[..., :size] * (1 - kept) / (1 - carry) + kept * before[3]
    out_k, out_v, out_w, record = pool.select(weights, visible, keys, values, positions, valid)
    kept, lost = _select_reference(score, before[2], positions, valid, size)
    got = pool.positions.view(batch * heads, size)
    for row, want in enumerate(kept):
        assert sorted(p for p in got[row].tolist() if p >= 0) == want
    cand_k = torch.cat([before[0], keys], 2)
    cand_pos = torch.cat([before[2], positions.expand(batch, heads, m)], -1)
    for b in range(batch):
        n = int(out_w[b].sum())
        assert torch.equal(out_w[b], torch.tensor([0.0] * (m - n) + [1.0] * n))  # the losers last, weight 1
        for h in range(heads):
            want = lost[b * heads + h]
            assert len(want) == n
            for column, p in zip(range(m - n, m), want, strict=True):  # oldest first, the right pair
                index = int((cand_pos[b, h] == p).nonzero()[0])
                assert torch.equal(out_k[b, h, column], cand_k[b, h, index])
    for b in range(batch):  # a kept pair keeps its key; a pair that moved in has its key
        for h in range(heads):
            for slot in range(size):
                p = int(pool.positions[b, h, slot])
                if p >= 0:
                    index = int((cand_pos[b, h] == p).nonzero()[0])
                    assert torch.equal(pool.keys[b, h, slot], cand_k[b, h, index])
    pool.undo(record)
    for a, b in zip(pool.tensors(), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("span", [None, 4])
def test_padding_queries_neither_score_nor_decay_the_pool(span):
    """A left-padded row's padding queries count for nothing: the choice and the carried scores are those of the
    same forward without them (with `carry_span`, the decay counts real queries only)."""
    torch.manual_seed(1)
    batch, hkv, group, size, m, dim, queries, pad = 1, 2, 3, 4, 2, 8, 5, 2
    pools = [RetainedTokens(size, 0.5, carry_span=span) for _ in range(2)]
    stored = [torch.randn(batch, hkv, size, dim), torch.randn(batch, hkv, size, dim),
              torch.tensor([3, 7, 1, 5]).expand(batch, hkv, size).clone(), torch.rand(batch, hkv, size)]  # fmt: skip
    for pool in pools:
        pool.init(stored[0], stored[1])
        pool.set_tensors([t.clone() for t in stored])
    keys, values = torch.randn(batch, hkv, m, dim), torch.randn(batch, hkv, m, dim)
    positions, valid = torch.tensor([10, 11]), torch.ones(batch, m)
    logits = torch.randn(batch, hkv, group, queries, size + m) * 3
    lse = (logits.logsumexp(-1) + 0.5).reshape(batch, hkv * group, queries)  # the window's and memory's share too
    visible = torch.ones(batch, queries, size + m, dtype=torch.bool)
    real = torch.arange(queries) >= pad
    padded = pools[0].weights(logits, visible, lse, real.expand(batch, queries))
    all_real = torch.ones(batch, queries - pad, dtype=torch.bool)
    alone = pools[1].weights(logits[..., pad:, :], visible[:, pad:], lse[..., pad:], all_real)
    out = [pool.select(*w, keys, values, positions, valid)[:3] for pool, w in zip(pools, (padded, alone), strict=True)]
    for a, b in zip(out[0] + tuple(pools[0].tensors()), out[1] + tuple(pools[1].tensors()), strict=True):
        assert_close(a.float(), b.float(), 1e-6, "padded vs without the padding queries")
    assert not torch.equal(pools[0].scores, stored[3])  # the forward did change the scores


def test_the_memory_gets_exactly_the_evicted_pairs_the_pool_did_not_keep():
    model = _model("qwen2")
    ids = _ids(2, 40, seed=3)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, sink_tokens=2, retain=5)
    _feed(model, cache, ids, [13, 1, 9, 17])
    for layer in cache.layers:
        held = layer.pool.positions
        assert bool((held >= 2).all()) and bool((held < 40 - 8).all())  # no sink, nothing still in the window
        assert all(len(set(row.tolist())) == 5 for row in held.view(-1, 5))
        # 40 tokens - 8 in the window - 2 sinks left it: 5 kept per head, 25 written
        assert torch.equal(layer.state.count, torch.full_like(layer.state.count, 25.0))


def test_retained_tokens_change_the_output_and_cost_their_bytes():
    model = _model()
    ids = _ids(1, 48, seed=4)
    plain = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, sink_tokens=2)
    kept = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, sink_tokens=2, retain=6, carry=0.5)
    a, b = _feed(model, plain, ids, [16] * 3), _feed(model, kept, ids, [16] * 3)
    assert_close(b[:, :10], a[:, :10], 1e-5, "before anything left the window")  # position 10 - 8 = 2, the first
    # from then on pairs that left the window are read exactly instead of estimated by the memory (which is close on
    # a random model's near-uniform attention, so the difference is small but far above rounding)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 2e-5
    layer = kept.layers[0]
    heads, dim = layer.ring.keys.shape[1], layer.ring.keys.shape[-1]
    assert layer.memory_bytes() - plain.layers[0].memory_bytes() == 6 * heads * (2 * dim * 4 + 8 + 4)


@pytest.mark.parametrize("mode", ["training_free", "learned"])
def test_crop_gives_the_state_of_the_shorter_run(mode):
    """Recorded forwards, then `crop` back into the second one: window, memory and pool equal those of a run whose
    last forward stopped at the kept length, and the next forward's logits are the same."""
    model = _model("qwen2")
    ids = _ids(2, 40, seed=5)
    config = dict(window=6, sink_tokens=2, retain=4, carry=0.5, **(_learned(model, 6, 2) if mode == "learned" else {}))
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    fresh = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    _feed(model, cache, ids, [12])
    cache.activate_past_recording()
    _feed(model, cache, ids, [5, 6, 1, 3], start=12)  # 12 .. 27
    cache.crop(-11)  # to 16 tokens: inside the 5-token forward
    _feed(model, fresh, ids, [12, 4])
    assert cache.get_seq_length() == 16
    for a, b in zip(_states(cache), _states(fresh), strict=True):
        assert_close(a, b, 1e-6, "state after crop")
    got, ref = _feed(model, cache, ids, [3, 1], start=16), _feed(model, fresh, ids, [3, 1], start=16)
    assert_close(got, ref, 1e-5, "after crop")
    assert int((cache.layers[0].pool.positions >= 0).sum()) > 0 and float(cache.layers[0].state[0].abs().sum()) > 0


def test_assisted_decoding_runs_and_is_exact_while_the_pool_holds_everything():
    model, assistant = _model(seed=0), _model(seed=1)
    ids = _ids(1, 16)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, cache_implementation="tensor_cache")
    big = dict(kwargs, cache_config={"window": 6, "sink_tokens": 2, "retain": 48})
    assert torch.equal(model.generate(ids, assistant_model=assistant, **big), model.generate(ids, **big))
    small = dict(kwargs, cache_config={"window": 6, "sink_tokens": 2, "retain": 4})
    assert model.generate(ids, assistant_model=assistant, **small).shape == (1, 40)


def test_reorder_moves_the_pool():
    model = _model("qwen2")
    ids = _ids(3, 30)
    beam_idx = torch.tensor([2, 0, 0])
    config = dict(window=6, sink_tokens=2, retain=5)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    reordered = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    _feed(model, cache, ids, [20])
    cache.reorder_cache(beam_idx)
    got = _feed(model, cache, ids[beam_idx], [10], start=20)
    _feed(model, reordered, ids[beam_idx], [20])
    ref = _feed(model, reordered, ids[beam_idx], [10], start=20)
    assert_close(got, ref, 1e-5, "reordered")
    for a, b in zip(_states(cache), _states(reordered), strict=True):
        assert_close(a, b, 1e-6, "reordered state")
    beams = model.generate(ids[:1], num_beams=3, num_return_sequences=2, max_new_tokens=10, do_sample=False,
                           cache_implementation="tensor_cache", cache_config=config)  # fmt: skip
    assert beams.shape == (2, 40)


@pytest.mark.parametrize("mode", ["training_free", "learned"])
def test_kernels_equal_the_reference_path(mode, triton_interpreter, monkeypatch):
    """Chunked prefill with a left-padded row, decode steps, recorded forwards and a crop: the Triton kernels
    (`TRITON_INTERPRET=1`) and the PyTorch path give the same logits, window, memory and pool."""
    model = _model()
    config = dict(window=6, sink_tokens=2, retain=3, **(_learned(model, 6, 2) if mode == "learned" else {}))
    ids = _ids(2, 22, seed=6)
    padding = torch.ones(2, 22, dtype=torch.bool)
    padding[1, :3] = False
    runs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
        logits = cached_logits(model, cache, ids[:, :17], padding[:, :17], [9, 1, 1, 6])
        cache.activate_past_recording()
        position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(ids[:, 17:22], attention_mask=padding.long(), position_ids=position_ids[:, 17:22],
                  **{CACHE_KWARG: cache})  # fmt: skip
        cache.crop(-3)
        runs.append((logits, _states(cache)))
    (kernel_logits, kernel_states), (ref_logits, ref_states) = runs
    assert_close(kernel_logits[padding[:, :17]], ref_logits[padding[:, :17]], 2e-5, "logits, kernels vs reference")
    for a, b in zip(kernel_states, ref_states, strict=True):
        assert_close(a, b, 1e-5, "state")


def test_compiled_decode_step_is_one_graph_and_equals_eager():
    from test_compile import compiled_vs_eager

    config = {"window": 6, "sink_tokens": 2, "retain": 3, "carry": 0.5}
    ours, eager = compiled_vs_eager(_model(), "tensor_cache", config, "retain")
    assert int((eager.layers[0].pool.positions >= 0).sum()) > 0
    for a, b in zip(_states(ours), _states(eager), strict=True):
        assert_close(a, b, 1e-6, "state")


def test_prefix_cache_is_skipped_for_a_cache_whose_state_needs_the_queries(tmp_path):
    """A pool is chosen by attention, which loaded K/V cannot replay: the prefix hook leaves the prefill to the
    model (the tokens of a run without the hook) and stores nothing for it."""
    model = _model()
    ids = _ids(1, 30)
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="tensor_cache",
                  cache_config={"window": 6, "sink_tokens": 2, "retain": 3})  # fmt: skip
    want = model.generate(ids, **kwargs)
    prefix = hf_neuralcache.PrefixCache(tmp_path / "prefix", chunk_tokens=8)
    try:
        for _ in range(2):
            with ForwardCounter(model) as seen:
                assert torch.equal(model.generate(ids, prefix_cache=prefix, **kwargs), want)
            assert seen.lengths[0] == 30  # the whole prompt computed, both times
        assert prefix.stats()["entries"] == 0 and prefix.stats()["hits"] == 0
    finally:
        prefix.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"retain": -1}, "retain"),
        ({"retain": True}, "retain"),
        ({"retain": [1, 2, 3]}, "one int per layer"),
        ({"retain": 2, "mode": "paper"}, "mode='paper'"),
        ({"carry": 0.5}, "with 'retain' only"),
        ({"retain": 2, "carry": 1.0}, "carry"),
        ({"retain": 2, "carry_span": 8}, "applies with carry only"),
        ({"retain": 2, "carry": 0.5, "carry_span": 0}, "carry_span"),
    ],
)
def test_option_errors(config, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        hf_neuralcache.create_cache("tensor_cache", model.config, window=8, **config)


def test_per_layer_retain():
    model = _model()
    layers = model.config.num_hidden_layers
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, retain=[0] + [3] * (layers - 1))
    assert cache.layers[0].pool is None and all(layer.pool.size == 3 for layer in cache.layers[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["training_free", "learned"])
def test_on_gpu_equals_the_cpu_reference(mode):
    """The compiled Triton kernels on CUDA (window and memory) with the pool: generate's tokens and final state equal
    the CPU reference path's, and a recorded forward + crop gives the same state."""
    model = _model()
    config = dict(window=6, sink_tokens=2, retain=5, carry=0.5, **(_learned(model, 6, 2) if mode == "learned" else {}))
    ids = _ids(2, 30, seed=7)
    runs = []
    for device in ("cpu", "cuda"):
        model = model.to(device)
        cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
        logits = _feed(model, cache, ids.to(device), [13, 1, 9])
        cache.activate_past_recording()
        logits = torch.cat([logits, _feed(model, cache, ids.to(device), [7], start=23)], 1)
        cache.crop(-4)
        runs.append((logits.cpu(), [t.cpu() for t in _states(cache)]))
    (cpu_logits, cpu_states), (gpu_logits, gpu_states) = runs
    assert_close(gpu_logits, cpu_logits, 1e-4, "logits, CUDA vs CPU")
    for a, b in zip(gpu_states, cpu_states, strict=True):
        assert_close(a.float(), b.float(), 1e-4, "state, CUDA vs CPU")


def test_carry_span_is_per_forward_carry_for_forwards_of_that_length():
    """Forwards of exactly `carry_span` tokens keep and choose what per-forward carry does; decoded tokens decay the
    carried scores by `carry ** (1 / carry_span)` each, so decoding keeps other tokens than per-forward carry."""
    model = _model()
    ids = _ids(2, 48, seed=11)
    config = {"window": 6, "sink_tokens": 2, "retain": 4, "carry": 0.5, "carry_span": 8}
    states = {}
    for span in (8, None):
        for chunks in ([8] * 6, [8] * 3 + [1] * 24):
            cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
            for layer in cache.layers:
                layer.pool.carry_span = span  # None: the per-forward rule
            logits = _feed(model, cache, ids, chunks)
            states[span, len(chunks)] = (logits, _states(cache))
    for a, b in zip(states[8, 6][1], states[None, 6][1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(states[8, 6][0], states[None, 6][0])
    decoded = zip(states[8, 27][1], states[None, 27][1], strict=True)
    assert any(not torch.equal(a, b) for a, b in decoded)  # one token per forward: the rules differ


def test_a_retention_score_fitted_on_other_chunks_is_refused(tmp_path):
    from test_retention_fit import _fit

    model = _model()
    params = _fit(model, window=6, carry=0.5)
    with pytest.raises(ValueError, match="carry_span=16"):
        hf_neuralcache.create_cache("tensor_cache", model.config, window=6, sink_tokens=2, retain=4, carry=0.5,
                                    retention=params, carry_span=16)  # fmt: skip
