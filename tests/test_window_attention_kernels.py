"""Triton window attention (decode, prefill) against the PyTorch reference, over cache-like layouts.

CPU: Triton's interpreter, tiny shapes. GPU (`-m gpu` or any run with CUDA): the compiled kernels, real shapes.
"""

from __future__ import annotations

import pytest
import torch
from hf_neuralcache.kernels.fast_weight.naive import window_attention_lse
from hf_neuralcache.kernels.window_attention import attend, window_visibility

import hf_neuralcache
from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, cached_logits, random_layout

ATOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _case(batch, q, k, hq, hkv, d, window, sinks, dtype, device, seed=0, dv=None):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    query, key, value = rand(batch, hq, q, d), rand(batch, hkv, k, d), rand(batch, hkv, k, dv or d)
    return (query, key, value, *random_layout(batch, k, q, sinks, seed, device), window)


def _check(case, scaling, softcap=None):
    query, key, value, slots, valid, sink, q_slots, window = case
    visible = window_visibility(q_slots, slots, valid, sink, window)
    ref, ref_lse = window_attention_lse(query, key, value, visible, scaling, softcap)
    out, lse = attend(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, return_lse=True)
    atol = ATOL[query.dtype]
    assert_close(out, ref, atol, "output")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "queries that see no key"
    assert_close(lse[finite], ref_lse[finite], atol, "log-sum-exp")
    plain = attend(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap)
    assert plain.dtype == query.dtype
    assert_close(plain.float(), ref, atol, "output in the query dtype")


# (batch, queries, keys, Hq, Hkv, D, window, sinks, dtype, softcap)
CPU_CASES = {
    "B2-Q1-K300-H4-KV2-D64": (2, 1, 300, 4, 2, 64, 100, 4, torch.float32, None),
    "B1-Q1-K40-H4-KV1-D128-fp16-softcap": (1, 1, 40, 4, 1, 128, 16, 2, torch.float16, 5.0),
    "B2-Q20-K60-H4-KV2-D16": (2, 20, 60, 4, 2, 16, 12, 2, torch.float32, None),
    "B1-Q33-K80-H2-KV2-D64-bf16-softcap": (1, 33, 80, 2, 2, 64, 24, 0, torch.bfloat16, 3.0),
}


@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_kernels_match_reference_in_the_interpreter(name, triton_interpreter):
    b, q, k, hq, hkv, d, window, sinks, dtype, softcap = CPU_CASES[name]
    _check(_case(b, q, k, hq, hkv, d, window, sinks, dtype, "cpu"), d**-0.5, softcap)


def test_decode_split_along_keys_matches_reference(triton_interpreter):
    from hf_neuralcache.kernels.window_attention.decode import decode

    query, key, value, slots, valid, sink, q_slots, window = _case(1, 1, 200, 4, 2, 16, 150, 2, torch.float32, "cpu")
    visible = window_visibility(q_slots, slots, valid, sink, window)
    ref, ref_lse = window_attention_lse(query, key, value, visible, 0.25)
    out, lse = decode(query, key, value, slots, valid, sink, q_slots, window, 0.25, out_dtype=torch.float32, splits=3)
    assert_close(out, ref, 1e-5, "split output")
    assert_close(lse, ref_lse, 1e-5, "split log-sum-exp")


def test_a_query_that_sees_nothing_gets_zeros(triton_interpreter):
    query, key, value, slots, valid, sink, q_slots, window = _case(1, 1, 20, 2, 1, 16, 4, 0, torch.float32, "cpu")
    valid = torch.zeros_like(valid)
    out, lse = attend(query, key, value, slots, valid, sink, q_slots, window, 0.25, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_cpu_without_interpreter_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    query, key, value, slots, valid, sink, q_slots, window = _case(2, 5, 30, 4, 2, 16, 8, 2, torch.float32, "cpu")
    visible = window_visibility(q_slots, slots, valid, sink, window)
    out = attend(query, key, value, slots, valid, sink, q_slots, window, 0.25)
    assert torch.equal(out, hf_neuralcache.kernels.window_attention.window_attention(query, key, value, visible, 0.25))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: (c[0].squeeze(0), *c[1:]), "expected query of shape"),
        (lambda c: (c[0], c[1][:, :, :, :8], *c[2:]), "expected key of shape"),
        (lambda c: (c[0], c[1].half(), *c[2:]), "expected query, key and value of one dtype"),
        (lambda c: (*c[:3], c[3][:, :5], *c[4:]), "expected slots of shape"),
        (lambda c: (*c[:4], c[4].long(), *c[5:]), "expected valid of dtype"),
        (lambda c: (*c[:6], c[6][:1], c[7]), "expected q_slots of shape"),
        (lambda c: (*c[:7], 0), "expected window an int >= 1"),
    ],
    ids=["query-rank", "key-dim", "dtype", "slots", "valid-dtype", "q_slots", "window"],
)
def test_bad_inputs_raise_one_clear_error(change, message):
    case = change(_case(1, 2, 10, 2, 1, 16, 4, 1, torch.float32, "cpu"))
    with pytest.raises(ValueError, match=message):
        attend(*case, 0.25)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: logit soft-capping and native sliding layers
def test_model_with_the_interpreter_equals_the_reference_path(arch, triton_interpreter, monkeypatch):
    """sliding_window_kv under attn_implementation="neuralcache": Triton kernels vs the PyTorch path, chunked."""
    model = tiny_model(arch, attn_implementation="neuralcache")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 24, dtype=torch.bool)
    padding[0, :3] = False
    outs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=6, sink_tokens=2)
        outs.append(cached_logits(model, cache, ids, padding, [9, 1, 1, 13]))
    assert_close(outs[0][padding], outs[1][padding], 1e-5, "logits, Triton vs reference")


GPU_CASES = {
    "B4-Q1-K4100-H32-KV8-D128-bf16": (4, 1, 4100, 32, 8, 128, 4096, 4, torch.bfloat16, None),
    "B1-Q1-K1028-H9-KV3-D64-fp32": (1, 1, 1028, 9, 3, 64, 1024, 4, torch.float32, None),
    "B2-Q1-K260-H8-KV8-D128-fp16-softcap": (2, 1, 260, 8, 8, 128, 256, 4, torch.float16, 30.0),
    "B2-Q512-K1284-H8-KV2-D128-bf16": (2, 512, 1284, 8, 2, 128, 256, 4, torch.bfloat16, None),
    "B1-Q300-K300-H4-KV1-D64-fp32": (1, 300, 300, 4, 1, 64, 300, 0, torch.float32, None),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_kernels_match_reference_on_gpu(name):
    b, q, k, hq, hkv, d, window, sinks, dtype, softcap = GPU_CASES[name]
    _check(_case(b, q, k, hq, hkv, d, window, sinks, dtype, "cuda"), d**-0.5, softcap)
