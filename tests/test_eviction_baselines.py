"""benchmarks/eviction_baselines.py: TOVA, H2O and SnapKV as bounded caches (the tensor_cache quality baselines)."""

from __future__ import annotations

import pytest
import torch
from benchmark_helpers import load_benchmark
from transformers import DynamicCache

from hf_neuralcache import CACHE_KWARG
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close

eb = load_benchmark("eviction_baselines")
POLICIES = eb.POLICIES


def _ids(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _feed(model, cache, ids, chunk, after=None):
    logits = []
    with torch.no_grad():
        for begin in range(0, ids.shape[1], chunk):
            logits.append(model(ids[:, begin : begin + chunk], **{CACHE_KWARG: cache}).logits)
            if after is not None:
                after(begin + logits[-1].shape[1])
    return torch.cat(logits, 1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation=eb.ATTENTION)


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_at_least_the_length_is_full_attention(model, policy):
    ids = _ids(2, 40, seed=1)
    cache = eb.EvictionCache(model.config, policy, budget=40, sink_tokens=2, observation=4)
    got = _feed(model, cache, ids, 7)
    ref = _feed(tiny_model("llama"), DynamicCache(config=model.config), ids, 7)  # the same weights, SDPA
    assert_close(got, ref, 1e-5, f"{policy} with a budget >= the length")
    assert cache.held() == [40, 40] and cache.get_seq_length() == 40


@pytest.mark.parametrize("policy", POLICIES)
def test_small_budget_holds_the_budget_keeps_sinks_and_original_keys(model, policy):
    ids = _ids(1, 43, seed=2)
    budget, sinks, chunk = 12, 2, 5
    cache = eb.EvictionCache(model.config, policy, budget=budget, sink_tokens=sinks, observation=4)
    full = DynamicCache(config=model.config)
    _feed(model, full, ids, 43)

    def check(seen):
        assert cache.get_seq_length() == seen
        assert cache.held() == [min(seen, budget)] * 2
        for layer in cache.layers:
            positions = layer.positions
            assert (positions[..., :sinks] == torch.arange(sinks)).all()  # the sinks stay
            assert (positions.diff(dim=-1) > 0).all() and int(positions.max()) < seen
            if policy in ("h2o", "snapkv"):  # both always keep the newest tokens (TOVA may drop them)
                assert int(positions.max()) == seen - 1
        # layer 0's keys do not depend on attention: the kept ones equal the full run's at their positions, RoPE'd at
        # their original positions (never re-rotated)
        layer = cache.layers[0]
        index = layer.positions.unsqueeze(-1).expand(*layer.positions.shape, layer.keys.shape[-1])
        assert_close(layer.keys, full.layers[0].keys.gather(2, index), 1e-6, "kept keys")

    logits = _feed(model, cache, ids, chunk, after=check)
    assert torch.isfinite(logits).all()
    if policy == "h2o":  # recent window: the last (12 - 2) // 2 = 5 positions are always held
        assert (cache.layers[1].positions[..., -5:] == torch.arange(38, 43)).all()
    if policy == "snapkv":  # the observation window is held: the last chunk (40-42) is shorter than 4
        assert (cache.layers[1].positions[..., -3:] == torch.arange(40, 43)).all()
    assert cache.memory_bytes() == sum(
        12 * 2 * (16 * 4 * 2 + 8 + (4 if policy == "h2o" else 0)) for _ in range(2)
    )  # budget x KV heads x (K and V fp32 + an int64 position [+ H2O's fp32 score])


def _layer(policy, budget, sinks, held, **options):
    """An EvictionLayer holding positions 0 .. held - 1 (1 batch row, 1 KV head), as after one forward."""
    layer = eb.EvictionLayer(policy, budget, sink_tokens=sinks, **options)
    layer.update(torch.randn(1, 1, held, 4), torch.randn(1, 1, held, 4))
    return layer


def _kept(layer):
    return layer.positions[0, 0].tolist()


def test_tova_keeps_the_highest_mean_attention():
    layer = _layer("tova", 6, 2, 10)
    weights = torch.zeros(1, 1, 10, 10)
    weights[..., 5] = 0.5  # every query (that sees it) attends to 5 and 8
    weights[..., 8] = 0.3
    weights[..., 9, 9] = 0.9  # seen by the last query only: its mean over visible queries is 0.9
    weights[..., 3] = 0.01
    weights = weights.tril()
    layer.observe(weights)
    assert _kept(layer) == [0, 1, 3, 5, 8, 9]
    last = _layer("tova_last", 5, 2, 10)
    weights = torch.zeros(1, 1, 10, 10)
    weights[..., -1, [4, 6, 7]] = torch.tensor([0.2, 0.3, 0.1])
    weights[..., :-1, 2] = 1.0  # earlier queries do not count
    last.observe(weights)
    assert _kept(last) == [0, 1, 4, 6, 7]


def test_h2o_accumulates_over_forwards_and_keeps_the_recent_window():
    layer = _layer("h2o", 7, 2, 8, recent=2)
    first = torch.zeros(1, 1, 8, 8)
    first[..., 3] = 0.2  # 8 queries x 0.2 = 1.6 accumulated
    first[..., 4] = 0.1  # 0.8
    layer.observe(first)  # 8 entries > 7: evicts 2 or 5 (score 0; 6 and 7 are recent)
    assert len(_kept(layer)) == 7 and {0, 1, 3, 4, 6, 7} <= set(_kept(layer))
    layer.update(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))  # positions 8, 9, 10
    second = torch.zeros(1, 1, 3, 10)
    index = _kept(layer).index(4)
    second[..., index] = 0.5  # 4 overtakes 3: 0.8 + 1.5 = 2.3 > 1.6
    second[..., 7] = 0.1  # position 8: 0.3
    layer.observe(second)
    # sinks 0, 1; recent 9, 10; heavy hitters by accumulated score: 4 (2.3), 3 (1.6), 8 (0.3)
    assert _kept(layer) == [0, 1, 3, 4, 8, 9, 10]


def test_snapkv_pools_the_observation_window_and_keeps_it():
    layer = _layer("snapkv", 2 + 4 + 3, 2, 20, observation=4, pool=3)
    weights = torch.zeros(1, 1, 20, 20)
    weights[..., -4:, 9] = 0.5  # the observation window attends to 9: pooled over 8, 9, 10
    weights[..., :-4, 3] = 1.0  # earlier queries do not count
    layer.observe(weights)
    assert _kept(layer) == [0, 1, 8, 9, 10, 16, 17, 18, 19]


def test_untagged_keys_get_the_same_attention():
    """A DynamicCache (untagged keys) under "eviction_baseline" computes what SDPA computes, chunk by chunk."""
    ids = _ids(1, 20, seed=3)
    a = _feed(tiny_model("llama"), DynamicCache(), ids, 6)
    b = _feed(tiny_model("llama", attn_implementation=eb.ATTENTION), DynamicCache(), ids, 6)
    assert_close(a, b, 1e-5, "untagged keys")


def _learned_memory(heads=1, dim=4, features=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return eb.naive.LearnedMemory(
        torch.randn(heads, dim, features, generator=g), torch.randn(heads, features, generator=g),
        torch.randn(heads, dim, features, generator=g), torch.randn(heads, features, generator=g),
        torch.full((heads,), -0.1), torch.full((heads,), 0.7),
    )  # fmt: skip


@pytest.mark.parametrize("memory", ["moment", "learned"])
def test_memory_gets_exactly_the_evicted_entries(memory):
    torch.manual_seed(0)
    keys, values = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4)
    learned = _learned_memory() if memory == "learned" else None
    layer = eb.EvictionLayer("tova", 6, 2, memory=learned or "moment")
    layer.update(keys, values)
    weights = torch.zeros(1, 1, 10, 10)
    weights[..., 5], weights[..., 8], weights[..., 9, 9], weights[..., 3] = 0.5, 0.3, 0.9, 0.01
    layer.observe(weights.tril())
    assert _kept(layer) == [0, 1, 3, 5, 8, 9]
    gone = torch.tensor([2, 4, 6, 7])  # oldest first
    ones = torch.ones(1, 4)
    if memory == "moment":
        empty = eb.naive.moment_state(1, 1, 4, 4, "moment")
        want = eb.naive.moment_write(empty, keys[:, :, gone], values[:, :, gone], ones, torch.zeros(1))
    else:
        empty = eb.naive.learned_state(1, 1, 6, 4)
        want = eb.naive.learned_write(empty, keys[:, :, gone], values[:, :, gone], ones, learned)
    for got, ref in zip(layer.state, want, strict=True):
        if ref is not None:
            assert_close(got, ref, 1e-6, f"{memory} state")
    held = 6 * 4 * 2 * 4 + 6 * 8  # keys, values (fp32), positions (int64)
    assert layer.memory_bytes() == held + sum(t.numel() * 4 for t in want if t is not None)
    with pytest.raises(ValueError, match="memory must be"):
        eb.EvictionLayer("tova", 6, 2, memory="gaussian")


def test_moment_memory_merges_into_one_softmax():
    """With equal evicted keys the moment estimate is exact: held entries + memory = attention over every entry."""
    torch.manual_seed(1)
    k0 = torch.randn(4)
    keys = k0.expand(1, 1, 10, 4).clone()
    keys[:, :, [0, 1, 3, 5, 8, 9]] = torch.randn(6, 4)  # the entries TOVA keeps differ; the evicted are all k0
    values = torch.randn(1, 1, 10, 3)  # value size 3, key size 4: the two must not be confused
    layer = eb.EvictionLayer("tova", 6, 2, memory="moment")
    layer.update(keys, values)
    weights = torch.zeros(1, 1, 10, 10)
    weights[..., 5], weights[..., 8], weights[..., 9, 9], weights[..., 3] = 0.5, 0.3, 0.9, 0.01
    layer.observe(weights.tril())
    new_k, new_v, query = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 3), torch.randn(1, 2, 3, 4)  # GQA 2
    held_k, held_v = layer.update(new_k, new_v)
    layer.budget = 100  # no eviction after this forward: only the merge is under test
    out, _ = eb.eviction_attention_forward(None, query, held_k, held_v, None, scaling=0.5)
    all_k, all_v = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    visible = torch.arange(13) <= 10 + torch.arange(3)[:, None]
    scores = (query @ all_k.transpose(-1, -2) * 0.5).masked_fill(~visible, float("-inf"))
    ref = (scores.softmax(-1) @ all_v).transpose(1, 2)
    assert_close(out, ref, 1e-5, "held + memory vs every entry")
    without = eb.EvictionLayer("tova", 100, 2)
    k2, v2 = without.update(torch.cat([keys[:, :, [0, 1, 3, 5, 8, 9]], new_k], 2),
                            torch.cat([values[:, :, [0, 1, 3, 5, 8, 9]], new_v], 2))  # fmt: skip
    dropped, _ = eb.eviction_attention_forward(None, query, k2, v2, None, scaling=0.5)
    assert (dropped - ref).abs().max() > 1e-3  # the memory's share matters here


def test_tova_carry_keeps_what_earlier_forwards_attended():
    """With carry, an entry's score is this forward's plus `carry` x its previous one: an entry the chunk ignores
    but the previous chunks attended to stays, where plain TOVA drops it."""
    scores = {}
    for carry in (0.0, 0.5):
        layer = _layer("tova", 6, 2, 6, carry=carry)
        first = torch.zeros(1, 1, 6, 6)
        first[..., 2] = 0.9  # every query attends to 2 (held: 6 <= 6, nothing evicted yet)
        layer.observe(first.tril())
        layer.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))  # positions 6, 7
        second = torch.zeros(1, 1, 2, 8)
        second[..., [3, 4, 5]] = torch.tensor([0.2, 0.25, 0.22])  # the chunk ignores 2 and attends to 3, 4, 5
        second[..., 6] = 0.05
        second[..., 1, 7] = 0.1  # 7: seen by the last query only
        layer.observe(second)
        scores[carry] = _kept(layer)
        assert layer.memory_bytes() == 6 * (4 * 2 * 4 + 8 + (4 if carry else 0))  # + an fp32 score with carry
    assert scores[0.0] == [0, 1, 3, 4, 5, 7]  # 2 (score 0) and 6 (0.05) go
    assert scores[0.5] == [0, 1, 2, 3, 4, 5]  # 2 keeps 0.5 x 0.9 = 0.45, above 3, 4, 5: 6 and 7 go
    with pytest.raises(ValueError, match="carry applies to the TOVA policies"):
        eb.EvictionLayer("h2o", 6, 2, carry=0.5)
    with pytest.raises(ValueError, match=r"carry must be in \[0, 1\)"):
        eb.EvictionLayer("tova", 6, 2, carry=1.0)


def test_per_layer_budgets(model):
    ids = _ids(1, 30, seed=4)
    cache = eb.EvictionCache(model.config, "tova", budget=[6, 11], sink_tokens=2)
    _feed(model, cache, ids, 5)
    assert cache.held() == [6, 11]
    with pytest.raises(ValueError, match="expected one per layer"):
        eb.EvictionCache(model.config, "tova", budget=[6, 11, 12])
    budgets = eb.layer_budgets([0, 256, 0, 128, 0], 300)
    assert budgets == [172, 556, 172, 428, 172]  # the three others share 1,500 - 556 - 428
    assert eb.layer_budgets([0, 256, 0, 0], 100) == [15, 356, 15, 14]  # 44 left for three: the first two get one more
    assert sum(budgets) == 5 * 300
    assert eb.layer_budgets([0, 0], 7) == [7, 7]
    # a layer's extra entries all on one KV head (3 heads): 300 on the others, 300 + 3 x 256 on head 2
    assert eb.layer_budgets([0, 256, 0, 128, 0], 300, {1: 2}, heads=3) == [172, [300, 300, 1068], 172, 428, 172]
    with pytest.raises(ValueError, match="pays for the others"):
        eb.layer_budgets([128, 128], 300)
    with pytest.raises(ValueError, match="leave the other layers"):
        eb.layer_budgets([0, 512], 100)


def test_oracle_attention_is_each_querys_top_entries():
    torch.manual_seed(2)
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 3)  # GQA 2
    forward = eb.AttentionInterface()[eb.oracle_attention(6, sink_tokens=2)]
    out, _ = forward(None, query, key, value, None, scaling=0.3)
    visible = torch.arange(12) <= 7 + torch.arange(5)[:, None]
    for h in range(4):
        g = h // 2
        for t in range(5):
            scores = (query[0, h, t] @ key[0, g].T * 0.3).masked_fill(~visible[t], float("-inf"))
            group = torch.stack([(query[0, j, t] @ key[0, g].T * 0.3).masked_fill(~visible[t], float("-inf"))
                                 for j in (2 * g, 2 * g + 1)]).softmax(-1).mean(0)  # fmt: skip
            group[:2] = 2.0  # the sinks
            top = group.topk(6).indices
            ref = scores[top].softmax(-1) @ value[0, g, top]
            assert_close(out[0, t, h], ref, 1e-5, f"head {h} query {t}")
    everything, _ = eb.AttentionInterface()[eb.oracle_attention(12)](None, query, key, value, None, scaling=0.3)
    scores = (query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~visible, float("-inf"))
    assert_close(everything, (scores.softmax(-1) @ value.repeat_interleave(2, 1)).transpose(1, 2), 1e-5, "full")


def test_windowed_oracle_always_sees_each_querys_last_positions():
    """With `window`, each query sees the sinks, its own last `window` positions and its top other entries."""
    torch.manual_seed(3)
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 14, 8), torch.randn(1, 2, 14, 3)  # GQA 2
    out, _ = eb.AttentionInterface()[eb.oracle_attention(8, sink_tokens=2, window=3)](None, query, key, value, None,
                                                                                      scaling=0.4)  # fmt: skip
    for h in range(4):
        g = h // 2
        for t in range(5):
            position = 9 + t  # the chunk is the last 5 of 14 keys
            seen = torch.arange(14) <= position
            scores = (query[0, h, t] @ key[0, g].T * 0.4).masked_fill(~seen, float("-inf"))
            group = torch.stack([(query[0, j, t] @ key[0, g].T * 0.4).masked_fill(~seen, float("-inf"))
                                 for j in (2 * g, 2 * g + 1)]).softmax(-1).mean(0)  # fmt: skip
            forced = [0, 1, position - 2, position - 1, position]  # 2 sinks and the query's last 3 positions
            rest = [i for i in group.topk(14).indices.tolist() if i not in forced and seen[i]][: 8 - len(forced)]
            top = torch.tensor(forced + rest)
            ref = scores[top].softmax(-1) @ value[0, g, top]
            assert_close(out[0, t, h], ref, 1e-5, f"head {h} query {t}")
            assert len(set(top.tolist())) == 8


def test_per_head_budgets_pad_and_count_what_is_held(model):
    """Per-head budgets: each KV head keeps its own number of entries (the others padded, never attended), the
    bytes count the entries held, and equal per-head budgets give exactly the per-layer result."""
    ids = _ids(1, 40, seed=5)
    same = eb.EvictionCache(model.config, "tova", budget=[[9, 9], 9], sink_tokens=2, memory="moment")
    ref = eb.EvictionCache(model.config, "tova", budget=9, sink_tokens=2, memory="moment")
    assert_close(_feed(model, same, ids, 6), _feed(model, ref, ids, 6), 1e-6, "equal per-head budgets")
    assert same.memory_bytes() == ref.memory_bytes()

    cache = eb.EvictionCache(model.config, "tova", budget=[[5, 13], 9], sink_tokens=2, memory="moment")

    def check(seen):
        layer = cache.layers[0]
        held = (layer.positions >= 0).sum(-1)[0].tolist()
        assert held == [min(seen, 5), min(seen, 13)]
        real = layer.positions[0, 0][layer.positions[0, 0] >= 0]
        assert (real[:2] == torch.arange(2)).all() and (real.diff() > 0).all()  # sinks kept, position order

    logits = _feed(model, cache, ids, 6, after=check)
    assert torch.isfinite(logits).all() and cache.held() == [13, 9]
    entry = 16 * 4 * 2 + 8  # K and V fp32 (head size 16) + an int64 position
    state = sum(t.numel() * 4 for t in cache.layers[0].state if t is not None)
    assert cache.layers[0].memory_bytes() == (5 + 13) * entry + state
    # the padded entries change nothing: a head's own result equals a layer whose every head has that budget
    small = eb.EvictionCache(model.config, "tova", budget=[5, 9], sink_tokens=2, memory="moment")
    _feed(model, small, ids, 6)
    assert cache.layers[0].positions[0, 0][:5].tolist() == small.layers[0].positions[0, 0].tolist()
    for bad, match in [(dict(policy="h2o"), "per-head budgets are for the TOVA"),
                       (dict(budget=[1, 9]), "must hold the 2 sinks")]:  # fmt: skip
        options = {"policy": "tova", "budget": [5, 9], "sink_tokens": 2} | bad
        with pytest.raises(ValueError, match=match):
            eb.EvictionLayer(options.pop("policy"), options.pop("budget"), **options)
