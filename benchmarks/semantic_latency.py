"""Semantic cache lookup latency at 10K and 100K entries: the ANN search alone, and end to end with embedding.

    python benchmarks/semantic_latency.py                 # 10,000 and 100,000 entries
    python benchmarks/semantic_latency.py --sizes 10000   # quicker

The index is filled with the MiniLM embeddings of the shared data's sentences (LLM queries and PAWS, about 17K) and,
past those, with random unit vectors (a denser space than real queries: a conservative stand-in for the search).
Queries are embeddings of held-out sentences. "ANN" is `index.knn_query` for the `candidates` nearest neighbours at
the cache's default `ef`; "end to end" adds embedding the query text with MiniLM on the CPU, the look-alike guard
on the candidates above the threshold and reading the answer of the best one from the store: what `SemanticCache.get`
does besides decoding the prompt. Goal: ANN p99 < 2 ms at 100K entries.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="entries (default: %(default)s)"
    )
    parser.add_argument("--queries", type=int, default=1000, help="lookups timed per size (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as folder:
        cache = SemanticCache(folder, max_entries=max(args.sizes) + 1)
        texts = sentences()
        queries, fill_texts = texts[: args.queries], texts[args.queries :]
        start = time.perf_counter()
        real = cache.embedder.encode(fill_texts)
        query_vectors = cache.embedder.encode(queries)
        print(f"embedded {len(fill_texts) + len(queries):,} sentences in {time.perf_counter() - start:.1f} s")
        # one real answer in the store, so the end-to-end path reads an entry
        cache.store.put("answer", {"new_tokens": torch.arange(16).reshape(1, 16)}, {"output": "tensor"})
        rng = np.random.default_rng(0)
        print(f"\n{'entries':>9}{'build s':>9}{'ANN p50 ms':>12}{'ANN p99 ms':>12}{'e2e p50 ms':>12}{'e2e p99 ms':>12}")
        added = 0
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
                for label in labels:
                    cache._labels[label] = {"key": "answer", "context": "", "request": "a stored request"}
                added += len(vectors)
            build = time.perf_counter() - start
            ann, e2e = [], []
            for text, vector in zip(queries, query_vectors, strict=True):
                t0 = time.perf_counter()
                cache.index.search(vector, cache.candidates)
                ann.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for label, similarity in cache.index.search(cache.embedder.encode([text])[0], cache.candidates):
                    if similarity >= cache.threshold and cache.guard.check(text, cache._labels[label]["request"]).ok:
                        break
                cache.store.get("answer")
                e2e.append(time.perf_counter() - t0)
            print(f"{size:>9,}{build:>9.1f}" + "".join(f"{v:>12.3f}" for v in (*percentiles(ann), *percentiles(e2e))))
        print(f"\nhnswlib M={cache.index.M}, ef_construction={cache.index.ef_construction}, ef={cache.index.ef}, "
              f"k={cache.candidates}, dim={cache.embedder.dim}; goal: ANN p99 < 2 ms at 100K")  # fmt: skip


if __name__ == "__main__":
    main()
