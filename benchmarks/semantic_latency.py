"""Semantic cache lookup latency at 10K and 100K entries: the ANN search alone, and end to end with embedding.

    .venv/bin/python benchmarks/semantic_latency.py                 # 10,000 and 100,000 entries
    .venv/bin/python benchmarks/semantic_latency.py --sizes 10000   # quicker
    .venv/bin/python benchmarks/semantic_latency.py --dtype float32 # as on a CPU without native bfloat16

The index is filled with the MiniLM embeddings of `--real` sentences of the shared data (LLM queries and PAWS) and,
past those, with random unit vectors (a denser space than real queries: a conservative stand-in for the search).
Queries are embeddings of held-out sentences. "ANN" is `index.knn_query` for the `candidates` nearest neighbours at
the cache's default `ef`; "end to end" adds embedding the query text with MiniLM on the CPU, the look-alike guard
on the candidates above the threshold and reading the answer of the best one from the store: what `SemanticCache.get`
does besides decoding the prompt. Each is timed twice: wall clock (what a caller waits, including time the process
spends descheduled on a busy machine) and the CPU time of the calling thread (the work itself: the search and, with
the default `--threads 1`, MiniLM run in it). `recall@k` is the share of the exact `candidates` nearest neighbours
(brute force) that the ANN search returns. Goal: ANN p99 < 2 ms at 100K entries.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_neuralcache.semantic import MiniLMEmbedder, PairClassifier
from hf_neuralcache.semantic.cache import SemanticCache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sentences() -> list[str]:
    texts = []
    for name, columns in (("llm_query_pairs_dev.tsv", (1, 2)), ("paws_wiki_dev.tsv", (1, 2))):
        path = DATA / name
        if not path.exists():
            continue
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        texts += [row[c].strip() for row in rows for c in columns if len(row) > max(columns)]
    return list(dict.fromkeys(t for t in texts if t)) or [f"question number {i} about caches" for i in range(2000)]


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return times[len(times) // 2] * 1e3, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3


def timed(fn, wall: list[float], cpu: list[float]):
    w, c = time.perf_counter(), time.thread_time()
    out = fn()
    cpu.append(time.thread_time() - c)
    wall.append(time.perf_counter() - w)
    return out


class RandomEmbedder:
    """Random unit vectors (stand-ins: opening a folder does not embed anything that was stored)."""

    dim, fingerprint = 384, "random-384"

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def encode(self, texts):
        vectors = self.rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def reopen(count: int) -> None:
    """Store `count` answers through `put`, then time opening the folder with its saved index and without it."""
    from transformers import GenerationConfig

    from hf_neuralcache.hooks.generate import Request
    from hf_neuralcache.models import tiny_model

    class Words:
        all_special_tokens: list[str] = []

        def decode(self, ids):
            return " ".join(f"w{int(i)}" for i in ids)

    model, config = tiny_model("llama"), GenerationConfig(max_new_tokens=4, do_sample=False)
    with tempfile.TemporaryDirectory() as folder:
        cache = SemanticCache(folder, embedder=RandomEmbedder(), tokenizer=Words(), max_entries=count + 1)
        start = time.perf_counter()
        for n in range(count):
            ids = torch.tensor([[7, 3 + n % 200, 3 + n // 200 % 200, 3 + n // 40000]])
            request = Request(ids, torch.ones_like(ids), config, None, None)
            cache.put(model, request, torch.cat([ids, ids], dim=1), seconds=0.1)
        stored = time.perf_counter() - start
        cache.close()
        start = time.perf_counter()
        again = SemanticCache(folder, embedder=RandomEmbedder(), tokenizer=Words())
        with_index = time.perf_counter() - start
        assert again.stats()["entries"] == count
        again.close()
        Path(folder, "index.bin").unlink()
        start = time.perf_counter()
        SemanticCache(folder, embedder=RandomEmbedder(), tokenizer=Words())
        rebuilt = time.perf_counter() - start
    print(f"{count:,} answers: stored in {stored:.1f} s ({stored / count * 1e3:.2f} ms each); opening the folder "
          f"takes {with_index:.2f} s with the saved index, {rebuilt:.2f} s rebuilding it from the answers")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="entries (default: %(default)s)"
    )
    parser.add_argument("--queries", type=int, default=1000, help="lookups timed per size (default: %(default)s)")
    parser.add_argument("--real", type=int, default=2000, help="real sentences in the index (default: %(default)s)")
    parser.add_argument("--reopen", type=int, default=0, help="also time opening a folder of N answers (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for MiniLM (default: %(default)s)")
    parser.add_argument("--guard", default="classifier", help="the cache's guard (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="MiniLM's and the classifier's dtype (default: %(default)s; "
                        "'float32' is what a CPU without native bfloat16 runs)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.reopen:
        reopen(args.reopen)
        return

    with tempfile.TemporaryDirectory() as folder:
        embedder = MiniLMEmbedder(dtype=args.dtype)
        guard = PairClassifier(dtype=args.dtype) if args.guard == "classifier" else args.guard
        cache = SemanticCache(folder, embedder=embedder, max_entries=max(args.sizes) + 1, guard=guard)
        texts = sentences()
        queries, fill_texts = texts[: args.queries], texts[args.queries : args.queries + args.real]
        start = time.perf_counter()
        real = cache.embedder.encode(fill_texts)
        query_vectors = cache.embedder.encode(queries)
        print(f"embedded {len(fill_texts) + len(queries):,} sentences in {time.perf_counter() - start:.1f} s")
        # real answers in the store, so the end-to-end path reads entries as `get` does: one per real sentence
        # (with its word-piece states when the guard keeps them, see EquivalenceCheck.summary), one for the rest
        cache.store.put("answer", {"new_tokens": torch.arange(16).reshape(1, 16)}, {"output": "tensor"})
        start = time.perf_counter()
        for label, text in enumerate(fill_texts[: len(real)]):
            tensors = {"new_tokens": torch.arange(16).reshape(1, 16), "embedding": torch.from_numpy(real[label])}
            meta = {"output": "tensor", "request": text, "embedder": cache.embedder.fingerprint}
            if cache._summaries:
                pieces, states = cache.guard.summary(text)
                tensors["equivalence_states"], meta["equivalence_pieces"] = torch.from_numpy(states), pieces
            cache.store.put(f"answer-{label}", tensors, meta)
        print(f"stored {len(real):,} answers in {time.perf_counter() - start:.1f} s")
        cache.guard.check(queries[0], fill_texts[0])  # load what the guard loads on first use (lexicon, model)
        rng = np.random.default_rng(0)
        columns = ["build s", "recall@k", *(f"{what} {q}" for what in ("ANN", "ANN cpu", "e2e", "e2e cpu")
                                               for q in ("p50", "p99"))]  # fmt: skip
        print(f"\n{'entries':>9}" + "".join(f"{c:>12}" for c in columns) + "   (milliseconds)")
        added, stored = 0, np.zeros((max(args.sizes), cache.embedder.dim), dtype=np.float32)
        for size in sorted(args.sizes):
            start = time.perf_counter()
            while added < size:
                batch = min(size - added, 5000)
                if added < len(real):
                    vectors = real[added : added + batch]
                else:
                    vectors = rng.standard_normal((batch, cache.embedder.dim)).astype(np.float32)
                    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                labels = list(range(added, added + len(vectors)))
                cache.index.add(labels, vectors)
                stored[added : added + len(vectors)] = vectors
                for label in labels:  # the real sentences' own texts, so the guard judges real candidates
                    if label < len(real):
                        cache._labels[label] = {"key": f"answer-{label}", "context": "", "request": fill_texts[label]}
                    else:
                        cache._labels[label] = {"key": "answer", "context": "", "request": "a stored request"}
                added += len(vectors)
            build = time.perf_counter() - start
            ann, ann_cpu, e2e, e2e_cpu, found = [], [], [], [], 0
            for text, vector in zip(queries, query_vectors, strict=True):
                got = timed(lambda v=vector: cache.index.search(v, cache.candidates), ann, ann_cpu)
                exact = np.argpartition(-(stored[:size] @ vector), cache.candidates)[: cache.candidates]
                found += len({label for label, _ in got} & set(exact.tolist()))

                def lookup(text=text):
                    found = cache.index.search(cache.embedder.encode([text])[0], cache.candidates)
                    for checks, (label, similarity) in enumerate(found):
                        if similarity < cache.threshold or (cache.guard_checks is not None
                                                            and checks >= cache.guard_checks):  # fmt: skip
                            break
                        record = cache._labels[label]
                        if cache._summaries:  # as SemanticCache.get: the entry first, then the check with its states
                            entry = cache.store.get(record["key"])
                            summary = cache._summary(entry, record)
                            verdict = cache.guard.check(text, record["request"], summary, similarity)
                        else:
                            verdict = cache.guard.check(text, record["request"])
                        if verdict.ok:
                            entry = entry if cache._summaries else cache.store.get(record["key"])
                            break

                timed(lookup, e2e, e2e_cpu)
            recall = found / (len(queries) * cache.candidates)
            figures = (*percentiles(ann), *percentiles(ann_cpu), *percentiles(e2e), *percentiles(e2e_cpu))
            print(f"{size:>9,}{build:>12.1f}{recall:>12.3f}" + "".join(f"{v:>12.3f}" for v in figures))
        print(f"\nhnswlib M={cache.index.M}, ef_construction={cache.index.ef_construction}, ef={cache.index.ef}, "
              f"k={cache.candidates}, dim={cache.embedder.dim}, guard {args.guard!r}, {embedder.dtype}; "
              "goal: ANN p99 < 2 ms at 100K")  # fmt: skip


if __name__ == "__main__":
    main()
