"""Triton kernels of the training-free Tensor Cache memory against the PyTorch reference.

The fused decode step (window + write + read + merge) and the chunked write (weighted-sum scan, equal to
token-by-token writes). CPU: Triton's interpreter, tiny shapes; GPU: the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from hf_neuralcache.kernels.fast_weight import (
    fast_weight_decode,
    moment_decode,
    moment_prefill,
    moment_state,
    moment_write,
    naive,
)
from hf_neuralcache.kernels.window_attention import window_visibility

import hf_neuralcache
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, cached_logits, random_layout


def _rand(generator, device, dtype=torch.float32):
    return lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731


def _state(batch, heads, d, dv, memory, device, seed=0):
    """Moments after 50 random pairs (some with weight 0), so every sum is non-trivial."""
    rand = _rand(torch.Generator().manual_seed(seed), device)
    weights = (torch.rand(batch, 50, generator=torch.Generator().manual_seed(seed)) > 0.2).float().to(device)
    empty = moment_state(batch, heads, d, dv, memory, device)
    log_decay = torch.log(torch.linspace(0.9, 1.0, heads, device=device))
    return naive.moment_write(empty, rand(batch, heads, 50, d), rand(batch, heads, 50, dv), weights, log_decay)


def _assert_states(actual, expected, atol, what):
    for name, a, b in zip(naive.MomentState._fields, actual, expected, strict=True):
        assert (a is None) == (b is None), f"{what}: {name}"
        if a is not None:
            assert_close(a, b, atol * max(1.0, float(b.abs().max())), f"{what}: {name}")


# (batch, pairs, heads, D, Dv, memory)
WRITE_CASES = {
    "B2-M13-H2-D16-Dv80-moment": (2, 13, 2, 16, 80, "moment"),
    "B1-M9-H3-D64-Dv64-mean": (1, 9, 3, 64, 64, "mean"),
}


@pytest.mark.parametrize("name", sorted(WRITE_CASES))
def test_chunked_write_equals_reference_and_token_by_token(name, triton_interpreter):
    batch, m, heads, d, dv, memory = WRITE_CASES[name]
    state = _state(batch, heads, d, dv, memory, "cpu")
    rand = _rand(torch.Generator().manual_seed(1), "cpu")
    keys, values = rand(batch, heads, m, d), rand(batch, heads, m, dv)
    weights = (torch.rand(batch, m, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    log_decay = torch.log(torch.linspace(0.8, 0.99, heads))
    chunked = moment_write(state, keys, values, weights, log_decay)
    _assert_states(chunked, naive.moment_write(state, keys, values, weights, log_decay), 1e-6, "chunk vs reference")
    stepped = state
    for j in range(m):  # the same pairs one at a time, through the kernel
        stepped = moment_write(
            stepped, keys[:, :, j : j + 1], values[:, :, j : j + 1], weights[:, j : j + 1], log_decay
        )
    _assert_states(chunked, stepped, 1e-5, "chunk vs token-by-token")  # lam^m once vs m roundings of lam
    assert chunked.count.data_ptr() != state.count.data_ptr()  # new tensors: the rollback journal keeps `state`


def _decode_case(batch, k, hq, hkv, d, memory, pairs, dtype, device, seed=0):
    rand = _rand(torch.Generator().manual_seed(seed), device, dtype)
    state = _state(batch, hkv, d, d, memory, device, seed)
    weights = torch.ones(batch, pairs, device=device)
    if batch > 1:
        weights[1] = 0.0  # a sink or padding leaves the window: the decay still ticks, nothing is written
    layout = random_layout(batch, k, 1, 4, seed, device)
    pair = rand(batch, hkv, pairs, d), rand(batch, hkv, pairs, d)
    return rand(batch, hq, 1, d), rand(batch, hkv, k, d), rand(batch, hkv, k, d), layout, state, pair, weights


def _check_decode(case, window, softcap, atol):
    query, key, value, layout, state, (ev_k, ev_v), weights = case
    log_decay = torch.log(torch.linspace(0.9, 0.999, key.shape[1], device=query.device))
    args = (query, key, value, *layout, window, query.shape[-1] ** -0.5, state, ev_k, ev_v, weights, log_decay)
    out, lse, after = moment_decode(*args, softcap=softcap, write=True)
    visible = window_visibility(layout[3], *layout[:3], window)
    ref, ref_lse = naive.window_attention_lse(query, key, value, visible, query.shape[-1] ** -0.5, softcap)
    prefix = torch.tensor([ev_k.shape[2]], device=query.device)
    mem, mem_lse = naive.moment_read(state, query, ev_k, ev_v, weights, prefix, log_decay, query.shape[-1] ** -0.5)
    ref, ref_lse = naive.merge_softmax(ref, ref_lse, mem, mem_lse)
    assert_close(out, ref, atol, "fused output")
    assert_close(lse, ref_lse, atol, "fused log-sum-exp")
    expected = naive.moment_write(state, ev_k, ev_v, weights, log_decay) if ev_k.shape[2] else state
    _assert_states(after, expected, 1e-6, "fused write")
    read_only, _, none = moment_decode(*args, softcap=softcap)
    assert none is None
    assert_close(read_only, out, 0.0, "read-only step")


# (batch, keys, Hq, Hkv, D, memory, pairs, dtype, softcap)
DECODE_CASES = {
    "B2-Q1-K60-H4-KV2-D16-moment": (2, 60, 4, 2, 16, "moment", 1, torch.float32, None),
    "B2-Q1-K40-H4-KV1-D64-moment-nopair": (2, 40, 4, 1, 64, "moment", 0, torch.float32, None),
    "B1-Q1-K30-H2-KV2-D16-mean-fp16-softcap": (1, 30, 2, 2, 16, "mean", 1, torch.float16, 4.0),
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_fused_decode_step_equals_reference(name, triton_interpreter):
    batch, k, hq, hkv, d, memory, pairs, dtype, softcap = DECODE_CASES[name]
    case = _decode_case(batch, k, hq, hkv, d, memory, pairs, dtype, "cpu")
    _check_decode(case, 20, softcap, 1e-5 if dtype == torch.float32 else 3e-3)


def test_writes_in_place_into_fixed_state(triton_interpreter):
    """`out=state`: the kernels update a fixed-shape state in place (what a compiled cache needs)."""
    query, key, value, layout, state, (ev_k, ev_v), weights = _decode_case(2, 30, 4, 2, 16, "moment", 1, None, "cpu")
    log_decay = torch.log(torch.tensor([0.9, 0.99]))
    expected = naive.moment_write(state, ev_k, ev_v, weights, log_decay)
    fixed = naive.MomentState(*(None if t is None else t.clone() for t in state))
    pointers = [t.data_ptr() for t in fixed if t is not None]
    moment_write(fixed, ev_k, ev_v, weights, log_decay, out=fixed)
    assert [t.data_ptr() for t in fixed if t is not None] == pointers
    _assert_states(fixed, expected, 1e-6, "moment_write in place")
    fixed = naive.MomentState(*(None if t is None else t.clone() for t in state))
    pointers = [t.data_ptr() for t in fixed if t is not None]
    out, _, after = moment_decode(
        query, key, value, *layout, 20, 0.25, fixed, ev_k, ev_v, weights, log_decay, out=fixed
    )
    ref, _, _ = moment_decode(query, key, value, *layout, 20, 0.25, state, ev_k, ev_v, weights, log_decay)
    assert after is fixed and [t.data_ptr() for t in fixed if t is not None] == pointers
    _assert_states(fixed, expected, 1e-6, "moment_decode in place")
    assert_close(out, ref, 1e-6, "in-place step output")
    with pytest.raises(ValueError, match="expected out.value_key float32"):
        moment_write(state, ev_k, ev_v, weights, log_decay, out=state._replace(value_key=state.value_key.double()))


def _check_prefill(batch, q, k, hq, hkv, d, memory, m, dtype, softcap, device, window, atol):
    """The fused prefill (window + memory read at per-query prefixes + merge) against the reference functions."""
    rand = _rand(torch.Generator().manual_seed(3), device, dtype)
    state = _state(batch, hkv, d, d, memory, device)
    query, key, value = rand(batch, hq, q, d), rand(batch, hkv, k, d), rand(batch, hkv, k, d)
    layout = random_layout(batch, k, q, 2, 3, device)
    ev_k, ev_v = rand(batch, hkv, m, d), rand(batch, hkv, m, d)
    weights = (torch.rand(batch, m, generator=torch.Generator().manual_seed(4)) > 0.2).float().to(device)
    prefix = (torch.arange(q, device=device) * m // max(1, q - 2)).clamp(max=m)  # 0 .. m, non-decreasing
    log_decay = torch.log(torch.linspace(0.9, 0.999, hkv, device=device))
    scaling = d**-0.5
    out, lse = moment_prefill(
        query, key, value, *layout, window, scaling, state, ev_k, ev_v, weights, prefix, log_decay, softcap
    )
    visible = window_visibility(layout[3], *layout[:3], window)
    ref, ref_lse = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
    mem, mem_lse = naive.moment_read(state, query, ev_k, ev_v, weights, prefix, log_decay, scaling)
    ref, ref_lse = naive.merge_softmax(ref, ref_lse, mem, mem_lse)
    assert_close(out, ref, atol, "fused prefill output")
    assert_close(lse, ref_lse, atol, "fused prefill log-sum-exp")


# (batch, queries, keys, Hq, Hkv, D, memory, pairs, dtype, softcap)
PREFILL_CASES = {
    "B2-Q9-K30-H4-KV2-D16-M7-moment": (2, 9, 30, 4, 2, 16, "moment", 7, torch.float32, None),
    "B1-Q20-K40-H2-KV1-D16-M40-mean-softcap": (1, 20, 40, 2, 1, 16, "mean", 40, torch.float32, 3.0),
    "B1-Q5-K20-H2-KV2-D64-M3-moment-bf16": (1, 5, 20, 2, 2, 64, "moment", 3, torch.bfloat16, None),
}


@pytest.mark.parametrize("name", sorted(PREFILL_CASES))
def test_fused_prefill_equals_reference(name, triton_interpreter):
    batch, q, k, hq, hkv, d, memory, m, dtype, softcap = PREFILL_CASES[name]
    _check_prefill(
        batch, q, k, hq, hkv, d, memory, m, dtype, softcap, "cpu", 8, 1e-5 if dtype == torch.float32 else 2e-2
    )


@pytest.mark.parametrize("rule, pairs", [("outer", 1), ("delta", 1), ("delta", 0)], ids=["outer", "delta", "nopair"])
def test_paper_decode_step_equals_the_equations(rule, pairs, triton_interpreter):
    """Paper mode: window output, the raw read `q A` before the write, and `A` after the write."""
    query, key, value, layout, _, (ev_k, ev_v), weights = _decode_case(2, 30, 4, 2, 16, "moment", pairs, None, "cpu")
    generator = torch.Generator().manual_seed(5)
    fast = torch.randn(2, 2, 16, 16, generator=generator) * 0.1
    decay, rate = torch.tensor([0.99, 0.9]), torch.tensor([0.05, 0.5])
    args = (query, key, value, *layout, 20, 0.25, fast, ev_k, ev_v, weights, decay, rate, rule)
    window_out, r, after = fast_weight_decode(*args, write=True)
    visible = window_visibility(layout[3], *layout[:3], 20)
    ref_window, _ = naive.window_attention_lse(query, key, value, visible, 0.25)
    ref_r = (query.view(2, 2, 2, 1, 16) @ fast[:, :, None]).view(2, 4, 1, 16)  # q A, A before the write
    ref_after = naive.fast_weight_write(fast, ev_k, ev_v, weights, decay, rate, rule) if pairs else fast
    assert_close(window_out, ref_window, 1e-5, "window output")
    assert_close(r, ref_r, 1e-5, "read")
    assert_close(after, ref_after, 1e-6, "A after the write")
    in_place = fast.clone()
    fast_weight_decode(*args[:9], in_place, *args[10:], out=in_place)
    assert_close(in_place, ref_after, 1e-6, "A written in place")


def test_bad_pairs_raise_one_clear_error():
    query, key, value, layout, state, (ev_k, ev_v), weights = _decode_case(1, 10, 2, 1, 16, "moment", 1, None, "cpu")
    log_decay = torch.zeros(1)
    with pytest.raises(ValueError, match="expected weights of shape"):
        moment_write(state, ev_k, ev_v, weights[:, :0], log_decay)
    with pytest.raises(ValueError, match="expected at most 1 evicted pair"):
        two = torch.cat([ev_k, ev_k], 2), torch.cat([ev_v, ev_v], 2), torch.cat([weights, weights], 1)
        moment_decode(query, key, value, *layout, 4, 0.25, state, *two, log_decay)
    with pytest.raises(ValueError, match="expected one query per sequence"):
        moment_decode(query.expand(-1, -1, 2, -1), key, value, *layout[:3], layout[3].expand(2), 4, 0.25, state,
                      ev_k, ev_v, weights, log_decay)  # fmt: skip


@pytest.mark.parametrize("name", ["moment", "paper-delta"])
def test_tensor_cache_with_kernels_equals_the_reference_path(name, triton_interpreter, monkeypatch):
    """A tiny model through tensor_cache: chunked prefill and decoding with the kernels vs the PyTorch path."""
    config = {"moment": {"decay": 0.95}, "paper-delta": {"mode": "paper", "rule": "delta", "write_rate": 0.5}}[name]
    model = tiny_model("qwen2", attn_implementation="neuralcache")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[1, :3] = False
    runs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        cache = hf_neuralcache.create_cache("tensor_cache", model.config, window=6, sink_tokens=2, **config)
        logits = cached_logits(model, cache, ids, padding, [9, 1, 1, 6, 1, 1, 1, 4])
        states = [[layer.state] if isinstance(layer.state, torch.Tensor) else layer.state for layer in cache.layers]
        runs.append((logits, [t for state in states for t in state if t is not None]))
    (kernel_logits, kernel_states), (ref_logits, ref_states) = runs
    assert ref_states[0].abs().sum() > 0  # the memory was written
    assert_close(kernel_logits[padding], ref_logits[padding], 2e-5, "logits, kernels vs reference")
    for a, b in zip(kernel_states, ref_states, strict=True):
        assert_close(a, b, 1e-4, "memory state")


GPU_DECODE_CASES = {
    "B4-Q1-K260-H32-KV8-D128-moment-bf16": (4, 260, 32, 8, 128, "moment", 1, torch.bfloat16, None),
    "B1-Q1-K1028-H9-KV3-D64-moment-fp32": (1, 1028, 9, 3, 64, "moment", 1, torch.float32, None),
    "B2-Q1-K260-H8-KV2-D64-mean-fp16-softcap": (2, 260, 8, 2, 64, "mean", 1, torch.float16, 30.0),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(GPU_DECODE_CASES))
def test_fused_decode_step_on_gpu(name):
    batch, k, hq, hkv, d, memory, pairs, dtype, softcap = GPU_DECODE_CASES[name]
    case = _decode_case(batch, k, hq, hkv, d, memory, pairs, dtype, "cuda")
    _check_decode(case, 256, softcap, 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_prefill_on_gpu(dtype):
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    _check_prefill(2, 512, 1284, 32, 8, 128, "moment", 512, dtype, None, "cuda", 256, atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunked_write_on_gpu():
    state = _state(2, 8, 128, 128, "moment", "cuda")
    rand = _rand(torch.Generator().manual_seed(1), "cuda", torch.bfloat16)
    keys, values = rand(2, 8, 512, 128), rand(2, 8, 512, 128)
    weights, log_decay = torch.ones(2, 512, device="cuda"), torch.log(torch.full((8,), 0.999, device="cuda"))
    expected = naive.moment_write(state, keys, values, weights, log_decay)
    _assert_states(moment_write(state, keys, values, weights, log_decay), expected, 1e-5, "chunk on gpu")
