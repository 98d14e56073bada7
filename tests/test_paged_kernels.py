"""Paged attention Triton kernels vs the PyTorch reference (`naive.py`), over a grid of shapes.

On the CPU the kernels run under Triton's interpreter (tiny shapes, it is slow); `-m gpu` runs them on CUDA with
the sizes models use. Inputs are random with a fixed seed; the page tables are shuffled and the unused pages hold
noise, so a kernel that reads the wrong page or a masked slot fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_neuralcache.kernels import paged_attention as ops
from hf_neuralcache.kernels.paged_attention import decode, paged_attention_naive, prefill, write, write_pages_naive

from hf_neuralcache.models import tiny_model
from hf_neuralcache.testing import assert_close, assert_same_generation

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


INTERPRETED = ops.interpreting()  # TRITON_INTERPRET=1 must be set before Triton is first imported
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the child process of test_kernels_on_the_cpu")


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted tests in this process")
def test_kernels_on_the_cpu():
    """Run this file again under Triton's interpreter: Triton reads TRITON_INTERPRET once, at its first import."""
    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable,
        "-P",
        "-m",
        "pytest",
        str(Path(__file__)),
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not gpu",
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def case(lens, heads, kv_heads, dim, page, dtype, starts=None, window=None, softcap=None):
    name = f"B{len(lens)}-T{max(lens)}-H{heads}-KV{kv_heads}-D{dim}-P{page}-{dtype}"
    name += f"-W{window}" if window else ""
    name += f"-C{softcap:g}" if softcap else ""
    name += "-pad" if starts else ""
    return pytest.param(lens, heads, kv_heads, dim, page, DTYPES[dtype], starts, window, softcap, id=name)


def make_inputs(lens, heads, kv_heads, dim, page, dtype, starts, q_length, device):
    gen = torch.Generator().manual_seed(0)
    batch, n = len(lens), -(-max(lens) // page)
    pool = batch * n + 3  # spare pages hold noise too
    k_pages = torch.randn(pool, kv_heads, page, dim, generator=gen).to(device, dtype)
    v_pages = torch.randn(pool, kv_heads, page, dim, generator=gen).to(device, dtype)
    table = torch.randperm(pool, generator=gen)[: batch * n].view(batch, n).to(device)
    query = torch.randn(batch, heads, q_length, dim, generator=gen).to(device, dtype)
    seq_lens = torch.tensor(lens, device=device)
    kv_start = torch.tensor(starts or [0] * batch, device=device)
    return query, k_pages, v_pages, table, seq_lens, kv_start


DECODE = [
    case([37, 5], 4, 2, 64, 16, "fp32"),  # ragged, partly filled last pages
    case([48, 17, 1], 8, 2, 128, 16, "bf16", starts=[0, 3, 0]),  # full pages, one token, left padding
    case([33, 20], 4, 4, 64, 1, "fp16"),  # MHA, one token per page
    case([50, 31], 6, 2, 80, 32, "fp32", window=9, softcap=30.0),  # head_dim 80, sliding window, soft-capping
    case([130, 64], 4, 1, 64, 16, "fp16"),  # MQA, several splits
]


@interpreted
@pytest.mark.parametrize("lens, heads, kv_heads, dim, page, dtype, starts, window, softcap", DECODE)
def test_decode_kernel_matches_naive(lens, heads, kv_heads, dim, page, dtype, starts, window, softcap):
    inputs = make_inputs(lens, heads, kv_heads, dim, page, dtype, starts, 1, "cpu")
    expected = paged_attention_naive(*inputs, dim**-0.5, softcap, window)
    for splits in (None, 3):
        got = decode.paged_decode(*inputs, dim**-0.5, softcap, window, num_splits=splits)
        assert_close(got.float(), expected.float(), TOLERANCE[dtype], f"decode, {splits} splits")


PREFILL = [
    case([37, 21], 4, 2, 64, 16, "fp32"),
    case([40, 24], 8, 2, 128, 16, "bf16", starts=[0, 5]),
    case([29, 26], 4, 2, 64, 4, "fp16", window=7, softcap=20.0),
]


@interpreted
@pytest.mark.parametrize("q_length", [3, 20])
@pytest.mark.parametrize("lens, heads, kv_heads, dim, page, dtype, starts, window, softcap", PREFILL)
def test_prefill_kernel_matches_naive(q_length, lens, heads, kv_heads, dim, page, dtype, starts, window, softcap):
    inputs = make_inputs(lens, heads, kv_heads, dim, page, dtype, starts, q_length, "cpu")
    expected = paged_attention_naive(*inputs, dim**-0.5, softcap, window)
    got = prefill.paged_prefill(*inputs, dim**-0.5, softcap, window)
    assert_close(got.float(), expected.float(), TOLERANCE[dtype], "prefill")


@interpreted
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_write_kernel_matches_naive(dtype):
    gen = torch.Generator().manual_seed(0)
    pools = [torch.randn(6, 2, 16, 64, generator=gen).to(DTYPES[dtype]) for _ in range(2)]
    key, value = torch.randn(2, 11, 2, 64, generator=gen).to(DTYPES[dtype])
    slots = torch.randperm(6 * 16, generator=gen)[:11]
    expected = [p.clone() for p in pools]
    write_pages_naive(*expected, key, value, slots)
    write.write_pages(*pools, key, value, slots)
    assert torch.equal(pools[0], expected[0]) and torch.equal(pools[1], expected[1])


@interpreted
def test_dispatch_runs_triton_only_on_cuda_or_under_the_interpreter(monkeypatch):
    cpu = torch.zeros(1)
    assert ops.use_triton(cpu)  # TRITON_INTERPRET=1
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not ops.use_triton(cpu)


@interpreted
def test_generate_with_the_kernels_equals_dynamic_cache():
    model = tiny_model("llama", attn_implementation="neuralcache", num_hidden_layers=1)  # head_dim 16, GQA 4/2
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_same_generation(model, ids, 4, 1e-4, cache_implementation="paged_kv", cache_config={"page_size": 4})
    greedy = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assistant = tiny_model("llama", seed=1, num_hidden_layers=1)
    assisted = model.generate(
        ids[:1], assistant_model=assistant, max_new_tokens=5, do_sample=False, cache_implementation="paged_kv"
    )
    assert torch.equal(assisted, greedy)  # its verification steps run the prefill kernel on the pages


# ---- the same on a GPU --------------------------------------------------------------------------------------------
GPU_DECODE = [
    case([8192, 4000, 17, 1], 32, 8, 128, 16, "bf16", starts=[0, 7, 0, 0]),
    case([1000, 999], 32, 8, 64, 16, "fp16"),
    case([3000, 2048], 16, 4, 128, 32, "fp32", window=512),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lens, heads, kv_heads, dim, page, dtype, starts, window, softcap", GPU_DECODE)
@pytest.mark.parametrize("q_length", [1, 7, 300])
def test_kernels_match_naive_on_gpu(q_length, lens, heads, kv_heads, dim, page, dtype, starts, window, softcap):
    lens = [max(length, q_length) for length in lens]  # every query a real position
    inputs = make_inputs(lens, heads, kv_heads, dim, page, dtype, starts, q_length, "cuda")
    expected = paged_attention_naive(*inputs, dim**-0.5, softcap, window)
    got = ops.paged_attention(*inputs, dim**-0.5, softcap, window)
    tolerance = TOLERANCE[dtype] * (5 if dtype == torch.float32 else 1)  # tf32 never: fp32 dots are IEEE
    assert_close(got.float(), expected.float(), tolerance, "paged attention on CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_gpu_with_the_kernels():
    model = tiny_model("llama", attn_implementation="neuralcache", head_dim=64).cuda()
    ids = torch.randint(3, 256, (4, 100), generator=torch.Generator().manual_seed(0)).cuda()
    assert_same_generation(model, ids, 16, 1e-3, cache_implementation="paged_kv")
    kwargs = dict(max_new_tokens=12, num_beams=4, do_sample=False)
    assert torch.equal(model.generate(ids, cache_implementation="paged_kv", **kwargs), model.generate(ids, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_without_a_gpu(request, dtype):
    """Triton compiles every kernel to a cubin for sm_90 (H100/H200) with its bundled ptxas; no GPU needed."""
    import inspect
    import re

    if not re.search(r"(?<!not )\bslow\b", request.config.getoption("markexpr") or ""):
        pytest.skip("a minute of compiling: run with -m slow")  # nothing deselects `slow` tests by default

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_for_sm90(kernel, pointers, constants):
        names = inspect.signature(kernel.fn).parameters
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
        return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))

    floats = {"scaling": "fp32", "softcap": "fp32"}
    ints = {"TABLE": "*i32", "SEQ_LENS": "*i32", "KV_START": "*i32"}
    tensors = {name: f"*{dtype}" for name in ("Q", "K", "V", "OUT", "KEY", "VALUE", "K_PAGES", "V_PAGES")}
    pointers = {**floats, **ints, **tensors, "O_PART": "*fp32", "LSE_PART": "*fp32", "SLOTS": "*i64"}
    precision = "ieee" if dtype == "fp32" else "tf32"
    dims = dict(D=128, BLOCK_D=128, DV=128, BLOCK_DV=128, PAGE=16)
    common = dict(dims, SOFTCAP=True, WINDOW=True, PRECISION=precision, UPCAST=False)
    compile_for_sm90(decode._decode_split_kernel, pointers, dict(common, GROUPS=4, G_PAD=16, BLOCK_N=32))
    compile_for_sm90(decode._merge_splits_kernel, pointers, dict(SPLITS=3, S_PAD=4, DV=128, BLOCK_DV=128))
    compile_for_sm90(prefill._prefill_kernel, pointers, dict(common, GROUPS=4, BLOCK_M=64, BLOCK_N=32))
    compile_for_sm90(write._write_kernel, pointers, dims)
