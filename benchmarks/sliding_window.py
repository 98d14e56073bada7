"""sliding_window_kv on the embedded SmolLM2-135M: exactness, bytes held while generating, decode speed.

    python benchmarks/sliding_window.py                    # 2,000 new tokens, window 256, 4 sinks
    python benchmarks/sliding_window.py --new-tokens 300   # quicker

Prints three tables and saves `sliding_window_memory.png` (bytes held against tokens generated):
1. exactness: fp32 logits of sliding_window_kv against DynamicCache (window >= length) and against a full-attention
   forward under the band-plus-sinks mask (window < length);
2. bytes held by sliding_window_kv and DynamicCache every 250 generated tokens;
3. decode tokens/s of both in the same run (a ratio: this machine is noisy).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import hf_neuralcache
from hf_neuralcache import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"
from hf_neuralcache.models import load_embedded_model
from hf_neuralcache.testing import cached_logits, reference_logits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "adventures_of_sherlock_holmes.txt"


def text_ids(tokenizer, tokens: int) -> torch.Tensor:
    text = DATA.read_text(encoding="utf-8-sig").split("\n", 60)[-1] if DATA.exists() else "The quick brown fox. " * 400
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def exactness(model, tokenizer, window: int, sinks: int) -> list[tuple[str, float, bool]]:
    ids = text_ids(tokenizer, 320)
    padding = torch.ones_like(ids, dtype=torch.bool)
    chunks = [200] + [1] * 40 + [80]
    rows = []
    with torch.no_grad():
        full = model(ids).logits
    big = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=1024, sink_tokens=sinks)
    got = cached_logits(model, big, ids, padding, chunks)
    rows.append(("window 1024 >= 320 tokens vs DynamicCache / no cache", (got - full).abs().max().item(), True))
    small = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=64, sink_tokens=sinks)
    got = cached_logits(model, small, ids, padding, chunks)
    ref = reference_logits(model, ids, padding, 64, sinks)
    rows.append(("window 64 < 320 tokens vs band+sinks reference", (got - ref).abs().max().item(), True))
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    prompt = ids[:, :100]
    same = torch.equal(
        model.generate(prompt, **kwargs),
        model.generate(prompt, cache_implementation="sliding_window_kv", cache_config={"window": 1024}, **kwargs),
    )
    rows.append(("greedy 64 tokens, window 1024, identical to DynamicCache", 0.0, same))
    return rows


class Recorder(BaseStreamer):
    """Records the cache's bytes and the time after every generated token."""

    def __init__(self, measure):
        self.measure, self.bytes, self.times, self.first = measure, [], [], True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.bytes.append(self.measure())
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_generation(model, prompt, new_tokens, cache, measure):
    recorder = Recorder(measure)
    start = time.perf_counter()
    model.generate(
        prompt,
        **{CACHE_KWARG: cache},
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=recorder,
    )
    decode_seconds = recorder.times[-1] - recorder.times[0]
    return recorder.bytes, (len(recorder.times) - 1) / decode_seconds, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=2000, help="tokens to generate (default 2000)")
    parser.add_argument("--window", type=int, default=256, help="sliding window (default 256)")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    parser.add_argument("--plot", default="sliding_window_memory.png", help="PNG path ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, tokenizer = load_embedded_model()
    print("== exactness (SmolLM2-135M, fp32, 320 tokens of Sherlock Holmes)")
    for what, err, ok in exactness(model, tokenizer, args.window, args.sinks):
        print(f"  {what:58s} max|dlogit| = {err:.2e}  {'OK' if ok else 'MISMATCH'}")

    prompt = text_ids(tokenizer, args.prompt_tokens)
    ours = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=args.window, sink_tokens=args.sinks)
    dynamic = DynamicCache(config=model.config)
    ours_bytes, ours_tps, _ = run_generation(model, prompt, args.new_tokens, ours, ours.memory_bytes)
    dyn_bytes, dyn_tps, _ = run_generation(model, prompt, args.new_tokens, dynamic, lambda: dynamic_bytes(dynamic))

    print(
        f"\n== bytes held while generating {args.new_tokens} tokens after a {prompt.shape[1]}-token prompt "
        f"(window {args.window}, {args.sinks} sinks)"
    )
    print(f"  {'generated':>9} | {'sliding_window_kv':>17} | {'DynamicCache':>12} | ratio")
    marks = [n for n in range(250, args.new_tokens + 1, 250)] or [args.new_tokens]
    for n in marks:
        ours_n, dyn_n = ours_bytes[n - 1], dyn_bytes[n - 1]
        print(f"  {n:>9} | {ours_n:>17,} | {dyn_n:>12,} | {ours_n / dyn_n:.3f}")
    print(
        f"\n== decode speed: sliding_window_kv {ours_tps:.1f} tok/s, DynamicCache {dyn_tps:.1f} tok/s, "
        f"ratio {ours_tps / dyn_tps:.2f}"
    )

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = range(1, len(ours_bytes) + 1)
        plt.figure(figsize=(6, 3.5))
        plt.plot(steps, [b / 2**20 for b in dyn_bytes], label="DynamicCache")
        plt.plot(steps, [b / 2**20 for b in ours_bytes], label=f"sliding_window_kv (W={args.window}, S={args.sinks})")
        plt.xlabel("generated tokens")
        plt.ylabel("KV cache MiB")
        plt.title("SmolLM2-135M, fp32")
        plt.legend()
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
