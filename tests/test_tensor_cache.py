"""tensor_cache: exactness, chunked == token-by-token, the paper equations, rollback, beams, memory, options."""

from __future__ import annotations

import pytest
import torch

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.caches.tensor_cache import TensorCache, TensorCacheLayer
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, assert_same_generation, cached_logits

ARCHS = ["llama", "qwen2", "gemma3_text"]
CONFIGS = {
    "moment": {},
    "mean-decay": {"memory": "mean", "decay": 0.9},
    "gaussian": {"memory": "gaussian"},
    "paper-delta": {"mode": "paper", "rule": "delta", "write_rate": 0.5},
    "paper-outer": {"mode": "paper", "rule": "outer", "decay": 0.9},
}


def _ids(batch, length, seed=0, vocab=256):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def _model(arch="llama", **kwargs):
    return tiny_model(arch, attn_implementation="neuralcache", **kwargs)


def _states(cache):
    out = []
    for layer in cache.layers:
        state = layer.state if isinstance(layer.state, torch.Tensor) else [t for t in layer.state if t is not None]
        out.append([layer.ring.keys, layer.ring.values, *([state] if isinstance(state, torch.Tensor) else state)])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_large_window_generate_equals_dynamic_cache(arch):
    kwargs = dict(cache_implementation="tensor_cache", cache_config={"window": 64})
    out = assert_same_generation(_model(arch), _ids(2, 12), 24, 1e-4, **kwargs)
    assert isinstance(out[CACHE_KWARG], TensorCache)
    assert all(int(layer.state.count.sum()) == 0 for layer in out[CACHE_KWARG].layers if hasattr(layer, "state"))


def test_smollm2_large_window_equals_dynamic_cache(smollm):
    model, tokenizer = smollm
    model.set_attn_implementation("neuralcache")
    try:
        ids = tokenizer("The detective looked at the letter and said that", return_tensors="pt").input_ids
        kwargs = dict(cache_implementation="tensor_cache", cache_config={"window": 64})
        assert_same_generation(model, ids, 16, 1e-4, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_prefill_equals_token_by_token(name):
    """Outputs and final states (window and memory), with sinks and a left-padded row."""
    model = _model("qwen2")
    ids = _ids(2, 40, seed=1)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :5] = False
    results = []
    for chunks in ([40], [1] * 40, [7, 5, 1, 1, 9, 3, 1, 13]):
        cache = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, sink_tokens=2, **CONFIGS[name])
        results.append((cached_logits(model, cache, ids, padding, chunks), _states(cache)))
    (ref, ref_states), *others = results
    assert ref_states[0][2].abs().sum() > 0  # the memory was written
    for logits, states in others:
        assert_close(logits[padding], ref[padding], 2e-5, f"{name} logits")
        for a, b in zip(states, ref_states, strict=True):
            for x, y in zip(a, b, strict=True):
                assert_close(x, y, 1e-4, f"{name} state")


def test_memory_changes_the_output_only_after_eviction():
    model = _model()
    ids = _ids(1, 30)
    padding = torch.ones_like(ids, dtype=torch.bool)
    window = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=8, sink_tokens=2)
    tensor = hf_neuralcache.create_cache("tensor_cache", model.config, window=8, sink_tokens=2)
    a = cached_logits(model, window, ids, padding, [30])
    b = cached_logits(model, tensor, ids, padding, [30])
    assert_close(b[:, :8], a[:, :8], 1e-5, "before any eviction")
    assert (b[:, 9:] - a[:, 9:]).abs().amax() > 1e-3


def _layer_run(layer, q, k, v, chunks, scaling):
    """Feed `[1, H, T, D]` tensors through a bare layer in chunks; returns the outputs `[1, Hq, T, D]`."""
    outs, start = [], 0
    for size in chunks:
        s = slice(start, start + size)
        keys, values = layer.update(k[:, :, s], v[:, :, s])
        outs.append(layer.attention(q[:, :, s], keys, values, keys._neuralcache_state, scaling))
        start += size
    return torch.cat(outs, 2)


def _window_softmax(q, keys, values, scaling):
    scores = (keys @ q) * scaling  # [n]
    return torch.softmax(scores, 0), torch.logsumexp(scores, 0)


@pytest.mark.parametrize("rule", ["outer", "delta"])
def test_paper_mode_equals_the_equations(rule):
    """A direct transcription: read r = q A, attend the window, then write the pair leaving the window."""
    torch.manual_seed(0)
    heads, dim, length, window, lam, eta, gate = 2, 8, 30, 6, 0.9, 0.3, -1.0
    q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
    layer = TensorCacheLayer(window, 0, mode="paper", rule=rule, decay=lam, write_rate=eta, gate=gate)
    got = _layer_run(layer, q, k, v, [11, 1, 1, 17], dim**-0.5)
    expected = torch.zeros(heads, length, dim)
    for h in range(heads):
        a = torch.zeros(dim, dim)
        for t in range(length):
            lo = max(0, t - window + 1)
            probs, _ = _window_softmax(q[0, h, t], k[0, h, lo : t + 1], v[0, h, lo : t + 1], dim**-0.5)
            expected[h, t] = probs @ v[0, h, lo : t + 1] + torch.sigmoid(torch.tensor(gate)) * (q[0, h, t] @ a)
            if t - window >= 0:  # position t - window leaves the window after query t has read A
                k_hat = k[0, h, t - window] / k[0, h, t - window].norm()
                u = v[0, h, t - window] - (k_hat @ a if rule == "delta" else 0)
                a = lam * a + eta * torch.outer(k_hat, u)
        assert_close(layer.state[0, h], a, 1e-4, f"{rule} state head {h}")
    assert_close(got[0], expected, 1e-4, f"{rule} outputs")


def test_training_free_read_equals_the_formula():
    """Query t: window (t - W, t] merged with the first-order moment estimate of every position <= t - W."""
    torch.manual_seed(1)
    heads, dim, length, window, lam = 1, 4, 20, 5, 0.9
    q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
    layer = TensorCacheLayer(window, 0, memory="moment", decay=lam)
    got = _layer_run(layer, q, k, v, [9, 1, 10], 0.5)
    for t in range(length):
        s = 0.5 * q[0, 0, t]
        lo = max(0, t - window + 1)
        probs, lse_w = _window_softmax(q[0, 0, t], k[0, 0, lo : t + 1], v[0, 0, lo : t + 1], 0.5)
        out_w = probs @ v[0, 0, lo : t + 1]
        if lo == 0:
            assert_close(got[0, 0, t], out_w, 1e-5, f"t={t}")
            continue
        w = lam ** torch.arange(lo - 1, -1, -1.0)  # age of positions 0 .. lo - 1
        n = w.sum()
        mu, mu_v = (w[:, None] * k[0, 0, :lo]).sum(0) / n, (w[:, None] * v[0, 0, :lo]).sum(0) / n
        cov = (w[:, None, None] * v[0, 0, :lo, :, None] * k[0, 0, :lo, None, :]).sum(0) / n - torch.outer(mu_v, mu)
        out_m, lse_m = mu_v + cov @ s, torch.log(n) + s @ mu
        z_w, z_m = torch.exp(lse_w), torch.exp(lse_m)
        assert_close(got[0, 0, t], (z_w * out_w + z_m * out_m) / (z_w + z_m), 1e-5, f"t={t}")


@pytest.mark.parametrize("name", ["moment", "paper-delta"])
def test_crop_undoes_memory_writes_exactly(name):
    model = _model()
    ids = _ids(2, 30)
    config = dict(window=6, sink_tokens=2, **CONFIGS[name])
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    fresh = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    with torch.no_grad():
        model(ids[:, :12], **{CACHE_KWARG: cache})
        cache.activate_past_recording()
        model(ids[:, 12:16], **{CACHE_KWARG: cache})
        model(ids[:, 16:22], **{CACHE_KWARG: cache})
        model(ids[:, 22:25], **{CACHE_KWARG: cache})
        cache.crop(-11)  # lands inside the second recorded forward
        model(ids[:, :14], **{CACHE_KWARG: fresh})
    assert cache.get_seq_length() == 14
    for a, b in zip(_states(cache), _states(fresh), strict=True):
        assert_close(a[2], b[2], 1e-6, "memory after crop")
    with torch.no_grad():
        got = model(ids[:, 25:28], **{CACHE_KWARG: cache}).logits
        ref = model(ids[:, 25:28], **{CACHE_KWARG: fresh}).logits
    assert_close(got, ref, 1e-5, "after crop")


def test_crop_without_recording_raises_after_memory_writes():
    model = _model()
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, window=4, sink_tokens=1)
    with torch.no_grad():
        model(_ids(1, 10), **{CACHE_KWARG: cache})
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


@pytest.mark.parametrize("name", ["moment", "paper-outer"])
def test_assisted_decoding_equals_greedy(name):
    model = _model(seed=0)
    assistant = _model(seed=1)
    ids = _ids(1, 20)
    kwargs = dict(
        max_new_tokens=40,
        min_new_tokens=40,
        do_sample=False,
        cache_implementation="tensor_cache",
        cache_config=dict(window=8, sink_tokens=2, **CONFIGS[name]),
    )
    greedy = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, assistant_model=assistant, **kwargs), greedy)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kwargs), greedy)


@pytest.mark.parametrize("mode", ["training_free", "learned"])
def test_reorder_moves_window_and_memory(mode):
    """Beam search's reorder: the reordered cache continues exactly as a cache fed the reordered rows from the start
    (logits, window and memory)."""
    model = _model("qwen2")
    config = {"window": 6, "sink_tokens": 2}
    if mode == "learned":
        from test_tensor_cache_learned import _config, _params

        config = _config(_params(model, window=6))
    ids = _ids(3, 24)
    beam_idx = torch.tensor([2, 0, 0])
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    reordered = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    with torch.no_grad():
        model(ids[:, :18], **{CACHE_KWARG: cache})
        cache.reorder_cache(beam_idx)
        got = model(ids[beam_idx, 18:], **{CACHE_KWARG: cache}).logits
        model(ids[beam_idx, :18], **{CACHE_KWARG: reordered})
        ref = model(ids[beam_idx, 18:], **{CACHE_KWARG: reordered}).logits
    assert_close(got, ref, 1e-5, "reordered")
    for a, b in zip(cache.layers, reordered.layers, strict=True):
        for x, y in zip([a.ring.keys, a.ring.values, *a.state], [b.ring.keys, b.ring.values, *b.state], strict=True):
            if x is not None:
                assert_close(x, y, 1e-6, "reordered state")
    assert float(cache.layers[0].state[0].abs().sum()) > 0  # 24 tokens through a window of 6: the memory was written


def test_beam_search_and_sampling():
    model = _model()
    ids = _ids(2, 10)
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, do_sample=False, early_stopping=True)
    ref = model.generate(ids, **beam)
    out = model.generate(ids, cache_implementation="tensor_cache", cache_config={"window": 64}, **beam)
    assert torch.equal(ref, out)
    small = model.generate(ids, cache_implementation="tensor_cache", cache_config={"window": 4}, **beam)
    assert small.shape[0] == 4
    torch.manual_seed(7)
    sampled = model.generate(
        ids, do_sample=True, num_return_sequences=3, max_new_tokens=12, cache_implementation="tensor_cache"
    )
    assert sampled.shape == (6, 22)


@pytest.mark.parametrize("mode", ["training_free", "learned"])
def test_memory_is_constant_once_the_window_is_full(mode):
    model = _model()
    config = {"window": 16, "sink_tokens": 4}
    if mode == "learned":
        from test_tensor_cache_learned import _config, _params

        config = _config(_params(model, window=16, sink_tokens=4, features=4))
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    sizes = []
    with torch.no_grad():
        for chunk in _ids(1, 200).split(10, dim=1):
            model(chunk, **{CACHE_KWARG: cache})
            sizes.append(cache.memory_bytes())
    heads, dim = 2, 16
    window = (4 + 16) * heads * dim * 2 * 4 + (4 + 16) * 8  # keys + values in fp32, the position table
    memory = heads * (1 + dim + dim + dim * dim) * 4  # count, key sum, value sum, value-key sums
    if mode == "learned":
        memory = heads * (2 * 4 * dim + 2 * 4) * 4  # values [2F, Dv] and mass [2F], F = 4
    assert cache.memory_bytes_per_layer() == [window + memory] * 2
    assert sizes[2:] == [2 * (window + memory)] * (len(sizes) - 2)
    assert cache.layers[0].state_bytes() == memory


@pytest.mark.parametrize(
    "config, message",
    [
        ({"window": 0}, r"Invalid cache_config\['window'\] = 0"),
        ({"mode": "fast"}, r"Invalid cache_config\['mode'\]"),
        ({"memory": "median"}, r"Invalid cache_config\['memory'\]"),
        ({"decay": 1.5}, r"Invalid cache_config\['decay'\]"),
        ({"decay": True}, r"Invalid cache_config\['decay'\]"),
        ({"rule": "delta"}, r"apply to mode='paper' only"),
        ({"mode": "paper", "memory": "mean"}, r"applies to mode='training_free' only"),
        ({"windw": 3}, r"Unknown cache_config key"),
        ({"window": 2, "sink_tokens": 4}, r"sink_tokens=4 is larger than window=2; expected sink_tokens <= window"),
    ],
)
def test_option_errors(config, message):
    with pytest.raises(ValueError, match=message):
        hf_neuralcache.create_cache("tensor_cache", tiny_model("llama").config, **config)


def test_paper_params_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    tensors = {}
    for i in range(2):
        tensors[f"layers.{i}.decay_logit"] = torch.tensor([2.0, 3.0])
        tensors[f"layers.{i}.write_logit"] = torch.tensor([-1.0, 0.0])
        tensors[f"layers.{i}.gate"] = torch.tensor(0.5)
    save_file(tensors, tmp_path / "tc.safetensors")
    cache = hf_neuralcache.create_cache(
        "tensor_cache", model.config, mode="paper", paper_params=str(tmp_path / "tc.safetensors")
    )
    assert_close(cache.layers[1].decay, torch.sigmoid(torch.tensor([2.0, 3.0])), 0, "decay")
    assert cache.layers[0].gate == 0.5
    del tensors["layers.1.gate"]
    save_file(tensors, tmp_path / "bad.st")
    with pytest.raises(ValueError, match="missing"):
        hf_neuralcache.create_cache("tensor_cache", model.config, mode="paper", paper_params=str(tmp_path / "bad.st"))
