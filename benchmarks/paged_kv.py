"""paged_kv: decode attention over pages, and beam search memory and time, in one run.

    python benchmarks/paged_kv.py                  # CPU: small sizes, the PyTorch reference for the paged kernel
    python benchmarks/paged_kv.py --device cuda    # GPU: the issue's sizes (bf16, B=32, 8K context; 1B model)

Prints two tables:
1. decode attention (one query per sequence; GQA): the paged kernel reading pages in place, SDPA on the same K/V
   stored contiguously, and gathering the pages into a contiguous tensor then SDPA; each with its time, the
   bandwidth it achieves reading K and V, and that bandwidth against a device-to-device copy of the same bytes;
2. beam search (8 beams over a long prompt, a Llama-3.2-1B-shaped model with random weights): paged_kv with the
   `"neuralcache"` kernels and with SDPA, DynamicCache, and greedy decoding of a batch of 8 (the floor); time,
   time against the floor, the bytes the cache holds at the end and (CUDA) the peak memory of the run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from hf_neuralcache.kernels.paged_attention import gather_pages, paged_attention, use_triton

import hf_neuralcache  # noqa: F401  (registers cache_implementation="paged_kv")
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.cli import cache_memory_bytes
from hf_neuralcache.models import tiny_model

SIZES = {
    # decode: batch, context, query heads, KV heads, head_dim, dtype; beams: model shape, prompt, new tokens
    "cuda": dict(
        batch=32, context=8192, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
        model=dict(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        ),
        prompt=4096, new_tokens=32,
    ),
    "cpu": dict(
        batch=4, context=1024, heads=8, kv_heads=2, head_dim=64, dtype=torch.float32,
        model=dict(
            vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
        ),
        prompt=512, new_tokens=16,
    ),
}  # fmt: skip


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn()` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def decode_table(device: str, size: dict, page_size: int) -> list[tuple]:
    batch, context, heads, kv_heads, dim, dtype = (
        size[k] for k in ("batch", "context", "heads", "kv_heads", "head_dim", "dtype")
    )
    gen = torch.Generator(device=device).manual_seed(0)
    n = context // page_size
    k_pages = torch.randn(batch * n, kv_heads, page_size, dim, generator=gen, device=device, dtype=dtype)
    v_pages = torch.randn(batch * n, kv_heads, page_size, dim, generator=gen, device=device, dtype=dtype)
    table = torch.randperm(batch * n, generator=gen, device=device).view(batch, n).to(torch.int32)  # scattered
    query = torch.randn(batch, heads, 1, dim, generator=gen, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    kv_start = torch.zeros(batch, device=device, dtype=torch.int32)
    keys, values = gather_pages(k_pages, table.long(), context), gather_pages(v_pages, table.long(), context)
    keys, values = keys.contiguous(), values.contiguous()
    scale = dim**-0.5
    repeats = 50 if device == "cuda" else 5

    def sdpa(k, v):
        return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)

    def gather_sdpa():
        return sdpa(gather_pages(k_pages, table.long(), context), gather_pages(v_pages, table.long(), context))

    def paged():
        return paged_attention(query, k_pages, v_pages, table, seq_lens, kv_start, scale, max_len=context)

    error = (paged().float() - sdpa(keys, values).float()).abs().max().item()
    kv_bytes = keys.nbytes + values.nbytes
    source = torch.empty(kv_bytes // 2, dtype=torch.int16, device=device)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source), device, repeats)
    copy_bw = 2 * kv_bytes / copy_s  # a copy reads and writes every byte
    kernel = "Triton paged kernel" if use_triton(query) else "paged: gather + SDPA (no Triton here)"
    rows = []
    for name, fn in (
        (kernel, paged),
        ("SDPA, contiguous K/V", lambda: sdpa(keys, values)),
        ("gather + SDPA", gather_sdpa),
    ):
        seconds = timed(fn, device, repeats)
        rows.append((name, seconds * 1e3, kv_bytes / seconds / 1e9, kv_bytes / seconds / copy_bw))
    rows.append(("device copy (read + write)", copy_s * 1e3, copy_bw / 1e9, 1.0))
    return rows, error, kv_bytes


def beam_table(device: str, size: dict, beams: int) -> list[tuple]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = tiny_model("llama", **size["model"]).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, size["prompt"]), generator=gen).to(device)
    new = size["new_tokens"]
    base = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    runs = [
        ("greedy, batch of 8, DynamicCache (floor)", "sdpa", dict(input_ids=prompt.repeat(beams, 1))),
        (  # the same floor on the attention path of the last row (on the CPU, sdpa's prefill path differs)
            "greedy, batch of 8, paged_kv + neuralcache",
            "neuralcache",
            dict(input_ids=prompt.repeat(beams, 1), cache_implementation="paged_kv"),
        ),
        (f"beam search x{beams}, DynamicCache", "sdpa", dict(num_beams=beams)),
        (
            f"beam search x{beams}, paged_kv + sdpa (gather)",
            "sdpa",
            dict(num_beams=beams, cache_implementation="paged_kv"),
        ),
        (
            f"beam search x{beams}, paged_kv + neuralcache",
            "neuralcache",
            dict(num_beams=beams, cache_implementation="paged_kv"),
        ),
    ]
    rows, floor, reference = [], None, None
    for name, attn, kwargs in runs:
        model.set_attn_implementation(attn)
        inputs = kwargs.pop("input_ids", prompt)

        def run(inputs=inputs, kwargs=kwargs):
            with torch.inference_mode():
                return model.generate(inputs, **base, **kwargs)

        out = run()  # warm-up (kernels compile)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        floor = floor or seconds
        if "num_beams" in kwargs:
            reference = reference if reference is not None else out.sequences
            same = torch.equal(out.sequences, reference)
        else:
            same = None
        rows.append((name, seconds, seconds / floor, cache_memory_bytes(out[CACHE_KWARG]), peak, same))
        del out
    return rows


def decode_report(device: str, size: dict, page_size: int, name: str) -> None:
    rows, error, kv_bytes = decode_table(device, size, page_size)
    print(
        f"\n1. decode attention on {name}: B={size['batch']}, context {size['context']}, {size['heads']} query / "
        f"{size['kv_heads']} KV heads, head_dim {size['head_dim']}, {str(size['dtype'])[6:]}, page {page_size}; "
        f"K+V {kv_bytes / 1e6:.0f} MB; paged vs SDPA max abs diff {error:.2e}"
    )
    print(f"{'method':44} {'ms':>9} {'GB/s':>9} {'of copy bw':>11}")
    for method, ms, bandwidth, fraction in rows:
        print(f"{method:44} {ms:9.3f} {bandwidth:9.1f} {fraction:10.0%}")
    print(f"paged kernel / contiguous SDPA: {rows[0][1] / rows[1][1]:.2f}x (goal <= 1.10x)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--beams", type=int, default=8)
    parser.add_argument("--prompt", type=int, help="Prompt tokens of the beam search (default: by device).")
    parser.add_argument("--new-tokens", type=int, help="New tokens of the beam search (default: by device).")
    parser.add_argument("--skip-decode", action="store_true", help="Only the beam search table.")
    parser.add_argument("--skip-beams", action="store_true", help="Only the decode attention table.")
    args = parser.parse_args(argv)
    device = args.device
    size = dict(SIZES[device])
    size["prompt"] = args.prompt or size["prompt"]
    size["new_tokens"] = args.new_tokens or size["new_tokens"]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    if not args.skip_decode:
        decode_report(device, size, args.page_size, name)
    if args.skip_beams:
        return
    rows = beam_table(device, size, args.beams)
    shape = size["model"]
    print(
        f"\n2. beam search on {name}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, random weights, "
        f"prompt {size['prompt']} tokens, {size['new_tokens']} new tokens"
    )
    print(f"{'run':48} {'s':>8} {'x floor':>8} {'cache MB':>9} {'peak MB':>9} {'same beams':>11}")
    for run, seconds, ratio, held, peak, same in rows:
        peak_mb = f"{peak / 1e6:9.0f}" if peak is not None else f"{'-':>9}"
        print(f"{run:48} {seconds:8.2f} {ratio:8.2f} {held / 1e6:9.1f} {peak_mb} {'' if same is None else same!s:>11}")
    print("goal: paged_kv beam search <= 1.5x the batch-8 greedy floor")


if __name__ == "__main__":
    main()
