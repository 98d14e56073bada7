"""Out-of-sample report: the look-alike guard (with and without its WordNet synonyms) and the learned equivalence
check, on every labelled set.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/semantic_equivalence.py        # about 90 s on one core
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/semantic_equivalence.py --paws-limit 1000

Sets: `benchmarks/data/fresh_pairs_v10.tsv` (110 pairs written by a helper that had not read the guard, committed
before the last round of changes and run once after them: the out-of-sample test), `fresh_pairs_v9.tsv`,
`fresh_pairs_v8.tsv` and `fresh_pairs_v7.tsv` (the same for the rounds before), `fresh_pairs_v6.tsv` (the
out-of-sample test of `strict+learned`'s threshold), `fresh_pairs_v5.tsv`, `fresh_pairs_v4.tsv` and
`fresh_pairs_v3.tsv` (the out-of-sample tests of earlier versions; v3-v10 were all read after their run: development
sets now; a new round needs a new set),
`fresh_pairs_v2.tsv` (122 pairs; the learned check's test set, then read while the lexicon rules were developed),
`benchmarks/data/fresh_query_pairs.tsv` (the issue's 60 pairs), the shared `llm_query_pairs_dev.tsv` and the odd and
even rows of `paws_wiki_dev.tsv`. For each it prints precision, recall and predictions of: cosine >= 0.80 + the
strict guard (WordNet synonyms on), the same guard with `synonyms=False` (words matched by stem only), cosine >=
`--floor` + `EquivalenceCheck` at its shipped threshold, and cosine >= 0.80 + `guard="strict+learned"` (the default:
the strict guard, then the learned score at `STRICT_LEARNED_THRESHOLD`). Nothing here changes a setting: the
thresholds and the floor were fixed beforehand (see `equivalence.md` and docs/semantic_cache.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from hf_neuralcache.semantic import (
    DEFAULT_EQUIVALENCE_THRESHOLD,
    DEFAULT_THRESHOLD,
    STRICT_LEARNED_THRESHOLD,
    EquivalenceCheck,
    LookAlikeGuard,
    MiniLMEmbedder,
    load_pairs,
)
from hf_neuralcache.semantic.equivalence import DEFAULT_COSINE_FLOOR
from hf_neuralcache.semantic.lexicon import default_lexicon

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"


def rates(pred: np.ndarray, labels: np.ndarray) -> str:
    hits = int((pred & labels).sum())
    p = hits / pred.sum() if pred.sum() else float("nan")
    return f"P {p:.3f}  R {hits / labels.sum():.3f}  ({int(pred.sum())} predicted, {hits} right)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paws-limit", type=int, default=None)
    parser.add_argument("--floor", type=float, default=DEFAULT_COSINE_FLOOR, help="cosine floor of the new check")
    parser.add_argument("--threshold", type=float, default=DEFAULT_EQUIVALENCE_THRESHOLD)
    parser.add_argument("--errors", action="store_true", help="print the new check's errors (fresh sets only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    embedder = MiniLMEmbedder()
    embedder.token_memo = 1_000_000
    strict, stems_only = LookAlikeGuard("strict"), LookAlikeGuard("strict", synonyms=False)
    check = EquivalenceCheck(args.threshold, embedder=embedder)
    both = EquivalenceCheck(STRICT_LEARNED_THRESHOLD, embedder=embedder, vetoes="strict")  # guard="strict+learned"
    default_lexicon()  # read the WordNet lexicon before the guard is timed
    paws = load_pairs(DATA / "paws_wiki_dev.tsv")[: args.paws_limit]
    sets = {
        "fresh_pairs_v10": load_pairs(HERE / "data" / "fresh_pairs_v10.tsv"),
        "fresh_pairs_v9": load_pairs(HERE / "data" / "fresh_pairs_v9.tsv"),
        "fresh_pairs_v8": load_pairs(HERE / "data" / "fresh_pairs_v8.tsv"),
        "fresh_pairs_v7": load_pairs(HERE / "data" / "fresh_pairs_v7.tsv"),
        "fresh_pairs_v6": load_pairs(HERE / "data" / "fresh_pairs_v6.tsv"),
        "fresh_pairs_v5": load_pairs(HERE / "data" / "fresh_pairs_v5.tsv"),
        "fresh_pairs_v4": load_pairs(HERE / "data" / "fresh_pairs_v4.tsv"),
        "fresh_pairs_v3": load_pairs(HERE / "data" / "fresh_pairs_v3.tsv"),
        "fresh_pairs_v2": load_pairs(HERE / "data" / "fresh_pairs_v2.tsv"),
        "fresh_query_pairs": load_pairs(HERE / "data" / "fresh_query_pairs.tsv"),
        "llm_query_pairs_dev": load_pairs(DATA / "llm_query_pairs_dev.tsv"),
        "paws dev odd rows": paws[0::2],
        "paws dev even rows": paws[1::2],
    }
    for name, pairs in sets.items():
        start = time.perf_counter()
        texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
        vectors = dict(zip(texts, embedder.encode(texts), strict=True))
        cos = np.array([vectors[a] @ vectors[b] for a, b, _ in pairs])
        labels = np.array([y for *_, y in pairs], dtype=bool)
        guard_start = time.perf_counter()
        old = np.array([strict.check(a, b).ok for a, b, _ in pairs]) & (cos >= DEFAULT_THRESHOLD)
        guard_ms = 1e3 * (time.perf_counter() - guard_start) / len(pairs)
        stems = np.array([stems_only.check(a, b).ok for a, b, _ in pairs]) & (cos >= DEFAULT_THRESHOLD)
        new = np.array([c >= args.floor and check.check(a, b).ok for (a, b, _), c in zip(pairs, cos, strict=True)])
        combined = np.array([both.check(a, b).ok for a, b, _ in pairs]) & (cos >= DEFAULT_THRESHOLD)
        print(f"{name} ({len(pairs)} pairs, {int(labels.sum())} same; {time.perf_counter() - start:.0f} s)")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + LookAlikeGuard strict : {rates(old, labels)}, {guard_ms:.2f} ms/pair")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + strict, synonyms=False: {rates(stems, labels)}")
        print(f"  cosine >= {args.floor} + EquivalenceCheck({args.threshold}): {rates(new, labels)}")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + strict+learned {STRICT_LEARNED_THRESHOLD}: {rates(combined, labels)}")
        if args.errors and "fresh" in name:
            for (a, b, y), p in zip(pairs, new, strict=True):
                if p != y:
                    print(f"    check {'missed' if y else 'WRONG '} {a!r} / {b!r}: {check.check(a, b).reason}")
            for (a, b, y), p in zip(pairs, old, strict=True):
                if p != y:
                    print(f"    guard {'missed' if y else 'WRONG '} {a!r} / {b!r}: {strict.check(a, b).reason}")
            for (a, b, y), p in zip(pairs, combined, strict=True):
                if p != y:
                    print(f"    both  {'missed' if y else 'WRONG '} {a!r} / {b!r}: {both.check(a, b).reason}")


if __name__ == "__main__":
    main()
