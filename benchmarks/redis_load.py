"""Redis remote tier under load: 4 processes on 2 "hosts" sharing one Redis, with the server killed or paused mid-run.

    python benchmarks/redis_load.py                      # embedded SmolLM2-135M fp32, 4 x 200 requests per scenario
    python benchmarks/redis_load.py --model tiny --requests 20     # a tiny random llama, < 1 min (the test's mode)

Setup. The script starts its own `redis-server` on a free loopback port (needs `redis-server` on the PATH and the
`redis` client). Four worker processes (one torch thread each) form two "hosts": each host is one local cache folder
shared by its two processes; the hosts share nothing but Redis. Every process runs `generate()` with an
`InferenceCache` and a `PrefixCache` (`chunk_tokens=32`, `cost_check=False` so every cached chunk is loaded and the
remote path is exercised), both with `remote=` the server's URL. Each draws `--requests` prompts (seeded, with
replacement; the same draws in every scenario) from one pool of `--systems` system prompts x `--questions`
questions, so requests repeat exactly (inference cache hits) and share system prompts (prefix cache hits), within a
process, a host and across hosts.

Correctness. Before the scenarios the workers compute each pool prompt's reference with plain `generate()` (no cache,
greedy, the same process setup); a request whose output tokens differ from its reference is a *wrong output*, an
exception out of `generate()` an *error*.

Scenarios (each on an empty Redis and empty local folders):
- `normal`: no fault;
- `kill+restart`: after `--fault-after` of all requests are done, the parent SIGKILLs the server, waits
  `--down-seconds`, and starts it again on the same port (empty: no persistence);
- `pause`: at the same point the parent SIGSTOPs the server for `--pause-seconds` (connections hang: the worst
  case for timeouts), then SIGCONTs it.

Figures per scenario:
- request latency p50 / p99 / max over all requests of all processes (wall time of the `generate()` call);
- *worst added latency* = this scenario's max latency minus the `normal` scenario's p99 (on a busy machine the
  compute time of a miss varies by more than a fault adds, so this figure can be negative);
- *max during fault*: the slowest of the requests that ran at some point between the fault's start and its end
  (server restarted or resumed), and how many there were;
- *Redis wait* = the time one request spent inside Redis commands on its own thread (the background writers
  excluded; p99 and max over requests), measured by timing each `RedisTier.call`: the latency a slow or failing
  server adds to a request, without the compute noise;
- hit rates: inference hits / requests, prefix hits (full or partial) / prefix lookups (the inference misses), and
  the share of the entries loaded that came from Redis rather than the host's RAM or disk (by the `tier` of each
  entry the stores return);
- `storage_errors`, `integrity_errors` and `skipped`: the caches' `stats()` summed over processes.
The JSON (every figure, the slowest requests, the fault's time) goes to `benchmarks/out/redis_load.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
HOSTS, PER_HOST = 2, 2
SCENARIOS = ("normal", "kill+restart", "pause")

SYSTEMS = [
    "You are a concise assistant for a hardware store. Answer in one sentence, name the aisle, never promise "
    "delivery dates, and suggest a cheaper alternative when there is one. Tools are in aisles 1 to 4, paint in 5.",
    "You are a travel desk agent for a small airline. Be brief and polite, quote fares only in euros, never invent "
    "flight numbers, and remind travellers that cabin bags may weigh at most eight kilograms.",
    "You are a cooking tutor for beginners. Give one practical tip per answer, prefer cheap ingredients, mention "
    "food safety when meat or eggs are involved, and keep every answer shorter than forty words.",
    "You are a support agent for a note-taking app. Answer in plain words, point to the Settings menu when it "
    "helps, never ask for passwords, and say when a feature only exists in the desktop version.",
]
QUESTIONS = [
    "Where are the hammers?", "Do you sell paint?", "How do I start?", "What should I try first?",
    "Can you help me with a problem?", "What is the cheapest option?", "How long does it take?",
    "Is this safe for children?", "What do I need to bring?", "Can I change my mind later?",
    "What is the most common mistake?", "Which one do you recommend?", "How do I fix a broken one?",
    "Is there a simpler way?", "What happens if I forget?", "Can I do this alone?", "How often should I do it?",
    "What is included in the price?", "Where can I read more?", "What is the best time for this?",
    "Do I need any experience?", "How do I cancel?", "What if it does not work?", "Can you explain that again?",
]  # fmt: skip


def redis_server_class():
    """`RedisServer` of tests/redis_helpers.py (start, kill, restart, pause, resume), loaded from its file."""
    spec = importlib.util.spec_from_file_location("redis_helpers", ROOT / "tests" / "redis_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


def load(model_name: str):
    import torch

    from hf_neuralcache.models import load_embedded_model, tiny_model

    torch.set_num_threads(1)
    if model_name == "tiny":
        return tiny_model("llama"), None
    return load_embedded_model(torch.float32)


def pool(tokenizer, vocab: int, systems: int, questions: int) -> list[list[int]]:
    """The prompts' token ids: every system prompt with every question (random ids for the tiny model)."""
    import torch

    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        heads = [torch.randint(3, vocab, (96,), generator=gen).tolist() for _ in range(systems)]
        tails = [torch.randint(3, vocab, (12,), generator=gen).tolist() for _ in range(questions)]
        return [head + tail for head in heads for tail in tails]
    rows = []
    for system in (SYSTEMS * (1 + systems // len(SYSTEMS)))[:systems]:
        for question in (QUESTIONS * (1 + questions // len(QUESTIONS)))[:questions]:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            rows.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"][0].tolist())  # fmt: skip
    return rows


class RedisWait:
    """Seconds the calling (request) thread spends inside a `RedisTier`'s commands, by wrapping its `call`."""

    def __init__(self, thread: threading.Thread):
        self.thread, self.seconds = thread, 0.0

    def wrap(self, tier) -> None:
        inner = tier.call

        def call(op, fn, *args, **kwargs):
            if threading.current_thread() is not self.thread:
                return inner(op, fn, *args, **kwargs)  # the background writer: off the request's path
            start = time.perf_counter()
            try:
                return inner(op, fn, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        tier.call = call


def count_tiers(store, tally: Counter) -> None:
    """Count the tier (`ram`, `disk`, `redis`) of every entry `store` returns."""
    inner = store.get

    def get(key, *args, **kwargs):
        entry = inner(key, *args, **kwargs)
        if entry is not None:
            tally[f"{store.kind}_{entry.tier}"] += 1
        return entry

    store.get = get


def worker(wid: int, args, commands, results, progress, starts) -> None:
    import torch

    from hf_neuralcache import InferenceCache, PrefixCache

    model, tokenizer = load(args.model)
    prompts = pool(tokenizer, model.config.vocab_size, args.systems, args.questions)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    if tokenizer is None:
        gen["min_new_tokens"] = args.new_tokens  # a random model may emit EOS at any point
    refs = {}
    with torch.inference_mode():
        for index in range(wid, len(prompts), HOSTS * PER_HOST):
            ids = torch.tensor([prompts[index]])
            refs[index] = model.generate(ids, **gen)[0, ids.shape[1] :].tolist()
    results.put(("refs", wid, refs))
    while (command := commands.get()) is not None:
        url, folder, order, references, scenario = command
        inference = InferenceCache(Path(folder, "inference"), tokenizer=tokenizer, remote=url)
        prefix = PrefixCache(Path(folder, "prefix"), chunk_tokens=32, cost_check=False, remote=url)
        waits, tiers = RedisWait(threading.current_thread()), Counter()
        for cache in (inference, prefix):
            waits.wrap(cache.store.remote)
            count_tiers(cache.store, tiers)
        results.put(("ready", wid, None))
        starts[scenario].wait()
        records = []
        for index in order:
            ids = torch.tensor([prompts[index]])
            before = (inference.counters.values["hits"], prefix.counters.values["hits"],
                      prefix.counters.values["partial_hits"])  # fmt: skip
            waits.seconds, error, out = 0.0, None, None
            began = time.time()
            tick = time.perf_counter()
            try:
                with torch.inference_mode():
                    out = model.generate(ids, inference_cache=inference, prefix_cache=prefix, **gen)
            except Exception as err:  # noqa: BLE001 - an error is a measured outcome
                error = f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - tick
            wrong = out is not None and out[0, ids.shape[1] :].tolist() != references[index]
            records.append(dict(
                at=began, seconds=seconds, redis_wait=waits.seconds, error=error, wrong=wrong,
                inference_hit=inference.counters.values["hits"] > before[0],
                prefix_hit=prefix.counters.values["hits"] + prefix.counters.values["partial_hits"] > sum(before[1:]),
            ))  # fmt: skip
            with progress.get_lock():
                progress.value += 1
        stats = {"inference": inference.stats(), "prefix": prefix.stats()}
        for cache in (inference, prefix):
            cache.close()  # waits (at most 5 s) for the background writers
        results.put(("done", wid, dict(records=records, tiers=dict(tiers), stats=stats)))


def collect(results, kind: str, count: int) -> dict:
    got = {}
    while len(got) < count:
        what, wid, payload = results.get(timeout=1800)
        if what != kind:
            raise RuntimeError(f"worker {wid} sent {what!r}, expected {kind!r}")
        got[wid] = payload
    return got


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_scenario(name, args, server, workers, refs, start, progress, root: Path) -> dict:
    total = args.requests * len(workers)
    rng = random.Random(args.seed)  # the same draws in every scenario: their figures compare
    folders = [root / name.replace(" ", "_").replace("+", "_") / f"host{h}" for h in range(HOSTS)]
    for wid, (_, commands, _) in enumerate(workers):
        order = [rng.randrange(len(refs)) for _ in range(args.requests)]
        commands.put((server.url, str(folders[wid // PER_HOST]), order, refs, SCENARIOS.index(name)))
    collect(workers[0][2], "ready", len(workers))
    progress.value = 0
    began = time.time()
    start.set()
    fault = None
    if name != "normal":
        while progress.value < args.fault_after * total:
            if not all(proc.is_alive() for proc, _, _ in workers):
                raise RuntimeError("a worker process died")
            time.sleep(0.01)
        fault = {"at": time.time() - began, "after_requests": progress.value}
        if name == "kill+restart":
            server.kill()
            time.sleep(args.down_seconds)
            server.start()
        else:
            server.pause()
            time.sleep(args.pause_seconds)
            server.resume()
        fault["seconds"] = time.time() - began - fault["at"]
    done = collect(workers[0][2], "done", len(workers))
    wall = time.time() - began
    records = [r for wid in sorted(done) for r in done[wid]["records"]]
    for r in records:
        r["at"] -= began  # seconds since the scenario's start
    tiers = Counter()
    stats = Counter()
    for payload in done.values():
        tiers.update(payload["tiers"])
        for kind, values in payload["stats"].items():
            for key in ("hits", "partial_hits", "misses", "storage_errors", "integrity_errors", "skipped"):
                stats[f"{kind}_{key}"] += values.get(key, 0)
    latencies = [r["seconds"] for r in records]
    during = []  # requests running at some point while the server was away or paused
    if fault is not None:
        end = fault["at"] + fault["seconds"]
        during = [r for r in records if r["at"] <= end and r["at"] + r["seconds"] >= fault["at"]]
    misses = sum(not r["inference_hit"] for r in records)

    def share(kind):
        loaded = sum(v for k, v in tiers.items() if k.startswith(f"{kind}_"))
        return tiers[f"{kind}_redis"] / loaded if loaded else 0.0

    return dict(
        scenario=name, requests=len(records), errors=sum(r["error"] is not None for r in records),
        error_examples=sorted({r["error"] for r in records if r["error"]})[:5],
        wrong=sum(r["wrong"] for r in records), wall_seconds=wall, fault=fault,
        inference_hit_rate=sum(r["inference_hit"] for r in records) / len(records),
        prefix_hit_rate=sum(r["prefix_hit"] for r in records) / misses if misses else 0.0,
        inference_redis_share=share("inference"), prefix_redis_share=share("prefix"), tiers=dict(tiers),
        p50=percentile(latencies, 0.5), p99=percentile(latencies, 0.99), max=max(latencies),
        during_fault=len(during), during_fault_max=max((r["seconds"] for r in during), default=None),
        redis_wait_p99=percentile([r["redis_wait"] for r in records], 0.99),
        max_redis_wait=max(r["redis_wait"] for r in records), stats=dict(stats),
        slowest=sorted(records, key=lambda r: -r["seconds"])[:3],
    )  # fmt: skip


def table(rows: list[dict]) -> str:
    base = rows[0]["p99"]
    lines = [
        "| scenario | requests | errors | wrong | inference hits | prefix hits | from Redis (inf / prefix) | p50 ms "
        "| p99 ms | max ms | worst added ms | max ms during fault (requests) | Redis wait p99 / max ms "
        "| storage / integrity errors / skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["stats"]
        errors = " / ".join(str(s[f"inference_{name}"] + s[f"prefix_{name}"])
                            for name in ("storage_errors", "integrity_errors", "skipped"))  # fmt: skip
        added = "-" if r["fault"] is None else f"{(r['max'] - base) * 1e3:.0f}"
        during = "-" if not r["during_fault"] else f"{r['during_fault_max'] * 1e3:.1f} ({r['during_fault']})"
        lines.append(
            f"| {r['scenario']} | {r['requests']} | {r['errors']} | {r['wrong']} | {r['inference_hit_rate']:.1%} "
            f"| {r['prefix_hit_rate']:.1%} | {r['inference_redis_share']:.1%} / {r['prefix_redis_share']:.1%} "
            f"| {r['p50'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} | {r['max'] * 1e3:.1f} | {added} | {during} "
            f"| {r['redis_wait_p99'] * 1e3:.1f} / {r['max_redis_wait'] * 1e3:.1f} | {errors} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2", help="(default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests per process (default: %(default)s)")
    parser.add_argument("--systems", type=int, default=4, help="system prompts in the pool (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=24, help="questions per system (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=6, help="max_new_tokens (default: %(default)s)")
    parser.add_argument("--fault-after", type=float, default=0.3,
                        help="fraction of all requests done when the fault starts (default: %(default)s)")  # fmt: skip
    parser.add_argument("--down-seconds", type=float, default=2.0, help="kill to restart (default: %(default)s)")
    parser.add_argument("--pause-seconds", type=float, default=5.0, help="SIGSTOP to SIGCONT (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request draws (default: %(default)s)")
    parser.add_argument("--out", default=str(OUT / "redis_load.json"), help="JSON output (default: %(default)s)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    if not set(scenarios) <= set(SCENARIOS) or scenarios[0] != "normal":
        parser.error(f"--scenarios: a comma-separated list starting with normal (the baseline), out of "
                     f"{', '.join(SCENARIOS)}; got {args.scenarios!r}")
    if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
        print("needs redis-server on the PATH (apt-get install redis-server) and pip install 'hf-neuralcache[redis]'")
        return 2

    ctx = mp.get_context("spawn")
    progress, results = ctx.Value("i", 0), ctx.Queue()
    starts = [ctx.Event() for _ in SCENARIOS]  # one per scenario: events travel only at process creation
    workers = []
    for wid in range(HOSTS * PER_HOST):
        commands = ctx.Queue()
        proc = ctx.Process(target=worker, args=(wid, args, commands, results, progress, starts), daemon=True)
        proc.start()
        workers.append((proc, commands, results))
    root = Path(tempfile.mkdtemp(prefix="redis-load-"))
    server = redis_server_class()(root / "redis")
    rows = []
    try:
        tick = time.time()
        refs = {}
        for part in collect(results, "refs", len(workers)).values():
            refs.update(part)
        refs = [refs[i] for i in range(len(refs))]
        print(f"{len(refs)} references in {time.time() - tick:.1f} s ({len(workers)} processes); Redis at {server.url}")
        for name in scenarios:
            if server.proc is None:
                server.start()
            server.client().flushall()
            rows.append(run_scenario(name, args, server, workers, refs, starts[SCENARIOS.index(name)], progress, root))
            r = rows[-1]
            print(f"{name}: {r['requests']} requests in {r['wall_seconds']:.1f} s, {r['errors']} errors, "
                  f"{r['wrong']} wrong, fault {r['fault']}")  # fmt: skip
    finally:
        for _, commands, _ in workers:
            commands.put(None)
        for proc, _, _ in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    model = "tiny random llama" if args.model == "tiny" else "SmolLM2-135M-Instruct fp32"
    print(f"\nRedis load: {model}, CPU ({os.cpu_count()} cores), {HOSTS} hosts x {PER_HOST} processes x "
          f"{args.requests} requests, pool {len(refs)} prompts, max_new_tokens {args.new_tokens}\n")  # fmt: skip
    print(table(rows))
    print("\nworst added = the scenario's max request latency - the normal run's p99 (compute noise included);\n"
          "Redis wait = time one request spent in Redis commands on its own thread (p99 and max over requests)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps(dict(config=config, model=model, scenarios=rows), indent=1))
    print(f"wrote {out}")
    return 0 if all(r["errors"] == 0 and r["wrong"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
