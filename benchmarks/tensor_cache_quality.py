"""tensor_cache quality on the embedded SmolLM2-135M (fp32): NLL and perplexity against the bytes each cache holds.

    python benchmarks/tensor_cache_quality.py                       # 4,096 tokens of Sherlock Holmes, the 6 rows
    python benchmarks/tensor_cache_quality.py --tokens 2048 --all   # quicker, plus every training-free variant
    python benchmarks/tensor_cache_quality.py --chunk 64 --learned benchmarks/out/smollm2_learned_w256 \
        --only "full,4 sinks,training_free,learned"                  # the learned memory (fit it first, below)

Fit the learned memory on Pride and Prejudice only (never on the evaluation text):

    hf-neuralcache tensor-cache fit --text ../shared/data/pride_and_prejudice.txt \
        --out benchmarks/out/smollm2_learned_w256

Every row feeds the same text through its cache in prefill chunks of `--chunk` tokens (chunked prefill equals
token-by-token decoding for these caches, so this is what decoding would compute) and averages the NLL of the
tokens at positions >= `--score-from`. "bytes" is what the cache holds at the end (`memory_bytes()`; for the full
KV cache the keys and values of every token). Prints a table and saves a PNG of NLL against bytes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.models import load_embedded_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = {"sherlock": "adventures_of_sherlock_holmes.txt", "pride": "pride_and_prejudice.txt"}

# (label, cache name or None for the full KV cache, cache_config)
ROWS = [
    ("full KV", None, {}),
    ("window 256, no sinks", "sliding_window_kv", {"window": 256, "sink_tokens": 0}),
    ("4 sinks + window 256", "sliding_window_kv", {"window": 256, "sink_tokens": 4}),
    ("4 sinks + window 1024", "sliding_window_kv", {"window": 1024, "sink_tokens": 4}),
    ("tensor_cache W256 training_free", "tensor_cache", {"window": 256}),
    ("tensor_cache W256 paper (untrained)", "tensor_cache", {"window": 256, "mode": "paper"}),
]
VARIANTS = [  # the training-free candidates measured for docs/tensor_cache.md
    (f"tensor_cache W256 {memory} decay {decay}", "tensor_cache", {"window": 256, "memory": memory, "decay": decay})
    for memory in ("mean", "moment", "gaussian")
    for decay in (1.0, 0.999, 0.99)
] + [("tensor_cache W256 paper outer (untrained)", "tensor_cache", {"window": 256, "mode": "paper", "rule": "outer"})]


def text_ids(tokenizer, name: str, tokens: int) -> torch.Tensor:
    path = DATA / TEXTS[name]
    text = path.read_text(encoding="utf-8-sig").split("\n", 60)[-1]  # skip the Project Gutenberg header
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"{path} has {ids.shape[1]} tokens, expected at least {tokens}.")
    return ids


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def evaluate(model, ids: torch.Tensor, name: str | None, config: dict, chunk: int, score_from: int):
    """`(nll, bytes held, seconds)` of feeding `ids` through the cache in chunks."""
    if name is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = hf_neuralcache.create_cache(name, model.config, **config)
    start, nll, count = time.perf_counter(), 0.0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], chunk):
            piece = ids[:, begin : begin + chunk]
            logits = model(piece, **{CACHE_KWARG: cache}).logits.float()
            targets = ids[:, begin + 1 : begin + 1 + piece.shape[1]]  # the next token of each position
            logits = logits[:, : targets.shape[1]]
            positions = torch.arange(begin + 1, begin + 1 + targets.shape[1])
            scored = positions >= score_from
            if scored.any():
                losses = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
                nll += losses[scored].sum().item()
                count += int(scored.sum())
    held = dynamic_bytes(cache) if name is None else cache.memory_bytes()
    return nll / count, held, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text (default 4096)")
    parser.add_argument("--score-from", type=int, default=1024, help="first scored token position (default 1024)")
    parser.add_argument("--text", choices=sorted(TEXTS), default="sherlock", help="which novel (default sherlock)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size (default 512)")
    parser.add_argument("--all", action="store_true", help="also every training-free variant (memory x decay)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only the rows whose label has one")
    parser.add_argument("--learned", default="", help="comma-separated TensorCacheParams folders: learned rows")
    parser.add_argument("--plot", default="benchmarks/out/tensor_cache_quality.png", help="PNG path ('' for none)")
    args = parser.parse_args(argv)

    model, tokenizer = load_embedded_model(attn_implementation="neuralcache")
    ids = text_ids(tokenizer, args.text, args.tokens)
    rows = ROWS + (VARIANTS if args.all else [])
    for folder in filter(None, args.learned.split(",")):
        params = hf_neuralcache.TensorCacheParams.from_pretrained(folder)
        config = {"mode": "learned", "params": params, "window": params.window, "sink_tokens": params.sink_tokens}
        rows.append((f"tensor_cache W{params.window} learned", "tensor_cache", config))
    if args.only:
        rows = [row for row in rows if any(part in row[0] for part in args.only.split(","))]
    print(
        f"== SmolLM2-135M fp32, {args.tokens} tokens of {TEXTS[args.text]}, NLL over tokens >= {args.score_from}, "
        f"prefill chunks of {args.chunk}"
    )
    print(f"  {'cache':42s} | {'NLL':>6} | {'ppl':>7} | {'bytes held':>12} | {'vs 4+1024':>9} | {'s':>5}")
    results = []
    reference_bytes = None
    for label, name, config in rows:
        nll, held, seconds = evaluate(model, ids, name, config, args.chunk, args.score_from)
        if label == "4 sinks + window 1024":
            reference_bytes = held
        ratio = f"{held / reference_bytes:9.2f}" if reference_bytes else f"{'':9s}"
        print(f"  {label:42s} | {nll:6.4f} | {math.exp(nll):7.3f} | {held:12,} | {ratio} | {seconds:5.0f}", flush=True)
        results.append((label, nll, held))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plt.figure(figsize=(7, 4.5))
        for label, nll, held in results:
            plt.scatter(held / 2**20, nll, marker="*" if "tensor_cache" in label else "o")
            plt.annotate(label, (held / 2**20, nll), fontsize=6, xytext=(3, 3), textcoords="offset points")
        plt.xscale("log")
        plt.xlabel("bytes held (MiB, log)")
        plt.ylabel(f"NLL, tokens >= {args.score_from}")
        plt.title(f"SmolLM2-135M fp32, {args.tokens} tokens of {args.text}")
        plt.tight_layout()
        plt.savefig(args.plot, dpi=130)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
