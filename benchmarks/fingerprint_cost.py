"""What the model fingerprint costs each generate() call with a cache hook, next to the generate() call itself.

Every call with a prefix, inference or semantic cache checks that the model is unchanged (module walk, version
counters, a 64-element sample of every tensor, forward-hook scan); a full hash of every weight runs only when that
check sees a change. This prints, for the embedded SmolLM2-135M and a Llama-3.2-1B-shaped model (random weights):

| model | params | per-call check ms | full hash s | generate s | check / generate |

    python benchmarks/fingerprint_cost.py [--skip-1b] [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_neuralcache.hooks.fingerprint import model_fingerprint, refresh_fingerprint


def llama_1b(dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        return LlamaForCausalLM(config).to(dtype).eval()


def measure(name: str, model, repeats: int) -> dict:
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    refresh_fingerprint(model)
    start = time.perf_counter()
    model_fingerprint(model)
    full = time.perf_counter() - start
    checks = []
    for _ in range(repeats):
        start = time.perf_counter()
        model_fingerprint(model)
        checks.append(time.perf_counter() - start)
    ids = torch.randint(5, 1000, (1, 32), device=device)
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=8, do_sample=False)
    generate = time.perf_counter() - start
    check = statistics.median(checks)
    return {"model": name, "params": params, "check_ms": check * 1e3, "p99_ms": sorted(checks)[-max(1, repeats // 100)]
            * 1e3, "full_s": full, "generate_s": generate, "ratio": check / generate}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-1b", action="store_true", help="Only the embedded SmolLM2.")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype of the 1B model.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    rows = []
    from hf_neuralcache.models import load_embedded_model

    smol, _ = load_embedded_model(torch.float32)
    rows.append(measure("SmolLM2-135M fp32", smol.to(args.device), args.repeats))
    del smol
    if not args.skip_1b:
        big = llama_1b(getattr(torch, args.dtype)).to(args.device)
        rows.append(measure(f"Llama-3.2-1B-shaped {args.dtype}", big, args.repeats))
    print("| model | params | per-call check ms (median / p99) | full hash s | generate(32+8) s | check / generate |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:,.0f} M | {r['check_ms']:.2f} / {r['p99_ms']:.2f} | "
              f"{r['full_s']:.2f} | {r['generate_s']:.2f} | {100 * r['ratio']:.2f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
