"""The fitted retention score of tensor_cache's retained tokens (`cache_config["retention"]`): the ranking, the fit
(against a plain per-candidate least-squares reference), save/load, refusals and rollback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_tensor_cache_retain import _feed, _ids, _states

import hf_neuralcache
from hf_neuralcache.caches.retention import RetainedTokens
from hf_neuralcache.caches.retention_fit import RetentionParams, _accumulate, _Normal, retention_features
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close


class ByteTokenizer:
    """Enough of a tokenizer for `fit_retention`: one id per byte, in the tiny models' vocabulary."""

    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=(torch.tensor([list(text.encode())]) % 250 + 3))


def _model(seed=0):
    return tiny_model("llama", seed=seed, attn_implementation="neuralcache")


def _text(n=400, seed=0):
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "me", "while", "it", "rained"]
    g = torch.Generator().manual_seed(seed)
    return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))


def _fit(model, texts=None, **kwargs):
    options = dict(window=4, sink_tokens=2, chunk=4, carry=0.5, horizon=16, segment_tokens=96, max_segments=2)
    return hf_neuralcache.fit_retention(model, ByteTokenizer(), texts or [_text()], **{**options, **kwargs})


def _pool_inputs(seed=0, batch=1, heads=2, size=4, m=3, dim=8, queries=2):
    g = torch.Generator().manual_seed(seed)
    pool = RetainedTokens(size, 0.5)
    pool.init(torch.zeros(batch, heads, 1, dim), torch.zeros(batch, heads, 1, dim))
    pool.keys = torch.randn(batch, heads, size, dim, generator=g)
    pool.values = torch.randn(batch, heads, size, dim, generator=g)
    held = [torch.randperm(20, generator=g)[:size] + 2 for _ in range(batch * heads)]
    pool.positions = torch.stack(held).view(batch, heads, size)
    pool.scores = torch.rand(batch, heads, size, generator=g)
    keys, values = torch.randn(batch, heads, m, dim, generator=g), torch.randn(batch, heads, m, dim, generator=g)
    weights = torch.rand(batch, heads, queries, size + m, generator=g)
    visible = torch.ones(batch, queries, size + m, dtype=torch.bool)
    return pool, (weights, visible, keys, values, torch.arange(30, 30 + m), torch.ones(batch, m))


def test_a_prior_of_the_score_alone_keeps_what_tova_keeps():
    plain, args = _pool_inputs()
    ranked, _ = _pool_inputs()
    prior = torch.zeros(2, 8 // 2 + 4)
    prior[:, 0] = 1.0  # log(score): the same order as the score
    ranked.prior = prior
    a, b = plain.select(*args, start=40), ranked.select(*args, start=40)
    for x, y in zip(plain.tensors() + list(a[:3]), ranked.tensors() + list(b[:3]), strict=True):
        assert torch.equal(x, y)


def test_a_prior_that_prefers_young_tokens_keeps_the_newest():
    pool, args = _pool_inputs(seed=1)
    candidates = torch.cat([pool.positions, args[4].expand(1, 2, 3)], -1)
    prior = torch.zeros(2, 8 // 2 + 4)
    prior[:, -2] = -10.0  # log(age), and nothing of the score
    pool.prior = prior
    pool.select(*args, start=40)
    want = candidates.sort(-1, descending=True).values[..., :4].sort(-1).values
    assert torch.equal(pool.positions.sort(-1).values, want)


def test_features():
    keys = torch.tensor([[3.0, 0.0, 4.0, 1.0]])  # rotary pairs (0, 2) and (1, 3): norms 5 and 1
    values = torch.tensor([[0.0, 2.0]])
    x = retention_features(torch.tensor([0.25]), keys, values, torch.tensor([7]), 10)
    want = [torch.log(torch.tensor(0.25 + 1e-7)), torch.log(torch.tensor(5 + 1e-3)), torch.log(torch.tensor(1 + 1e-3)),
            torch.log(torch.tensor(2 + 1e-3)), torch.log(torch.tensor(3.0)), torch.tensor(1.0)]  # fmt: skip
    assert_close(x[0], torch.stack(want), 1e-6, "features")


def test_the_fit_solves_the_least_squares_of_every_candidate():
    """`_accumulate` + `solve` equal a plain loop: every forward of `chunk` queries, every token that has left the
    window (not a sink), its TOVA score with carry and the log of the largest weight the next `horizon` queries give."""
    torch.manual_seed(0)
    length, dim, window, chunk, carry, horizon, sinks = 40, 8, 5, 4, 0.5, 12, 2
    query, key, value = torch.randn(1, 4, length, dim), torch.randn(1, 2, length, dim), torch.randn(1, 2, length, dim)
    normal = _Normal(2, dim // 2 + 4)
    _accumulate(normal, query, key, value, 0.3, window, chunk, carry, horizon, sinks)
    got = normal.solve(ridge=0.0)
    for head in range(2):
        logits = query[0, 2 * head : 2 * head + 2] @ key[0, head].T * 0.3
        weights = logits.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf")).softmax(-1).mean(0)
        acc, rows, targets = [0.0] * length, [], []
        for start in range(0, length - chunk, chunk):
            stop = start + chunk
            for j in range(length):
                seen = [t for t in range(start, stop) if t - window >= j]
                acc[j] = (sum(float(weights[t, j]) for t in seen) / len(seen) + carry * acc[j]) if seen else 0.0
            if length - stop < min(horizon, 256):
                continue
            for j in range(sinks, stop - window):
                rows.append(retention_features(torch.tensor([acc[j]]), key[0, head, j : j + 1],
                                               value[0, head, j : j + 1], torch.tensor([j]), start)[0])  # fmt: skip
                targets.append(torch.log(weights[stop : stop + horizon, j].max() + 1e-7))
        x, y = torch.stack(rows).double(), torch.stack(targets).double()
        want = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)
        assert_close(got[head].double(), want, 1e-4, f"head {head}")


def test_fit_save_load_and_use(tmp_path):
    model = _model()
    params = _fit(model)
    assert params.fit["segments"] == 2 and params.fit["tokens"] == 192
    assert sorted(params.weights) == list(range(model.config.num_hidden_layers))
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    assert all(w.shape == (heads, dim // 2 + 4) and torch.isfinite(w).all() for w in params.weights.values())
    again = _fit(model)
    assert all(torch.equal(params.weights[i], again.weights[i]) for i in params.weights)  # deterministic
    assert model.config._attn_implementation == "neuralcache"  # switched back
    params.save_pretrained(tmp_path / "ret")
    loaded = RetentionParams.from_pretrained(tmp_path / "ret")
    assert all(torch.equal(params.weights[i], loaded.weights[i]) for i in params.weights)
    assert (loaded.window, loaded.chunk, loaded.carry, loaded.horizon) == (4, 4, 0.5, 16)
    ids = _ids(1, 40, seed=2)
    config = dict(window=4, sink_tokens=2, retain=5, carry=0.5, carry_span=4)  # the fit's chunk
    plain = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    ranked = hf_neuralcache.create_cache("tensor_cache", model.config, retention=str(tmp_path / "ret"), **config)
    _feed(model, plain, ids, [8] * 5), _feed(model, ranked, ids, [8] * 5)
    pairs = zip(plain.layers, ranked.layers, strict=True)
    assert any(not torch.equal(a.pool.positions, b.pool.positions) for a, b in pairs)
    assert ranked.memory_bytes() == plain.memory_bytes()  # parameters, not state
    out = model.generate(ids[:, :20], max_new_tokens=5, do_sample=False, cache_implementation="tensor_cache",
                         cache_config=dict(config, retention=str(tmp_path / "ret")))  # fmt: skip
    assert out.shape == (1, 25)


def test_crop_with_a_retention_score_gives_the_state_of_the_shorter_run():
    model = _model()
    params = _fit(model, window=6, sink_tokens=2)
    ids = _ids(2, 40, seed=5)
    config = dict(window=6, sink_tokens=2, retain=4, carry=0.5, carry_span=4, retention=params)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    fresh = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    _feed(model, cache, ids, [12])
    cache.activate_past_recording()
    _feed(model, cache, ids, [5, 6, 1, 3], start=12)
    cache.crop(-11)
    _feed(model, fresh, ids, [12, 4])
    for a, b in zip(_states(cache), _states(fresh), strict=True):
        assert_close(a, b, 1e-6, "state after crop")
    assert_close(_feed(model, cache, ids, [3, 1], start=16), _feed(model, fresh, ids, [3, 1], start=16), 1e-5, "after")


def test_refusals(tmp_path):
    model = _model()
    params = _fit(model)
    create = lambda **kw: hf_neuralcache.create_cache("tensor_cache", model.config, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="with 'retain' only"):
        create(window=4, sink_tokens=2, retention=params)
    with pytest.raises(ValueError, match="fitted for window=4, got window=8"):
        create(window=8, sink_tokens=2, retain=3, carry=0.5, retention=params)
    with pytest.raises(ValueError, match="fitted for carry=0.5, got carry=0.25"):
        create(window=4, sink_tokens=2, retain=3, carry=0.25, retention=params)
    other = tiny_model("llama", num_hidden_layers=3, attn_implementation="neuralcache")
    with pytest.raises(ValueError, match="another model"):
        hf_neuralcache.create_cache("tensor_cache", other.config, window=4, retain=3, carry=0.5, retention=params)
    with pytest.raises(ValueError, match="chunks of 4 tokens; got carry_span=64"):
        create(window=4, sink_tokens=2, retain=3, carry=0.5, retention=params)
    cache = create(window=4, sink_tokens=2, retain=3, carry=0.5, carry_span=4, retention=params)
    with pytest.raises(ValueError, match="fingerprint"):  # same shapes, other weights: generate refuses
        cache.check_model(_model(seed=1))
    cache.check_model(model)
    with pytest.raises(ValueError, match="fingerprint"):
        _model(seed=1).generate(_ids(1, 12), max_new_tokens=2, cache_implementation="tensor_cache",
                                cache_config={"window": 4, "sink_tokens": 2, "retain": 3, "carry": 0.5,
                                              "carry_span": 4, "retention": params})  # fmt: skip
    with pytest.raises(ValueError, match="missing"):
        RetentionParams.from_pretrained(tmp_path / "nothing")
    params.save_pretrained(tmp_path / "ret")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "ret" / "retention.safetensors")
    tensors["layers.0.weight"][0, 0] = float("nan")  # a hostile or damaged file
    save_file(tensors, tmp_path / "ret" / "retention.safetensors")
    with pytest.raises(ValueError, match="finite"):
        RetentionParams.from_pretrained(tmp_path / "ret")
    config = json.loads((tmp_path / "ret" / "retention_config.json").read_text())
    (tmp_path / "ret" / "retention_config.json").write_text(json.dumps(dict(config, format_version=99)))
    with pytest.raises(ValueError, match="format_version"):
        RetentionParams.from_pretrained(tmp_path / "ret")
    with pytest.raises(ValueError, match="at least 96 tokens"):
        _fit(model, texts=["short"])
    with pytest.raises(ValueError, match="segment_tokens > window"):
        _fit(model, segment_tokens=24)
    partial = RetentionParams({0: params.weights[0]}, 4, 4, 0.5, 16, params.model_fingerprint, params.signature)
    with pytest.raises(ValueError, match="no weights for layer 1"):
        create(window=4, sink_tokens=2, retain=3, carry=0.5, carry_span=4, retention=partial)
