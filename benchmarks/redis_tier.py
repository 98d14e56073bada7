"""The Redis tier across two "hosts": time to first token from another host's prefill, transfer speed, hit latency.

    python benchmarks/redis_tier.py              # embedded SmolLM2-135M fp32, CPU, 2,048-token prompt
    python benchmarks/redis_tier.py --quick      # a 512-token prompt and fewer repeats (a smoke run)

The script starts its own `redis-server` on a free loopback port (no persistence) and plays two hosts, each with its
own local cache folder: host A is a separate process that prefills the prompt once through
`PrefixCache(folder_a, remote=url)` and waits for its background writes; host B (this process) then generates from
the same prompt with a fresh, empty local folder each repeat, so every chunk comes from Redis.

Table 1: host B's time to first token (generate() call to the first streamed token) vs recomputing the prefill,
median of `--repeats` (goal >= 10x), with the stored K/V in the model's dtype and, with `--remote-dtype`, half
precision (its logit error vs the exact run is printed).

Table 2: transfer speed of the same chunk values: a raw redis-py GET (same client settings as the tier, hiredis
parser when installed), `redis-benchmark` GETs of a value of the chunk's size, and the tier's own read of the chunks
(GET + checks, timed inside `TieredStore.get`). Goal: the tier at >= 50% of the raw GET.

Table 3 (in a fresh host-B process, as a server in its steady state; with `--pin` only this table, in this process,
with redis-server on a core of its own): hit latency of the inference cache on host B (no RAM tier): each of host
A's `--answers` answers read once from Redis (GET + checks; copied to the local folder in the background), then once
from that local copy; tokenization excluded, p50/p99. Then the semantic cache: host B opens with an empty folder and
catches up from the Redis stream; its hit latency on host A's questions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from prefix_cache import text_ids, ttft  # noqa: E402

from hf_neuralcache import InferenceCache, PrefixCache, SemanticCache  # noqa: E402
from hf_neuralcache.hooks.prefix import kv_bytes_per_token  # noqa: E402
from hf_neuralcache.models import load_embedded_model  # noqa: E402


def start_server(folder: Path):
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    from redis_helpers import RedisServer

    return RedisServer(folder)


def host_a(args) -> None:
    """Host A: prefill the prompt (and store one inference answer) through the Redis tier, then flush the writes."""
    model, tokenizer = load_embedded_model(torch.float32)
    prompt = text_ids(tokenizer, args.tokens)
    folder = tempfile.mkdtemp(prefix="host_a_")
    cache = PrefixCache(folder, chunk_tokens=args.chunk_tokens, remote=args.url, cost_check=False)
    model.generate(prompt, max_new_tokens=1, do_sample=False, prefix_cache=cache)
    half = PrefixCache(folder + "_bf16", chunk_tokens=args.chunk_tokens, remote=args.url, cost_check=False,
                       namespace="bf16", remote_dtype="bfloat16")  # fmt: skip
    model.generate(prompt, max_new_tokens=1, do_sample=False, prefix_cache=half)
    half.store.remote.flush(300)
    inference = InferenceCache(folder + "_inference", remote=args.url)
    for request in short_requests(prompt, args.answers):
        model.generate(request, max_new_tokens=8, do_sample=False, inference_cache=inference)
    semantic = SemanticCache(folder + "_semantic", remote=args.url, tokenizer=tokenizer)
    for question in questions(args.questions):
        model.generate(**chat(tokenizer, question), max_new_tokens=8, do_sample=False, semantic_cache=semantic)
    ok = cache.store.remote.flush(300) and inference.store.remote.flush(60) and semantic.store.remote.flush(60)
    print(json.dumps({"flushed": ok, "stored": cache.stats()["bytes_stored"], "semantic": semantic.stats()["entries"]}))


def short_requests(prompt: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` distinct 32-token requests (slices of the long prompt)."""
    return [prompt[:, 7 * i : 7 * i + 32] for i in range(count)]


def questions(count: int) -> list[str]:
    """`count` distinct user questions from the shared LLM-query pairs (or made-up ones without the data)."""
    from semantic_latency import sentences

    return sentences()[:count]


def chat(tokenizer, text: str) -> dict:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def timed_reads(store, keys) -> tuple[int, float]:
    """Bytes and seconds of reading `keys` through the store's remote path (fresh local tiers: every read is remote)."""
    nbytes, seconds = 0, 0.0
    for key in keys:
        begin = time.perf_counter()
        entry = store.get(key, defer_fill=True)  # as the prefix cache reads: copied locally after the request
        seconds += time.perf_counter() - begin
        assert entry is not None and entry.tier == "redis", key
        nbytes += entry.nbytes
    store.fill_deferred()
    store.settle()
    return nbytes, seconds


def hit_tables(args, work: Path, model, tokenizer, prompt: torch.Tensor) -> None:
    """Table 3: hit latency of the inference and semantic caches on host B."""
    # ---- table 3: inference cache remote-hit latency ----
    requests = short_requests(prompt, args.answers)
    remote_hits, local_hits = ([], []), ([], [])  # (wall, CPU time of the calling thread)
    for round_ in range(3):  # three rounds, each with an empty local folder, pooled: this machine's speed drifts
        cache = InferenceCache(work / f"inference_b{round_}", remote=args.url, ram_bytes=0)
        for times in (remote_hits, local_hits):  # each of host A's answers read from Redis once, then from disk
            for request in requests:
                begin, begin_cpu = time.perf_counter(), time.thread_time()
                model.generate(request, max_new_tokens=8, do_sample=False, inference_cache=cache)
                times[0].append(time.perf_counter() - begin)
                times[1].append(time.thread_time() - begin_cpu)
            cache.store.settle()  # every remote hit copied to the local folder before the local pass
        stats = cache.stats()
        assert stats["hits"] == 2 * len(requests), stats
        cache.close()
    print(f"\nInference cache hits on host B (no RAM tier), 3 rounds: each of host A's {len(requests)} answers read "
          "once from Redis (empty local folder), then once from the local copy; tokenization excluded, the per-call "
          "model check included. Wall clock, and the calling thread's CPU time")  # fmt: skip
    for name, (wall, cpu) in (("remote hit", remote_hits), ("local disk hit", local_hits)):
        wall.sort(), cpu.sort()
        p50, p99, c50 = wall[len(wall) // 2], wall[int(len(wall) * 0.99)], cpu[len(cpu) // 2]
        print(f"{name:<36} wall p50 {p50 * 1e3:.3f} ms   p99 {p99 * 1e3:.3f} ms   CPU p50 {c50 * 1e3:.3f} ms")
    print("goal: remote hit p50 < 2 ms")

    # ---- table 3b: the semantic cache across hosts ----
    asked = [chat(tokenizer, q) for q in questions(args.questions)]
    begin = time.perf_counter()
    semantic = SemanticCache(work / "semantic_b", remote=args.url, tokenizer=tokenizer)
    opened = time.perf_counter() - begin
    caught_up = semantic.stats()["entries"]
    times = []
    for _ in range(5):
        for inputs in asked:
            begin = time.perf_counter()
            model.generate(**inputs, max_new_tokens=8, do_sample=False, semantic_cache=semantic)
            times.append(time.perf_counter() - begin)
    hits = semantic.stats()["hits"]
    embed = []
    for q in questions(args.questions):
        begin = time.perf_counter()
        semantic.embedder.encode([q])
        embed.append(time.perf_counter() - begin)
    semantic.close()
    times.sort()
    embed.sort()
    print(
        f"\nSemantic cache on host B: opened with an empty folder, caught up {caught_up} answers from Redis in "
        f"{opened * 1e3:.0f} ms (host A stored {args.host_a['semantic']}: {args.questions} questions, paraphrase "
        f"pairs, the second of a pair a hit on host A); {len(times)} lookups of those questions: {hits} hits"
    )
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    print(f"hit latency p50 {p50 * 1e3:.2f} ms   p99 {p99 * 1e3:.2f} ms"
          f"   (of which MiniLM embedding of the query: p50 {embed[len(embed) // 2] * 1e3:.2f} ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="PrefixCache chunk_tokens (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default: %(default)s)")
    parser.add_argument("--answers", type=int, default=200, help="inference answers of host A (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=40, help="semantic answers of host A (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 repeats, 100 inference hits, 10 questions")
    parser.add_argument(
        "--pin", action="store_true",
        help="redis-server on the last CPU, this process (torch: one thread per CPU left) on the others, as a "
             "server with Redis on its own core would run; only the hit-latency tables (3)",
    )  # fmt: skip
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--host-a-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.questions, args.answers = 512, 2, 10, 40
    if args.role == "host-a":
        return host_a(args)
    if args.role == "hits":  # table 3 in a process of its own: a server's steady state, not the one after table 1
        args.host_a = json.loads(args.host_a_json)
        model, tokenizer = load_embedded_model(torch.float32)
        return hit_tables(args, Path(tempfile.mkdtemp(prefix="redis_tier_hits_")), model, tokenizer,
                          text_ids(tokenizer, args.tokens))  # fmt: skip

    import redis

    work = Path(tempfile.mkdtemp(prefix="redis_tier_"))
    server = start_server(work / "redis")
    try:
        args.url = server.url
        run = subprocess.run(
            [sys.executable, __file__, "--role", "host-a", "--url", args.url, "--tokens", str(args.tokens),
             "--chunk-tokens", str(args.chunk_tokens), "--questions", str(args.questions),
             "--answers", str(args.answers)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        print("host A:", run.stdout.strip().splitlines()[-1])
        args.host_a = json.loads(run.stdout.strip().splitlines()[-1])
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least 2 CPUs")
            subprocess.run(["taskset", "-pc", str(cpus[-1]), str(server.proc.pid)], check=True, capture_output=True)
            os.sched_setaffinity(0, set(cpus[:-1]))
            torch.set_num_threads(len(cpus) - 1)
            print(f"pinned: redis-server on CPU {cpus[-1]}, this process on CPUs {cpus[:-1]} "
                  f"({torch.get_num_threads()} torch threads)")  # fmt: skip
        model, tokenizer = load_embedded_model(torch.float32)
        prompt = text_ids(tokenizer, args.tokens)
        same = [prompt] * args.repeats

        if args.pin:
            return hit_tables(args, work, model, tokenizer, prompt)
        # ---- table 1: time to first token on host B ----
        none = ttft(model, same)
        remote_times = []
        for n in range(args.repeats):
            cache = PrefixCache(work / f"b{n}", chunk_tokens=args.chunk_tokens, remote=args.url, ram_bytes=0)
            remote_times.append(ttft(model, [prompt], prefix_cache=cache))
            stats = cache.stats()
            assert stats["hits"] == 1, stats
            cache.close()
        remote = statistics.median(remote_times)
        half_times = []
        for n in range(args.repeats):
            cache = PrefixCache(work / f"h{n}", chunk_tokens=args.chunk_tokens, remote=args.url, ram_bytes=0,
                                namespace="bf16")  # fmt: skip
            half_times.append(ttft(model, [prompt], prefix_cache=cache))
            cache.close()
        half = statistics.median(half_times)
        # the error of bf16 K/V: 16 greedy tokens and their logits, exact run vs from the bf16 entries
        settings = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
        exact = model.generate(prompt, **settings)
        cache = PrefixCache(work / "h_err", chunk_tokens=args.chunk_tokens, remote=args.url, namespace="bf16")
        lossy = model.generate(prompt, prefix_cache=cache, **settings)
        same_tokens = int((exact.sequences == lossy.sequences).all(dim=0).sum()) - prompt.shape[1]
        error = max((a - b).abs().max().item() for a, b in zip(exact.logits, lossy.logits, strict=True))
        scale = max(a.abs().max().item() for a in exact.logits)
        cache.close()
        threads = torch.get_num_threads()
        print(f"\nHost B's time to first token, SmolLM2-135M fp32, CPU ({threads} threads), median of {args.repeats}")
        print(f"{'case':<58}{'TTFT ms':>10}{'speed-up':>10}")
        print(f"{f'recompute (no cache), {prompt.shape[1]}-token prompt':<58}{none * 1e3:>10.1f}{1:>9.1f}x")
        print(f"{'from Redis (host A prefilled it; host B local folder empty)':<58}{remote * 1e3:>10.1f}"
              f"{none / remote:>9.1f}x")  # fmt: skip
        print(f"{'from Redis, K/V stored as bfloat16 (remote_dtype)':<58}{half * 1e3:>10.1f}{none / half:>9.1f}x")
        print(f"goal: >= 10x faster than recompute -> {none / remote:.1f}x exact, {none / half:.1f}x bfloat16")
        print(f"bfloat16 K/V error: {same_tokens}/16 greedy tokens identical, max |logit difference| {error:.4f} "
              f"(logits up to {scale:.1f})")  # fmt: skip

        # ---- table 2: transfer speed ----
        client = redis.Redis.from_url(args.url, socket_timeout=5)
        keys = sorted(k for k in client.scan_iter(match="hfnc:prefix::*"))  # the exact entries (no namespace)
        sizes = [client.strlen(k) for k in keys]
        chunk = max(sizes)
        # redis-benchmark GETs keys named key:__rand_int__ that it does not set for -t get: seed them
        client.set("key:__rand_int__", b"\0" * chunk)
        bench = subprocess.run(
            ["redis-benchmark", "-p", str(server.port), "-t", "get", "-d", str(chunk), "-n", "20", "-c", "1", "--csv"],
            capture_output=True, text=True,
        )  # fmt: skip
        bench_rate = None
        for line in bench.stdout.splitlines():
            cells = [c.strip('"') for c in line.split(",")]
            if cells and cells[0] == "GET":
                bench_rate = float(cells[1]) * chunk  # requests per second x bytes
        client.delete(*client.keys("key:*"))
        raw, tier_rates = [], []
        for n in range(args.repeats):  # raw and tier reads in turn, after the page cache's writes are flushed
            os.sync()
            begin = time.perf_counter()
            for k in keys:
                client.get(k)
            raw.append(time.perf_counter() - begin)
            cache = PrefixCache(work / f"t{n}", chunk_tokens=args.chunk_tokens, remote=args.url, ram_bytes=0)
            cache.store.use_model(keys[0].decode().split(":")[3])
            os.sync()
            nbytes, seconds = timed_reads(cache.store, [k.decode().rsplit(":", 1)[1] for k in keys])
            tier_rates.append(nbytes / seconds)
            cache.close()
        raw_rate = sum(sizes) / min(raw)
        tier_rate = max(tier_rates)
        print(f"\nTransfer of the {len(keys)} chunk values ({sum(sizes) / 1e6:.1f} MB, {chunk / 1e6:.1f} MB each), "
              f"best of {args.repeats}")  # fmt: skip
        print(f"{'path':<58}{'GB/s':>10}{'vs raw':>10}")
        print(f"{'raw redis-py GET (hiredis: ' + str(redis.utils.HIREDIS_AVAILABLE) + ')':<58}{raw_rate / 1e9:>10.2f}"
              f"{1:>9.2f}x")  # fmt: skip
        if bench_rate:
            name = "redis-benchmark GET, same value size"
            print(f"{name:<58}{bench_rate / 1e9:>10.2f}{bench_rate / raw_rate:>9.2f}x")
        print(f"{'tier read (GET + checksum + checks; local copy after)':<58}{tier_rate / 1e9:>10.2f}"
              f"{tier_rate / raw_rate:>9.2f}x")  # fmt: skip
        best = max(raw_rate, bench_rate or 0)
        print(f"goal: tier >= 50% of raw -> {tier_rate / raw_rate:.0%} of redis-py GET, {tier_rate / best:.0%} of "
              f"the best raw path")  # fmt: skip
        print(f"K/V bytes per token: {kv_bytes_per_token(model):,}")

        run = subprocess.run(
            [sys.executable, __file__, "--role", "hits", "--url", args.url, "--tokens", str(args.tokens),
             "--questions", str(args.questions), "--answers", str(args.answers),
             "--host-a-json", json.dumps(args.host_a)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("Loading")))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
