"""Triton kernels of the learned Tensor Cache memory against the PyTorch reference, and the cache wired to them.

The kernels take the feature map's outputs (`phi(q)`, `phi(k)`); the references they are checked against are the
ones from the parameters, `naive.learned_write` / `naive.learned_read` (plus window attention and `merge_softmax`).
CPU: Triton's interpreter, tiny shapes; GPU: the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from hf_neuralcache.kernels.fast_weight import (
    LearnedMemory,
    learned_decode,
    learned_features,
    learned_prefill,
    learned_state,
    learned_write_features,
    naive,
)
from hf_neuralcache.kernels.window_attention import window_visibility

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, cached_logits, random_layout


def _rand(seed, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731


def _memory(hq, hkv, d, features, device="cpu", seed=0):
    """Random feature maps, a decay < 1 and a write rate per KV head (float32, as `TensorCacheParams.layer`)."""
    rand = _rand(seed, device)
    return LearnedMemory(
        rand(hq, d, features) * d**-0.5, rand(hq, features) * 0.1, rand(hkv, d, features) * d**-0.5,
        rand(hkv, features) * 0.1, torch.log(torch.linspace(0.8, 0.99, hkv, device=device)),
        torch.linspace(0.3, 0.9, hkv, device=device),
    )  # fmt: skip


def _state(batch, hkv, d, dv, memory, device="cpu", seed=0):
    """The state after 30 random pairs (some with weight 0), so both sums are non-trivial."""
    rand = _rand(seed + 10, device)
    weights = (torch.rand(batch, 30, generator=torch.Generator().manual_seed(seed)) > 0.2).float().to(device)
    empty = learned_state(batch, hkv, memory.k_weight.shape[-1] * 2, dv, device)
    return naive.learned_write(empty, rand(batch, hkv, 30, d), rand(batch, hkv, 30, dv), weights, memory)


def _pairs(batch, hkv, m, d, dv, dtype, device="cpu", seed=1):
    """`m` evicted pairs in `dtype`; the second sequence's are a sink or padding (weight 0) and one more is."""
    rand = _rand(seed, device, dtype)
    weights = torch.ones(batch, m, device=device)
    if batch > 1:
        weights[1] = 0.0
    if m > 2:
        weights[0, 1] = 0.0
    return rand(batch, hkv, m, d), rand(batch, hkv, m, dv), weights


def _assert_states(actual, expected, atol, what):
    for name, a, b in zip(naive.LearnedState._fields, actual, expected, strict=True):
        assert_close(a, b, atol * max(1.0, float(b.abs().max())), f"{what}: {name}")


def _reference(query, key, value, layout, window, scaling, softcap, state, ev_k, ev_v, weights, prefix, memory):
    """Window softmax merged with `naive.learned_read` (the memory read from its parameters): `(out, lse)`."""
    visible = window_visibility(layout[3], *layout[:3], window)
    out, lse = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
    mem, log_mass = naive.learned_read(state, query, ev_k, ev_v, weights, prefix, memory)
    return naive.merge_softmax(out, lse, mem, lse + log_mass)


# (batch, pairs, Hkv, D, Dv, F, dtype)
WRITE_CASES = {
    "B2-M13-H2-D16-Dv24-F4-fp32": (2, 13, 2, 16, 24, 4, torch.float32),
    "B1-M40-H3-D20-Dv16-F12-bf16": (1, 40, 3, 20, 16, 12, torch.bfloat16),
    "B2-M1-H1-D16-Dv80-F40-fp32": (2, 1, 1, 16, 80, 40, torch.float32),
}


@pytest.mark.parametrize("name", sorted(WRITE_CASES))
def test_chunked_write_equals_reference_and_token_by_token(name, triton_interpreter):
    batch, m, hkv, d, dv, f, dtype = WRITE_CASES[name]
    memory = _memory(hkv, hkv, d, f)
    state = _state(batch, hkv, d, dv, memory)
    keys, values, weights = _pairs(batch, hkv, m, d, dv, dtype)
    fk = learned_features(keys, memory.k_weight, memory.k_bias)
    rates = (memory.log_decay, memory.write_rate)
    chunked = learned_write_features(state, fk, values, weights, *rates)
    _assert_states(chunked, naive.learned_write(state, keys, values, weights, memory), 1e-6, "chunk vs reference")
    assert chunked.mass.data_ptr() != state.mass.data_ptr()  # new tensors: the rollback journal keeps `state`
    stepped = state
    for j in range(m):  # the same pairs one at a time, through the kernel
        stepped = learned_write_features(stepped, fk[:, :, j : j + 1], values[:, :, j : j + 1], weights[:, j : j + 1],
                                         *rates)  # fmt: skip
    _assert_states(chunked, stepped, 1e-5, "chunk vs token-by-token")
    fixed = naive.LearnedState(*(t.clone() for t in state))
    pointers = [t.data_ptr() for t in fixed]
    learned_write_features(fixed, fk, values, weights, *rates, out=fixed)
    assert [t.data_ptr() for t in fixed] == pointers
    _assert_states(fixed, chunked, 1e-6, "in place")


def _decode_case(batch, k, hq, hkv, d, dv, f, pairs, dtype, seed=0, device="cpu"):
    rand = _rand(seed + 20, device, dtype)
    memory = _memory(hq, hkv, d, f, device, seed)
    state = _state(batch, hkv, d, dv, memory, device, seed)
    layout = random_layout(batch, k, 1, 4, seed, device)
    query, key, value = rand(batch, hq, 1, d), rand(batch, hkv, k, d), rand(batch, hkv, k, dv)
    return query, key, value, layout, memory, state, _pairs(batch, hkv, pairs, d, dv, dtype, device, seed + 1)


def _check_decode(case, window, softcap, atol):
    query, key, value, layout, memory, state, (ev_k, ev_v, weights) = case
    scaling = query.shape[-1] ** -0.5
    fq = learned_features(query, memory.q_weight, memory.q_bias)
    fk = learned_features(ev_k, memory.k_weight, memory.k_bias)
    args = (query, key, value, *layout, window, scaling, state, fq, fk, ev_v, weights, memory.log_decay,
            memory.write_rate)  # fmt: skip
    out, lse, after = learned_decode(*args, softcap=softcap, write=True)
    prefix = torch.tensor([ev_k.shape[2]], device=query.device)  # the leaving pair is read
    ref, ref_lse = _reference(query, key, value, layout, window, scaling, softcap, state, ev_k, ev_v, weights, prefix,
                              memory)  # fmt: skip
    assert_close(out, ref, atol, "fused output")
    assert_close(lse, ref_lse, atol, "fused log-sum-exp")
    expected = naive.learned_write(state, ev_k, ev_v, weights, memory) if ev_k.shape[2] else state
    _assert_states(after, expected, 1e-6, "fused write")
    read_only, _, none = learned_decode(*args, softcap=softcap)
    assert none is None
    assert_close(read_only, out, 0.0, "read-only step")
    fixed = naive.LearnedState(*(t.clone() for t in state))  # in place, as the cache's decode step runs it
    pointers = [t.data_ptr() for t in fixed]
    in_place, _, same = learned_decode(*args[:9], fixed, *args[10:], softcap=softcap, out=fixed)
    assert same is fixed and [t.data_ptr() for t in fixed] == pointers
    _assert_states(fixed, expected, 1e-6, "fused write in place")
    assert_close(in_place, out, 0.0, "in-place step output")


# (batch, keys, Hq, Hkv, D, Dv, F, pairs, dtype, softcap)
DECODE_CASES = {
    "B2-K40-H3-KV3-D16-Dv16-F4-M1-fp32": (2, 40, 3, 3, 16, 16, 4, 1, torch.float32, None),
    "B2-K40-H6-KV2-D24-Dv40-F12-M1-fp32": (2, 40, 6, 2, 24, 40, 12, 1, torch.float32, None),
    "B1-K30-H3-KV1-D16-Dv16-F40-M0-fp32": (1, 30, 3, 1, 16, 16, 40, 0, torch.float32, None),
    "B2-K30-H2-KV2-D16-Dv16-F8-M1-bf16-softcap": (2, 30, 2, 2, 16, 16, 8, 1, torch.bfloat16, 4.0),
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_fused_decode_step_equals_reference(name, triton_interpreter):
    batch, k, hq, hkv, d, dv, f, pairs, dtype, softcap = DECODE_CASES[name]
    case = _decode_case(batch, k, hq, hkv, d, dv, f, pairs, dtype)
    _check_decode(case, 20, softcap, 1e-5 if dtype == torch.float32 else 2e-2)


def _check_prefill(batch, q, k, hq, hkv, d, f, m, dtype, softcap, window, atol, device="cpu"):
    rand = _rand(3, device, dtype)
    memory = _memory(hq, hkv, d, f, device)
    state = _state(batch, hkv, d, d, memory, device)
    query, key, value = rand(batch, hq, q, d), rand(batch, hkv, k, d), rand(batch, hkv, k, d)
    layout = random_layout(batch, k, q, 2, 3, device)
    ev_k, ev_v, weights = _pairs(batch, hkv, m, d, d, dtype, device, seed=4)
    prefix = (torch.arange(q, device=device) * m // max(1, q - 2)).clamp(max=m)  # 0 .. m, non-decreasing
    scaling = d**-0.5
    fq = learned_features(query, memory.q_weight, memory.q_bias)
    fk = learned_features(ev_k, memory.k_weight, memory.k_bias)
    out, lse = learned_prefill(query, key, value, *layout, window, scaling, state, fq, fk, ev_v, weights, prefix,
                               memory.log_decay, memory.write_rate, softcap)  # fmt: skip
    ref, ref_lse = _reference(query, key, value, layout, window, scaling, softcap, state, ev_k, ev_v, weights, prefix,
                              memory)  # fmt: skip
    assert_close(out, ref, atol, "fused prefill output")
    assert_close(lse, ref_lse, atol, "fused prefill log-sum-exp")


# (batch, queries, keys, Hq, Hkv, D, F, pairs, dtype, softcap)
PREFILL_CASES = {
    "B2-Q9-K30-H3-KV3-D16-F4-M7-fp32": (2, 9, 30, 3, 3, 16, 4, 7, torch.float32, None),
    "B1-Q12-K40-H3-KV1-D24-F40-M40-fp32-softcap": (1, 12, 40, 3, 1, 24, 40, 40, torch.float32, 3.0),
    "B2-Q5-K20-H6-KV2-D16-F8-M0-fp32": (2, 5, 20, 6, 2, 16, 8, 0, torch.float32, None),
    "B1-Q5-K20-H2-KV2-D32-F8-M3-bf16": (1, 5, 20, 2, 2, 32, 8, 3, torch.bfloat16, None),
}


@pytest.mark.parametrize("name", sorted(PREFILL_CASES))
def test_fused_prefill_equals_reference(name, triton_interpreter):
    batch, q, k, hq, hkv, d, f, m, dtype, softcap = PREFILL_CASES[name]
    _check_prefill(batch, q, k, hq, hkv, d, f, m, dtype, softcap, 8, 1e-5 if dtype == torch.float32 else 2e-2)


def test_bad_inputs_raise_one_clear_error():
    query, key, value, layout, memory, state, (ev_k, ev_v, weights) = _decode_case(1, 10, 2, 1, 16, 16, 4, 1, None)
    fq = learned_features(query, memory.q_weight, memory.q_bias)
    fk = learned_features(ev_k, memory.k_weight, memory.k_bias)
    rates = (memory.log_decay, memory.write_rate)
    window = (query, key, value, *layout, 4, 0.25)
    with pytest.raises(ValueError, match="expected weights of shape"):
        learned_write_features(state, fk, ev_v, weights[:, :0], *rates)
    with pytest.raises(ValueError, match="expected key features of shape"):
        learned_write_features(state, fk[..., :5], ev_v, weights, *rates)
    with pytest.raises(ValueError, match="expected log_decay and write_rate of shape"):
        learned_write_features(state, fk, ev_v, weights, memory.log_decay, memory.write_rate.expand(2))
    with pytest.raises(ValueError, match="expected a float32 state"):
        learned_write_features(naive.LearnedState(*(t.double() for t in state)), fk, ev_v, weights, *rates)
    with pytest.raises(ValueError, match="expected out.values float32"):
        learned_write_features(state, fk, ev_v, weights, *rates, out=state._replace(values=state.values.double()))
    with pytest.raises(ValueError, match="expected at most 1 evicted pair"):
        two = torch.cat([fk, fk], 2), torch.cat([ev_v, ev_v], 2), torch.cat([weights, weights], 1)
        learned_decode(*window, state, fq, *two, *rates)
    with pytest.raises(ValueError, match="expected query features of shape"):
        learned_decode(*window, state, fq[..., :4], fk, ev_v, weights, *rates)
    with pytest.raises(ValueError, match="expected one query per sequence"):
        learned_decode(query.expand(-1, -1, 2, -1), key, value, *layout[:3], layout[3].expand(2), 4, 0.25, state,
                       fq.expand(-1, -1, 2, -1), fk, ev_v, weights, *rates)  # fmt: skip
    with pytest.raises(ValueError, match="expected integer prefix of shape"):
        learned_prefill(*window, state, fq, fk, ev_v, weights, torch.zeros(2, dtype=torch.long), *rates)
    with pytest.raises(ValueError, match="expected state a LearnedState"):
        learned_prefill(*window, tuple(state), fq, fk, ev_v, weights, torch.zeros(1, dtype=torch.long), *rates)


def _learned_params(model, window, sink_tokens):
    params = hf_neuralcache.TensorCacheParams.initial(model, window, sink_tokens, features=4, seed=1)
    for name in params.tensors:  # a memory large enough to matter, a visible decay
        if name.endswith("write_log"):
            params.tensors[name].fill_(-1.0)
        if name.endswith("decay_logit"):
            params.tensors[name].fill_(2.0)
    return dict(mode="learned", params=params, window=window, sink_tokens=sink_tokens)


def _flat_states(cache):
    return [t for layer in cache.layers for t in (layer.ring.keys, layer.ring.values, *layer.state)]


def test_tensor_cache_with_kernels_equals_the_reference_path(triton_interpreter, monkeypatch):
    """A tiny llama through tensor_cache mode="learned": chunked prefill (the prefill kernel and the chunked write)
    and decode steps (the fused step writing the state in place), then a rollback: recorded forwards of several
    tokens and of one (the decode step after `update` wrote the pair), `crop`, and recorded decode steps again.
    Kernels (`TRITON_INTERPRET=1`) vs the PyTorch path (`TRITON_INTERPRET=0`)."""
    model = tiny_model("llama", attn_implementation="neuralcache")
    config = _learned_params(model, window=6, sink_tokens=2)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 20, dtype=torch.bool)
    padding[1, :3] = False
    position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)
    runs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        cache = hf_neuralcache.create_cache("tensor_cache", model.config, **config)
        logits = [cached_logits(model, cache, ids[:, :15], padding[:, :15], [9, 1, 1, 4])]
        assert cache.layers[0].journal == []
        cache.activate_past_recording()
        with torch.no_grad():
            for start, stop in ((15, 17), (17, 18), (18, 20)):  # recorded: the journal keeps the states before
                out = model(ids[:, start:stop], attention_mask=padding[:, :stop].long(),
                            position_ids=position_ids[:, start:stop], **{CACHE_KWARG: cache})  # fmt: skip
                logits.append(out.logits)
            cache.crop(-4)  # back to 16 tokens, then decode 16 .. 19 one token at a time (still recorded)
            for t in range(16, 20):
                out = model(ids[:, t : t + 1], attention_mask=padding[:, : t + 1].long(),
                            position_ids=position_ids[:, t : t + 1], **{CACHE_KWARG: cache})  # fmt: skip
                logits.append(out.logits)
        runs.append((torch.cat(logits, 1), _flat_states(cache)))
    (kernel_logits, kernel_states), (ref_logits, ref_states) = runs
    assert ref_states[2].abs().sum() > 0  # the memory was written
    real = torch.cat([padding[:, :20], padding[:, 16:]], 1)
    assert_close(kernel_logits[real], ref_logits[real], 2e-5, "logits, kernels vs reference")
    for a, b in zip(kernel_states, ref_states, strict=True):
        assert_close(a, b, 1e-5, "window and memory state")


def test_generate_with_kernels_equals_the_reference_path(triton_interpreter, monkeypatch):
    """Greedy `generate` (prefill through the fused prefill kernel, then the fused decode step) and beams
    (`reorder` of the state) give the PyTorch path's tokens and logits."""
    model = tiny_model("llama", attn_implementation="neuralcache")
    config = _learned_params(model, window=6, sink_tokens=2)
    ids = torch.randint(3, 256, (1, 14), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, cache_implementation="tensor_cache", cache_config=config)  # fmt: skip
    runs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        greedy = model.generate(ids, **kwargs)
        beams = model.generate(ids, num_beams=2, **dict(kwargs, max_new_tokens=6, min_new_tokens=6))
        runs.append((greedy, beams))
    (greedy, beams), (ref_greedy, ref_beams) = runs
    assert torch.equal(greedy.sequences, ref_greedy.sequences)
    assert_close(torch.stack(greedy.logits), torch.stack(ref_greedy.logits), 2e-5, "greedy logits")
    assert torch.equal(beams.sequences, ref_beams.sequences)
    assert greedy[CACHE_KWARG].layers[0].state.mass.abs().sum() > 0  # 24 tokens through a window of 6


GPU_DECODE_CASES = {
    "B4-K260-H32-KV8-D128-F64-bf16": (4, 260, 32, 8, 128, 128, 64, 1, torch.bfloat16, None),
    "B1-K1028-H9-KV3-D64-F32-fp32": (1, 1028, 9, 3, 64, 64, 32, 1, torch.float32, None),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(GPU_DECODE_CASES))
def test_fused_decode_step_on_gpu(name):
    batch, k, hq, hkv, d, dv, f, pairs, dtype, softcap = GPU_DECODE_CASES[name]
    case = _decode_case(batch, k, hq, hkv, d, dv, f, pairs, dtype, device="cuda")
    _check_decode(case, 256, softcap, 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_prefill_on_gpu(dtype):
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    _check_prefill(2, 512, 1284, 32, 8, 128, 64, 512, dtype, None, 256, atol, device="cuda")
