"""Decode tokens/s at batch 1: torch.compile'd decode steps, and eager ones, for our caches and transformers' own.

Two tables (issue 6):

* `compiled`: transformers' `StaticCache` vs `sliding_window_kv` vs `tensor_cache`, every decode step through
  `torch.compile(model.forward, fullgraph=True)` (inductor; CUDA graphs on a GPU, `mode="reduce-overhead"`, as
  `generate` compiles by default), at contexts 1K, 8K and 32K. Goal: flat in the context, and at 32K at least the
  static cache's 8K figure.
* `eager`: `DynamicCache` vs `sliding_window_kv` vs `tensor_cache` with the plain forward, at 1K, 4K and 16K.

Both tables also have `tensor_cache learned` (`mode="learned"`, same window and sinks) and, under each table, the
ratio of its tokens/s to `tensor_cache` (training_free). Its parameters come from `--learned DIR` (a folder
`fit_tensor_cache` saved, fitted for this model, window and sinks) or, by default, from
`TensorCacheParams.initial(model, window, sinks)`: the decode step runs the same operations on the same shapes
whatever the fitted values are, so the speed does not depend on them.

Each run prefills `context` random tokens eagerly (in chunks of `--prefill-chunk`), runs `--warmup` decode steps
(the compilation happens there; its seconds are reported) and times `--steps` greedy steps, synchronising after
each like `generate` does. Random weights: the speed does not depend on them.

GPU, Llama-3.2-1B-shaped model in bf16 (what the issue asks for):

    python benchmarks/compiled_decode.py --device cuda --dtype bfloat16

A small CPU run (2 cores: keep it modest; inductor's CPU compile takes minutes):

    python benchmarks/compiled_decode.py --model small --tables compiled --contexts 256 1024 4096 --steps 16
    python benchmarks/compiled_decode.py --model smollm2 --tables eager --steps 16
    python benchmarks/compiled_decode.py --model small --caches tensor_cache tensor_cache_learned \
        --contexts 1024 8192 32768 --eager-contexts 1024 8192 32768 --steps 16   # learned vs training_free

`--caches tensor_cache tensor_cache_retain` compares training_free tensor_cache with the same cache keeping
`--tc-retain` evicted tokens exactly (`cache_config["retain"]`, carry 0.5; not in the default tables), with a
ratio row under each table.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache

import hf_neuralcache
from hf_neuralcache.models import load_embedded_model
from hf_neuralcache.registry import CACHE_KWARG  # `cache` from transformers 5.24, else `past_key_values`

ATTENTION = {
    "static": "sdpa",
    "dynamic": "sdpa",
    "sliding_window_kv": "sdpa",
    "tensor_cache": "neuralcache",
    "tensor_cache_learned": "neuralcache",
    "tensor_cache_retain": "neuralcache",
}
LABELS = {"static": "StaticCache", "dynamic": "DynamicCache", "tensor_cache_learned": "tensor_cache learned",
          "tensor_cache_retain": "tensor_cache + retain"}  # fmt: skip
# Llama-3.2-1B's shapes (random weights, no download); "small" is a 4-layer model of the same family for the CPU
SHAPES = {
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=131072,
    ),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    if name == "smollm2":
        model, _ = load_embedded_model()
        return model.to(device=device, dtype=dtype).eval()
    config = AutoConfig.for_model("llama", **SHAPES[name])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def make_cache(name: str, model, context: int, total: int, args):
    if name == "static":
        return StaticCache(config=model.config, max_cache_len=total)
    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "tensor_cache_learned":
        params = learned_params(model, args)
        return hf_neuralcache.create_cache("tensor_cache", model.config, mode="learned", params=params,
                                           window=args.tc_window, sink_tokens=args.sinks)  # fmt: skip
    if name == "tensor_cache_retain":  # training_free with retained tokens (cache_config["retain"], carry 0.5)
        return hf_neuralcache.create_cache("tensor_cache", model.config, window=args.tc_window, sink_tokens=args.sinks,
                                           retain=args.tc_retain, carry=0.5)  # fmt: skip
    options = {"window": args.sw_window} if name == "sliding_window_kv" else {"window": args.tc_window}
    return hf_neuralcache.create_cache(name, model.config, sink_tokens=args.sinks, **options)


def learned_params(model, args):
    """The learned memory's parameters: `--learned DIR`, or initial ones (the speed does not depend on the values)."""
    if getattr(args, "params", None) is None:
        if args.learned:
            args.params = hf_neuralcache.TensorCacheParams.from_pretrained(args.learned)
            args.params.check(model=model, window=args.tc_window, sink_tokens=args.sinks)
        else:
            args.params = hf_neuralcache.TensorCacheParams.initial(model, args.tc_window, args.sinks)
    return args.params


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_speed(model, forward, name: str, context: int, args) -> tuple[float, float]:
    """(tokens/s over the timed steps, seconds of the warm-up steps) for one cache at one context."""
    total = context + args.warmup + args.steps * args.rounds + 1
    cache = make_cache(name, model, context, total, args)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=generator).to(args.device)
    with torch.no_grad():
        for start in range(0, context, args.prefill_chunk):
            chunk = ids[:, start : start + args.prefill_chunk]
            positions = torch.arange(start, start + chunk.shape[1], device=args.device).unsqueeze(0)
            logits = model(chunk, position_ids=positions, **{CACHE_KWARG: cache}).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([[context]], device=args.device)

        def step(token, position):
            logits = forward(input_ids=token, position_ids=position, **{CACHE_KWARG: cache}).logits
            return logits[:, -1:].argmax(-1), position + 1

        sync(args.device)
        began = time.perf_counter()
        for _ in range(args.warmup):
            token, position = step(token, position)
            sync(args.device)
        warmup = time.perf_counter() - began
        elapsed = []
        for _ in range(args.rounds):  # the fastest round: least disturbed by other work on a shared machine
            began = time.perf_counter()
            for _ in range(args.steps):
                token, position = step(token, position)
                sync(args.device)
            elapsed.append(time.perf_counter() - began)
    return args.steps / min(elapsed), warmup


def prepare(model, name: str, compiled: bool, args):
    """Set the attention implementation cache `name` runs with; return the forward to time (compiled or not)."""
    model.set_attn_implementation(ATTENTION[name])
    if not compiled:
        return model.forward
    return torch.compile(model.forward, fullgraph=True, backend=args.backend, mode=args.mode)


def table(model, title: str, caches: list[str], contexts: list[int], compiled: bool, args) -> None:
    print(f"\n{title}")
    print("| cache | " + " | ".join(f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts) + " |")
    print("|---|" + "---:|" * len(contexts))
    speeds = {}
    for name in caches:
        forward = prepare(model, name, compiled, args)
        cells, warmups = [], []
        for context in contexts:
            speed, warmup = decode_speed(model, forward, name, context, args)
            speeds[name, context] = speed
            cells.append(f"{speed:.1f}")
            warmups.append(f"{warmup:.0f}s")
        label = LABELS.get(name, name)
        print(f"| {label} | " + " | ".join(cells) + " |" + (f"  (warm-up {', '.join(warmups)})" if compiled else ""),
              flush=True)  # fmt: skip
    if "tensor_cache" in caches and "tensor_cache_learned" in caches:
        ratios = [speeds["tensor_cache_learned", c] / speeds["tensor_cache", c] for c in contexts]
        print("| learned / training_free | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    if "tensor_cache" in caches and "tensor_cache_retain" in caches:
        ratios = [speeds["tensor_cache_retain", c] / speeds["tensor_cache", c] for c in contexts]
        print("| retain / training_free | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    model.set_attn_implementation("sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llama-1b", "small", "smollm2"], default="llama-1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tables", nargs="+", choices=["compiled", "eager"], default=["compiled", "eager"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768], help="compiled table")
    parser.add_argument("--eager-contexts", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--caches", nargs="+", default=None, help="default: all caches of each table")
    parser.add_argument("--learned", default=None, help="fitted TensorCacheParams folder (default: initial params)")
    parser.add_argument("--sw-window", type=int, default=1024, help="sliding_window_kv window")
    parser.add_argument("--tc-window", type=int, default=256, help="tensor_cache window")
    parser.add_argument("--tc-retain", type=int, default=203, help="retained tokens of tensor_cache_retain")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps (compilation)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of --steps; the fastest is reported")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode; default reduce-overhead on cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode is None:
        args.mode = "reduce-overhead" if args.device == "cuda" else "default"
    torch._dynamo.config.cache_size_limit = 64  # one compiled forward per cache type and shape
    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    where = f"{args.model}, {args.dtype}, {args.device}"
    if args.device == "cpu":
        where += f", {torch.get_num_threads()} threads"
    if args.device == "cuda":
        where += f" ({torch.cuda.get_device_name()})"
    windows = f"sliding_window_kv window {args.sw_window}, tensor_cache window {args.tc_window}, {args.sinks} sinks"
    if "compiled" in args.tables:
        caches = args.caches or ["static", "sliding_window_kv", "tensor_cache", "tensor_cache_learned"]
        title = f"Compiled decode tok/s ({where}; {args.backend}, mode={args.mode}; {windows})"
        table(model, title, caches, args.contexts, True, args)
    if "eager" in args.tables:
        caches = args.caches or ["dynamic", "sliding_window_kv", "tensor_cache", "tensor_cache_learned"]
        table(model, f"Eager decode tok/s ({where}; {windows})", caches, args.eager_contexts, False, args)


if __name__ == "__main__":
    main()
