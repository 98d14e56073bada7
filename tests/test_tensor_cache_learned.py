"""tensor_cache mode="learned": the reference equations, chunked == token-by-token, params save/load and refusals,
the model folder's generation config, rollback, assisted decoding, beams, the fit on a tiny model (the model left
untouched) and the `tensor-cache fit` command. Reorder and constant memory: tests/test_tensor_cache.py."""

from __future__ import annotations

import pytest
import torch
from hf_neuralcache.kernels.fast_weight import (
    LearnedMemory,
    learned_features,
    learned_read,
    learned_state,
    window_attention_lse,
)
from transformers import AutoModelForCausalLM, DynamicCache

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG
from hf_neuralcache.caches.tensor_cache import TensorCache
from hf_neuralcache.caches.tensor_cache_fit import chunked_read, save_with_model
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, cached_logits


def _ids(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model(arch="qwen2", seed=0):
    return tiny_model(arch, seed=seed, attn_implementation="neuralcache")


def _params(model, window=8, sink_tokens=2, features=4):
    params = hf_neuralcache.TensorCacheParams.initial(model, window, sink_tokens, features, seed=1)
    for name in params.tensors:  # a memory large enough to matter, a visible decay
        if name.endswith("write_log"):
            params.tensors[name].fill_(-1.0)
        if name.endswith("decay_logit"):
            params.tensors[name].fill_(2.0)
    return params


def _config(params, **extra):
    return dict(mode="learned", params=params, window=params.window, sink_tokens=params.sink_tokens, **extra)


def _states(cache):
    return [[layer.ring.keys, layer.ring.values, *layer.state] for layer in cache.layers]


def test_chunked_prefill_equals_token_by_token():
    model = _model()
    params = _params(model)
    ids = _ids(2, 40, seed=1)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :5] = False
    results = []
    for chunks in ([40], [1] * 40, [7, 5, 1, 1, 9, 3, 1, 13]):
        cache = hf_neuralcache.create_cache("tensor_cache", model.config, **_config(params))
        results.append((cached_logits(model, cache, ids, padding, chunks), _states(cache)))
    (ref, ref_states), *others = results
    assert ref_states[0][3].abs().sum() > 0  # the memory was written
    for logits, states in others:
        assert_close(logits[padding], ref[padding], 2e-5, "learned logits")
        for a, b in zip(states, ref_states, strict=True):
            for x, y in zip(a, b, strict=True):
                assert_close(x, y, 1e-4, "learned state")


def test_read_equals_the_formula():
    """Window softmax and `sum_i lam^(P-1-i) eta phi(q).phi(k_i) [v_i, 1]` merged in one normaliser."""
    g = torch.Generator().manual_seed(0)
    d, f, w, sinks, t_len = 8, 3, 5, 1, 17
    memory = LearnedMemory(
        torch.randn(2, d, f, generator=g), torch.randn(2, f, generator=g), torch.randn(1, d, f, generator=g),
        torch.randn(1, f, generator=g), torch.log(torch.tensor([0.8])), torch.tensor([0.7]),
    )  # fmt: skip
    q, k, v = (
        torch.randn(1, 2, t_len, d, generator=g),
        torch.randn(1, 1, t_len, d, generator=g),
        torch.randn(1, 1, t_len, d, generator=g),
    )
    positions = torch.arange(sinks + w, t_len)
    prefix = positions - w + 1 - sinks
    state = learned_state(1, 1, 2 * f, d)
    ones = torch.ones(1, t_len - sinks)
    mem, log_mass = learned_read(state, q[:, :, positions], k[:, :, sinks:], v[:, :, sinks:], ones, prefix, memory)
    fast = chunked_read(q[:, :, positions], k[:, :, sinks:], v[:, :, sinks:], prefix, memory, chunk=4)
    assert_close(fast[0], mem, 1e-5, "chunked read")
    assert_close(fast[1], log_mass, 1e-5, "chunked mass")
    for row, t in enumerate(positions.tolist()):
        for head in range(2):
            j = torch.arange(t + 1)
            visible = ((j < sinks) | (j > t - w)).view(1, 1, -1)
            out_w, lse_w = window_attention_lse(
                q[:, head : head + 1, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible, 0.5
            )
            fq = learned_features(q[:, head : head + 1, t : t + 1], memory.q_weight[head : head + 1],
                                  memory.q_bias[head : head + 1])[0, 0, 0]  # fmt: skip
            fk = learned_features(k, memory.k_weight, memory.k_bias)[0, 0]  # [T, 2F]
            evicted = torch.arange(sinks, t - w + 1)
            weight = 0.7 * 0.8 ** (t - w - evicted).float() * (fk[evicted] @ fq)
            mass = weight.sum()
            expected = (out_w[0, 0, 0] + weight @ v[0, 0, evicted]) / (1 + mass)
            assert_close(log_mass[0, head, row], torch.log(mass), 1e-5, f"mass t={t}")
            z_w = torch.exp(lse_w)[0, 0, 0]
            merged = (z_w * out_w[0, 0, 0] + z_w * mass * mem[0, head, row]) / (z_w * (1 + mass))
            assert_close(merged, expected, 1e-5, f"t={t}")


def test_large_window_equals_dynamic_cache():
    model = _model("llama")
    params = _params(model, window=64)
    ids = _ids(2, 30)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **_config(params))
    with torch.no_grad():
        got = model(ids, **{CACHE_KWARG: cache}).logits
        ref = model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}).logits
    assert_close(got, ref, 1e-4, "window >= length")
    assert all(float(layer.state.mass.abs().sum()) == 0 for layer in cache.layers)


def test_save_load_and_refusals(tmp_path):
    model = _model()
    params = _params(model)
    params.save_pretrained(tmp_path / "p")
    loaded = hf_neuralcache.TensorCacheParams.from_pretrained(tmp_path / "p")
    assert loaded.model_fingerprint == params.model_fingerprint and loaded.window == 8
    for name, tensor in params.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)
    config = dict(mode="learned", params=str(tmp_path / "p"), window=8, sink_tokens=2)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
    assert isinstance(cache, TensorCache) and cache.params.window == 8
    with pytest.raises(ValueError, match="fitted for window=8, got window=16"):
        hf_neuralcache.create_cache("tensor_cache", model.config, **dict(config, window=16))
    with pytest.raises(ValueError, match="sink_tokens=2, got sink_tokens=3"):
        hf_neuralcache.create_cache("tensor_cache", model.config, **dict(config, sink_tokens=3))
    with pytest.raises(ValueError, match="fitted for another model"):
        hf_neuralcache.create_cache("tensor_cache", _model("llama").config, **config)
    with pytest.raises(ValueError, match="required with mode='learned'"):
        hf_neuralcache.create_cache("tensor_cache", model.config, mode="learned")
    with pytest.raises(ValueError, match="do not apply to mode='learned'"):
        hf_neuralcache.create_cache("tensor_cache", model.config, **dict(config, decay=0.9))
    with pytest.raises(ValueError, match="missing"):
        hf_neuralcache.TensorCacheParams.from_pretrained(tmp_path / "nothing")
    other = _model(seed=3)  # same shapes, other weights: refused by the fingerprint in generate
    with pytest.raises(ValueError, match="fingerprint"):
        other.generate(_ids(1, 5), max_new_tokens=2, cache_implementation="tensor_cache", cache_config=config)


def test_model_folder_generation_config(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    params = hf_neuralcache.fit_tensor_cache(
        reloaded, None, [_ids(1, 100)[0]], window=8, sink_tokens=2, features=4, segment_tokens=48, steps=3,
        progress=False,
    )  # fmt: skip
    save_with_model(str(tmp_path), params)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # sdpa: generate switches to "neuralcache"
    out = model.generate(_ids(1, 20), max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    cache = out[CACHE_KWARG]
    assert isinstance(cache, TensorCache) and cache.mode == "learned"
    assert cache.layers[0].state.mass.abs().sum() > 0  # 30 tokens through a window of 8: the memory was written
    ref = model.generate(_ids(1, 20), max_new_tokens=10, do_sample=False, cache_implementation="tensor_cache",
                         cache_config=_config(params))  # fmt: skip
    assert torch.equal(out.sequences, ref)


def test_crop_undoes_memory_writes_exactly():
    model = _model("llama")
    params = _params(model, window=6)
    ids = _ids(2, 30)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **_config(params))
    fresh = hf_neuralcache.create_cache("tensor_cache", model.config, **_config(params))
    with torch.no_grad():
        model(ids[:, :12], **{CACHE_KWARG: cache})
        cache.activate_past_recording()
        model(ids[:, 12:16], **{CACHE_KWARG: cache})
        model(ids[:, 16:22], **{CACHE_KWARG: cache})
        cache.crop(-7)
        model(ids[:, :15], **{CACHE_KWARG: fresh})
        for a, b in zip(_states(cache), _states(fresh), strict=True):
            assert_close(a[2], b[2], 1e-6, "memory after crop")
        got = model(ids[:, 25:28], **{CACHE_KWARG: cache}).logits
        ref = model(ids[:, 25:28], **{CACHE_KWARG: fresh}).logits
    assert_close(got, ref, 1e-5, "after crop")


def test_assisted_decoding_and_beams():
    model, assistant = _model("llama", seed=0), _model("llama", seed=1)
    params = _params(model)
    ids = _ids(1, 20)
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, cache_implementation="tensor_cache",
                  cache_config=_config(params))  # fmt: skip
    greedy = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, assistant_model=assistant, **kwargs), greedy)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kwargs), greedy)
    beams = model.generate(_ids(2, 10), num_beams=3, num_return_sequences=2, max_new_tokens=12, early_stopping=True,
                           cache_implementation="tensor_cache", cache_config=_config(params))  # fmt: skip
    assert beams.shape == (4, 22)


def test_fit_student_path_equals_the_cache():
    """The sequential fit's model of the cached forward (window + sinks + each layer's memory over a whole sequence)
    gives the logits the cache gives in chunked prefill: the fit optimises what the cache computes."""
    from hf_neuralcache.caches import tensor_cache_fit as fit
    from hf_neuralcache.registry import register_attention

    model = _model("llama")
    params = _params(model, window=6, sink_tokens=2)
    ids = _ids(1, 40, seed=2)
    cache = hf_neuralcache.create_cache("tensor_cache", model.config, **_config(params))
    expected = cached_logits(model, cache, ids, torch.ones_like(ids, dtype=torch.bool), [7, 9, 1, 1, 22])
    register_attention(fit.FIT, fit._fit_attention)
    previous = model.config._attn_implementation
    memories = {i: params.layer(i) for i in params.layer_indices}
    fit._CONTEXT.update(mode="student", window=6, sinks=2, memory=memories, exact=False)
    model.set_attn_implementation(fit.FIT)
    try:
        with torch.no_grad():
            got = model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
        fit._CONTEXT.clear()
    assert_close(got, expected, 2e-5, "student path vs cache")


def test_sequential_fit_is_deterministic_and_lowers_the_layer_error():
    model = tiny_model("llama")
    ids = _ids(1, 200, seed=4)[0]
    weights = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    kwargs = dict(window=8, sink_tokens=2, features=4, segment_tokens=96, steps=12, progress=False)
    params = hf_neuralcache.fit_tensor_cache(model, None, [ids], **kwargs)
    for name, weight in model.named_parameters():  # the model is untouched: weights, no `.grad`, still trainable
        assert torch.equal(weight, weights[name]) and weight.grad is None and weight.requires_grad, name
    again = hf_neuralcache.fit_tensor_cache(model, None, [ids], **kwargs)
    assert params.fit["objective"] == "output"
    for name, tensor in params.tensors.items():
        assert torch.equal(tensor, again.tensors[name]), name
    layers = params.fit["layers"]
    assert set(layers) == {str(i) for i in params.layer_indices}
    for stats in layers.values():
        assert stats["fitted_mse"] <= stats["start_mse"] + 1e-9
        if stats["disabled"]:  # did not beat the window alone: its writes are switched off
            assert stats["fitted_mse"] >= stats["window_mse"]
    with pytest.raises(ValueError, match="objective"):
        hf_neuralcache.fit_tensor_cache(model, None, [ids], objective="nope", **kwargs)
    old = hf_neuralcache.fit_tensor_cache(model, None, [ids], objective="attention", **kwargs)
    assert old.fit["objective"] == "attention" and set(old.fit["layers"]) == set(layers)


def test_a_layer_whose_memory_does_not_help_is_switched_off(monkeypatch):
    from hf_neuralcache.caches import tensor_cache_fit as fit

    model = tiny_model("llama")
    ids = _ids(1, 200, seed=4)[0]
    merged = fit._merged

    def harmful(out_w, lse_w, query, key, value, rows, window, sinks, memory):  # a memory that only adds error
        out = merged(out_w, lse_w, query, key, value, rows, window, sinks, memory)
        return out if memory is None else out + 1.0

    monkeypatch.setattr(fit, "_merged", harmful)
    params = hf_neuralcache.fit_tensor_cache(
        model, None, [ids], window=8, sink_tokens=2, features=4, segment_tokens=96, steps=2, progress=False
    )
    for i, stats in params.fit["layers"].items():
        assert stats["disabled"] and stats["fitted_mse"] > stats["window_mse"]
        assert torch.all(params.tensors[f"layers.{i}.write_log"] == fit.DISABLED_WRITE_LOG)


def _word_model_dir(folder):
    """A tiny random llama saved with a word-level tokenizer of 200 words (ids < its 256-token vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(200)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    return folder


def test_cli_fit_saves_params_and_the_model_folder_uses_them(tmp_path, capsys):
    """`hf-neuralcache tensor-cache fit --model DIR --text FILE --out DIR --into-model`: the params load and match
    the model; the model folder's generation config makes a plain `generate` use them; bad flags are one error."""
    from hf_neuralcache.cli import main

    model_dir = _word_model_dir(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    text = tmp_path / "text.txt"  # 4,096 tokens make one segment (the CLI's segment length)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (4200,), generator=generator)))
    flags = ["--window", "8", "--sink-tokens", "2", "--features", "4", "--steps", "2", "--segments", "1"]
    out = tmp_path / "params"
    argv = ["tensor-cache", "fit", "--model", str(model_dir), "--text", str(text), "--out", str(out), *flags]
    assert main([*argv, "--into-model"]) == 0
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed and "fitted 2 layers in" in printed
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = hf_neuralcache.TensorCacheParams.from_pretrained(out)
    params.check(model=model, window=8, sink_tokens=2)
    assert (params.window, params.sink_tokens, params.features, params.fit["steps"]) == (8, 2, 4, 2)
    saved = hf_neuralcache.TensorCacheParams.from_pretrained(model_dir / "tensor_cache")
    for name, tensor in params.tensors.items():
        assert torch.equal(saved.tensors[name], tensor), name
    generated = model.generate(_ids(1, 20), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = generated[CACHE_KWARG]
    assert isinstance(cache, TensorCache) and cache.mode == "learned" and cache.window == 8
    assert main(["tensor-cache", "fit", "--model", str(model_dir), "--text", str(text), *flags]) == 2
    assert "expected --out DIR and/or --into-model" in capsys.readouterr().err
    assert main(["tensor-cache", "fit", "--text", str(text), "--into-model", *flags]) == 2
    assert "give it with --model DIR" in capsys.readouterr().err
