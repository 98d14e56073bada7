"""Out-of-sample report: the look-alike guard (with and without its WordNet synonyms), the learned equivalence
check and the pair classifier, on every labelled set.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/semantic_equivalence.py        # about 15 minutes on two cores
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/semantic_equivalence.py --paws-limit 1000 --errors
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/semantic_equivalence.py --sets fresh_pairs_v17 --errors

Sets: `benchmarks/data/fresh_pairs_v21.tsv` (200 pairs written by a helper that read neither the guard nor the other
sets, committed before the voice check joined the order checks in front of the classifier and run once after: the
out-of-sample test of the shipped classifier and its front), `fresh_pairs_v20.tsv` (the same, committed before the
shipped adapter was chosen and run once with the previous front), `fresh_pairs_v19.tsv` and `fresh_pairs_v18.tsv` (the
same for the previous adapter, trained on the same pairs with an unweighted loss, and for the order checks in front;
never trained on, they chose the loss weight of the shipped one), `fresh_pairs_v17.tsv` (the same, committed before
the classifier's dtype and reading were chosen, run once on the previous adapter; now training data),
`fresh_pairs_v16.tsv`-`fresh_pairs_v12.tsv` (the same for the classifier's earlier rounds; now its training data),
`fresh_pairs_v11.tsv`-`fresh_pairs_v3.tsv` (the out-of-sample tests of earlier guard versions, read after their run:
development sets), `fresh_pairs_v2.tsv`, `benchmarks/data/fresh_query_pairs.tsv` (the issue's 60 pairs), the
classifier's three sets of training pairs (`task_pairs`, `role_task_pairs`, `scope_pairs`), the shared
`llm_query_pairs_dev.tsv` and the odd and even rows of `paws_wiki_dev.tsv`. The pair classifier was trained on v2-v17,
the three sets of training pairs and the issue's 60 (marked in the output). For each set it prints precision, recall
and predictions of: cosine >= 0.80 + the strict guard (WordNet synonyms on), the same guard with `synonyms=False`,
cosine >= `--floor` + `EquivalenceCheck` at its shipped threshold, cosine >= 0.80 + `guard="strict+learned"` (the
strict guard, then the learned score at `STRICT_LEARNED_THRESHOLD`), and cosine >= 0.80 + `guard="classifier"` (the
vetoes and word-order checks, then `PairClassifier` at `DEFAULT_PAIR_THRESHOLD`, in its default dtype and reading, and
for comparison in float32, in int8 and reading both orders). Nothing here changes a setting: the thresholds and the
floor were fixed beforehand (see the model cards and docs/semantic_cache.md).
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
    PairClassifier,
    load_pairs,
)
from hf_neuralcache.semantic.equivalence import DEFAULT_COSINE_FLOOR
from hf_neuralcache.semantic.lexicon import default_lexicon

HERE = Path(__file__).resolve().parent
# the pair classifier's training data (train_pair_classifier.py)
TRAINED_ON = {"fresh_query_pairs", "task_pairs", "role_task_pairs", "scope_pairs"}
TRAINED_ON |= {f"fresh_pairs_v{i}" for i in range(2, 18)}
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
    parser.add_argument("--sets", default=None, help="comma-separated names of the sets to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    embedder = MiniLMEmbedder()
    embedder.token_memo = 1_000_000
    strict, stems_only = LookAlikeGuard("strict"), LookAlikeGuard("strict", synonyms=False)
    check = EquivalenceCheck(args.threshold, embedder=embedder)
    both = EquivalenceCheck(STRICT_LEARNED_THRESHOLD, embedder=embedder, vetoes="strict")  # guard="strict+learned"
    classifier = PairClassifier()  # guard="classifier": the vetoes, then the cross-encoder
    others = {f"dtype={dtype!r}": PairClassifier(dtype=dtype) for dtype in ("float32", "int8")}
    others["orders='both'"] = PairClassifier(orders="both")  # the reading of the earlier rounds: twice the pass
    default_lexicon()  # read the WordNet lexicon before the guard is timed
    paws = load_pairs(DATA / "paws_wiki_dev.tsv")[: args.paws_limit]
    sets = {
        "fresh_pairs_v21": load_pairs(HERE / "data" / "fresh_pairs_v21.tsv"),
        "fresh_pairs_v20": load_pairs(HERE / "data" / "fresh_pairs_v20.tsv"),
        "fresh_pairs_v19": load_pairs(HERE / "data" / "fresh_pairs_v19.tsv"),
        "fresh_pairs_v18": load_pairs(HERE / "data" / "fresh_pairs_v18.tsv"),
        "fresh_pairs_v17": load_pairs(HERE / "data" / "fresh_pairs_v17.tsv"),
        "fresh_pairs_v16": load_pairs(HERE / "data" / "fresh_pairs_v16.tsv"),
        "fresh_pairs_v15": load_pairs(HERE / "data" / "fresh_pairs_v15.tsv"),
        "fresh_pairs_v14": load_pairs(HERE / "data" / "fresh_pairs_v14.tsv"),
        "fresh_pairs_v13": load_pairs(HERE / "data" / "fresh_pairs_v13.tsv"),
        "fresh_pairs_v12": load_pairs(HERE / "data" / "fresh_pairs_v12.tsv"),
        "fresh_pairs_v11": load_pairs(HERE / "data" / "fresh_pairs_v11.tsv"),
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
        "task_pairs": load_pairs(HERE / "data" / "task_pairs.tsv"),
        "role_task_pairs": load_pairs(HERE / "data" / "role_task_pairs.tsv"),
        "scope_pairs": load_pairs(HERE / "data" / "scope_pairs.tsv"),
        "llm_query_pairs_dev": load_pairs(DATA / "llm_query_pairs_dev.tsv"),
        "paws dev odd rows": paws[0::2],
        "paws dev even rows": paws[1::2],
    }
    if args.sets is not None:
        unknown = set(args.sets.split(",")) - set(sets)
        if unknown:
            parser.error(f"unknown sets {sorted(unknown)}; known: {', '.join(sets)}")
        sets = {name: pairs for name, pairs in sets.items() if name in args.sets.split(",")}
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
        asked = [k for k, (a, b, _) in enumerate(pairs)
                 if cos[k] >= DEFAULT_THRESHOLD and classifier.vetoes.check(a, b).ok]  # fmt: skip
        scored = np.zeros(len(pairs))
        scored[asked] = classifier.scores([pairs[k][:2] for k in asked]) if asked else []
        crossed = scored >= classifier.threshold
        crossed_as = {how: np.zeros(len(pairs), dtype=bool) for how in others}
        for how, other in others.items():
            crossed_as[how][asked] = other.scores([pairs[k][:2] for k in asked]) >= other.threshold if asked else []
        trained = " (the pair classifier's training data)" if name in TRAINED_ON else ""
        print(f"{name} ({len(pairs)} pairs, {int(labels.sum())} same; {time.perf_counter() - start:.0f} s){trained}")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + LookAlikeGuard strict : {rates(old, labels)}, {guard_ms:.2f} ms/pair")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + strict, synonyms=False: {rates(stems, labels)}")
        print(f"  cosine >= {args.floor} + EquivalenceCheck({args.threshold}): {rates(new, labels)}")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + strict+learned {STRICT_LEARNED_THRESHOLD}: {rates(combined, labels)}")
        print(f"  cosine >= {DEFAULT_THRESHOLD} + order vetoes + PairClassifier {classifier.threshold}: "
              f"{rates(crossed, labels)} ({classifier.dtype})")  # fmt: skip
        for how, other in crossed_as.items():
            print(f"  ... the same, PairClassifier({how}): {rates(other, labels)}")
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
            for (a, b, y), p, c in zip(pairs, crossed, cos, strict=True):
                if p != y:
                    why = classifier.check(a, b).reason if c >= DEFAULT_THRESHOLD else f"cosine {c:.3f}"
                    print(f"    pair  {'missed' if y else 'WRONG '} {a!r} / {b!r}: {why}")
            for how, other in crossed_as.items():
                for (a, b, y), p in zip(pairs, other, strict=True):
                    if p and not y:
                        print(f"    {how} WRONG {a!r} / {b!r}: {others[how].check(a, b).reason}")


if __name__ == "__main__":
    main()
