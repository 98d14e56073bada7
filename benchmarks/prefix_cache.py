"""Prefix and inference cache: time to first token with and without a cached prefix, tier load speeds, hit latency.

    python benchmarks/prefix_cache.py                 # embedded SmolLM2-135M fp32 on the CPU (2,048-token prompts)
    python benchmarks/prefix_cache.py --gpu           # also a Llama-3.2-1B-shaped bf16 model, 8K prefix, on CUDA

Table 1 (the issue's figure): time to first token (from the generate() call to the streamer receiving the first
new token) for a 2,048-token prompt
- with no cache; with a full hit (the same prompt cached) from the RAM tier and from the disk tier (a fresh
  `PrefixCache` object with `ram_bytes=0`; the OS page cache is warm, as it is for a server re-reading its cache);
- with a partial hit: a 1,792-token shared prefix followed by a new question (256 tokens).
Goal: full hit >= 20x faster than no cache. Each figure is the median of `--repeats` runs, in the same process.

Table 2: the inference cache's hit latency (p50, p99 over 1,000 hits of an identical request).

Table 3 (`--gpu`): for a random-weight Llama-3.2-1B-shaped model in bf16 with an 8,192-token prefix, the load time
from each tier vs recomputing the prefill, and the achieved bytes/s vs the measured host-to-device copy (pinned)
and the disk read bandwidth (a file written and dropped from the page cache with `posix_fadvise`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from hf_neuralcache import InferenceCache, PrefixCache
from hf_neuralcache.hooks.prefix import kv_bytes_per_token
from hf_neuralcache.models import load_embedded_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pride_and_prejudice.txt"


def text_ids(tokenizer, tokens: int, offset: int = 0) -> torch.Tensor:
    text = DATA.read_text(encoding="utf-8-sig") if DATA.exists() else "It is a truth universally acknowledged. " * 4000
    return tokenizer(text[20000 + offset :], return_tensors="pt").input_ids[:, :tokens]


class FirstToken(BaseStreamer):
    """Notes the time generate() emits its first new token (the first `put` is the prompt)."""

    def __init__(self, sync: bool):
        self.puts, self.at, self.sync = 0, None, sync

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.at is None:
            if self.sync:
                torch.cuda.synchronize()
            self.at = time.perf_counter()

    def end(self):
        pass


def ttft(model, prompts, **kwargs) -> float:
    """Median time to first token over `prompts` (a list; repeat one prompt to time it several times).

    The time runs from the generate() call to the streamer receiving the first new token, so the prefix cache's
    writes after generation (off the critical path of the first token) are not counted; generate gets 2 new tokens
    so the first one is streamed before it returns.
    """
    times = []
    for ids in prompts:
        streamer = FirstToken(ids.device.type == "cuda")
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, streamer=streamer, **kwargs)
        times.append(streamer.at - start)
    return statistics.median(times)


def cpu_tables(args) -> None:
    model, tokenizer = load_embedded_model(torch.float32)
    prompt = text_ids(tokenizer, args.tokens)
    shared = prompt[:, : args.shared]
    # a new question each run: a partial hit must not turn into a full hit on the next repeat
    partial = [
        torch.cat([shared, text_ids(tokenizer, args.tokens - args.shared, offset=50000 + 3000 * i)], dim=1)
        for i in range(args.repeats)
    ]
    same = [prompt] * args.repeats
    with tempfile.TemporaryDirectory() as folder:
        cache = PrefixCache(folder, chunk_tokens=args.chunk_tokens, ram_bytes=4 << 30)
        model.generate(prompt, max_new_tokens=1, prefix_cache=cache)  # store the prompt's chunks
        none = ttft(model, same)
        ram = ttft(model, same, prefix_cache=cache)
        disk = ttft(model, same, prefix_cache=PrefixCache(folder, chunk_tokens=args.chunk_tokens, ram_bytes=0))
        none_partial = ttft(model, partial)
        part = ttft(model, partial, prefix_cache=cache)
        stats = cache.stats()
    threads = torch.get_num_threads()
    print(f"\nTime to first token, SmolLM2-135M fp32, CPU ({threads} threads), median of {args.repeats}")
    print(f"{'case':<52}{'TTFT ms':>10}{'speed-up':>10}")
    rows = [
        (f"no cache, {prompt.shape[1]}-token prompt", none, none),
        ("full hit, RAM tier", ram, none),
        ("full hit, disk tier (page cache warm)", disk, none),
        (f"no cache, {partial[0].shape[1]}-token prompt (partial case)", none_partial, none_partial),
        (f"partial hit: {args.shared} shared + {partial[0].shape[1] - args.shared} new tokens", part, none_partial),
    ]
    for name, seconds, base in rows:
        print(f"{name:<52}{seconds * 1e3:>10.1f}{base / seconds:>9.1f}x")
    print(f"goal: full hit >= 20x faster than no cache -> RAM {none / ram:.1f}x, disk {none / disk:.1f}x")
    print(f"K/V bytes per token: {kv_bytes_per_token(model):,}; prefix entries on disk: {stats['entries']}")

    with tempfile.TemporaryDirectory() as folder:
        inference = InferenceCache(folder)
        short = prompt[:, :32]
        model.generate(short, max_new_tokens=8, do_sample=False, inference_cache=inference)
        times = []
        for _ in range(1000):
            start = time.perf_counter()
            model.generate(short, max_new_tokens=8, do_sample=False, inference_cache=inference)
            times.append(time.perf_counter() - start)
        times.sort()
        print("\nInference cache hit latency (identical request, tokenization excluded), 1,000 hits")
        print(f"p50 {times[500] * 1e3:.3f} ms   p99 {times[990] * 1e3:.3f} ms   (goal p50 < 1 ms)")


def disk_read_bandwidth(folder: str, nbytes: int) -> float:
    path = os.path.join(folder, "probe.bin")
    nbytes = max(1, nbytes >> 20) << 20  # whole MiB, at least one
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (nbytes >> 20))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    while os.read(fd, 1 << 24):
        pass
    seconds = time.perf_counter() - start
    os.close(fd)
    os.remove(path)
    return nbytes / seconds


LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
)  # fmt: skip


def gpu_loads(args, shape: dict | None = None) -> dict:
    """Seconds to first token per tier vs recompute, and the bandwidths they compare with (the GPU table's data).

    `shape` is a `LlamaConfig` (default: Llama-3.2-1B's shapes); the model is bf16 with random weights.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(shape or LLAMA_1B))
    device = torch.device(args.gpu_device)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (1, args.gpu_tokens + 1), device=device)
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as folder:
        cache = PrefixCache(
            folder, chunk_tokens=args.chunk_tokens, ram_bytes=8 << 30, disk_bytes=32 << 30, cost_check=False
        )
        model.generate(ids, max_new_tokens=1, prefix_cache=cache)
        nbytes = cache.stats()["bytes_stored"]
        recompute = ttft(model, [ids] * args.repeats)
        ram = ttft(model, [ids] * args.repeats, prefix_cache=cache)
        disk_cache = PrefixCache(folder, chunk_tokens=args.chunk_tokens, ram_bytes=0, cost_check=False)
        for path in Path(folder, "entries").rglob("*.val"):  # drop the entries from the page cache
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        disk = ttft(model, [ids], prefix_cache=disk_cache)
        cuda = device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8)
        host = host.pin_memory() if cuda else host
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        for _ in range(2):  # the first copy pays for lazy initialization
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            target.copy_(host, non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize()
            h2d = nbytes / (time.perf_counter() - start)
        disk_bw = disk_read_bandwidth(folder, min(nbytes, 1 << 30))
    one_token = ttft(model, [ids[:, :1]] * args.repeats)
    return dict(bytes=nbytes, recompute=recompute, ram=ram, disk=disk, one_token=one_token, h2d=h2d, disk_bw=disk_bw)


def gpu_table(args) -> None:
    r = gpu_loads(args)
    nbytes, recompute = r["bytes"], r["recompute"]
    name = torch.cuda.get_device_name() if args.gpu_device.startswith("cuda") else "CPU (smoke run)"
    print(f"\nLlama-3.2-1B-shaped bf16, {args.gpu_tokens}-token prefix ({nbytes / 1e6:.0f} MB of K/V), {name}")
    print(f"{'case':<40}{'TTFT ms':>10}{'load GB/s':>12}{'tier GB/s':>12}{'of tier':>9}")
    print(f"{'recompute (no cache)':<40}{recompute * 1e3:>10.1f}")
    for name, seconds, tier in (
        ("RAM tier (pinned) hit", r["ram"], r["h2d"]),
        ("disk tier hit (page cache dropped)", r["disk"], r["disk_bw"]),
    ):
        rate = nbytes / max(seconds - r["one_token"], 1e-6)
        print(f"{name:<40}{seconds * 1e3:>10.1f}{rate / 1e9:>12.2f}{tier / 1e9:>12.2f}{rate / tier:>8.0%}")
    print("goal: >= 50% of the tier's bandwidth (load time = hit TTFT - one-token forward)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default: %(default)s)")
    parser.add_argument(
        "--shared", type=int, default=1792, help="shared prefix of the partial hit (default: %(default)s)"
    )
    parser.add_argument("--chunk-tokens", type=int, default=256, help="PrefixCache chunk_tokens (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per figure, median reported (default: %(default)s)"
    )
    parser.add_argument("--gpu", action="store_true", help="also run the GPU table (needs CUDA)")
    parser.add_argument("--gpu-tokens", type=int, default=8192, help="GPU prefix tokens (default: %(default)s)")
    parser.add_argument("--gpu-device", default="cuda", help="device of the GPU table (default: %(default)s)")
    parser.add_argument("--disk-dir", default=None, help="folder for the GPU disk tier (default: the temp folder)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU table")
    args = parser.parse_args()
    if not args.skip_cpu:
        cpu_tables(args)
    if args.gpu:
        if args.gpu_device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device (or --gpu-device cpu for a smoke run)")
        gpu_table(args)


if __name__ == "__main__":
    main()
