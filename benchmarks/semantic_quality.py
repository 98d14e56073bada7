"""Semantic cache matching quality: plain cosine vs cosine + look-alike guard, on the shared labelled pairs.

    .venv/bin/python benchmarks/semantic_quality.py                      # both data sets, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/semantic_quality.py --paws-limit 1000    # quicker

For each data set (`llm_query_pairs_dev.tsv`, `paws_wiki_dev.tsv` from the shared data folder) it prints precision,
recall and the number of pairs predicted "same" at the default threshold (`DEFAULT_THRESHOLD`) for plain cosine (the
baseline: the same MiniLM embedder, no guard) and for cosine + `LookAlikeGuard` at each strictness, then the threshold
`calibrate` picks for each rule (target precision 0.98), and checks the goals: precision >= 0.98 with recall >= 0.6
on the LLM query pairs, precision >= 0.9 on PAWS (whose recall is expected to be low: its paraphrases reorder the
same words, which the strict guard refuses). The same figures follow for `benchmarks/data/fresh_query_pairs.tsv`
(60 pairs written after the guard was finished, never used to change it: an out-of-sample check), and for the odd
and the even rows of each file apart (how much the figures move between halves; the guard's rules were developed
looking at all rows of the two dev files, so neither half is truly held out). Saves the curves of the default guard
as a PNG (`--plot`). Embeddings are computed once per text and kept in memory for the run only.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from hf_neuralcache.semantic import DEFAULT_THRESHOLD, LookAlikeGuard, MiniLMEmbedder, calibrate, load_pairs
from hf_neuralcache.semantic.calibration import plot_curves

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HERE = Path(__file__).resolve().parent
PLOT = HERE / "out" / "semantic_quality.png"
SETS = {"llm query pairs": "llm_query_pairs_dev.tsv", "paws wiki": "paws_wiki_dev.tsv"}
# 60 LLM-style pairs written for this benchmark after the guard was finished and never used to change it: an
# out-of-sample check of the rules (the dev files above are what the guard and the threshold were developed on)
FRESH = {"fresh pairs": HERE / "data" / "fresh_query_pairs.tsv"}
RULES = ("off", "balanced", "strict")  # "off" = plain cosine
GOALS = {"llm query pairs": (0.98, 0.6), "paws wiki": (0.9, 0.0)}  # least precision, least recall


class MemoEmbedder:
    """Wraps an embedder and keeps each text's vector for the rest of the run (in memory only)."""

    def __init__(self, embedder):
        self.embedder, self.dim, self.fingerprint = embedder, embedder.dim, embedder.fingerprint
        self.vectors: dict[str, np.ndarray] = {}
        self.seconds = 0.0

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            start = time.perf_counter()
            self.vectors.update(zip(missing, self.embedder.encode(missing), strict=True))
            self.seconds += time.perf_counter() - start
        return np.stack([self.vectors[t] for t in texts])


def guard_microseconds(pairs: list[tuple[str, str, int]], strictness: str) -> float:
    """Mean time of one check with fresh (not memoized) analyses of both texts."""
    guard = LookAlikeGuard(strictness, memo_size=0)
    start = time.perf_counter()
    for a, b, _ in pairs:
        guard.check(a, b)
    return (time.perf_counter() - start) / len(pairs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help=f"folder of the TSV files (default {DATA})")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"PNG to save the curves to (default {PLOT})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="cosine threshold to report at")
    parser.add_argument("--target-precision", type=float, default=0.98, help="what calibrate aims for")
    parser.add_argument("--paws-limit", type=int, default=None, help="use only the first N PAWS pairs")
    parser.add_argument("--device", default="cpu", help="where MiniLM runs (default cpu)")
    args = parser.parse_args()
    logging.getLogger("hf_neuralcache.semantic").setLevel(logging.ERROR)  # an unreachable target is in the table

    embedder = MemoEmbedder(MiniLMEmbedder(device=args.device))
    print(f"embedder {embedder.fingerprint}; default threshold {DEFAULT_THRESHOLD}; reported at {args.threshold}\n")
    columns = ("threshold", "precision", "recall", "predicted", "pairs")
    header = f"{'data set':<16} {'rule':<24} " + " ".join(f"{c:>9}" for c in columns)
    table, picks, goals, curves = [header, "-" * len(header)], [], [], {}
    halves = []
    for name, path in [*((n, args.data / f) for n, f in SETS.items()), *FRESH.items()]:
        if not path.is_file():
            print(f"skipping {name}: {path} not found")
            continue
        pairs = load_pairs(path)[: args.paws_limit if "paws" in name else None]
        results = {rule: calibrate(pairs, embedder=embedder, guard=rule, target_precision=args.target_precision)
                   for rule in RULES}  # fmt: skip
        for rule, result in results.items():
            label = "cosine (baseline)" if rule == "off" else f"cosine + guard {rule}"
            p, r, n = result.metrics(args.threshold)
            table.append(f"{name:<16} {label:<24} {args.threshold:>9.3f} {p:>9.3f} {r:>9.3f} {n:>9} {len(pairs):>9}")
            met = "" if result.met_target else f" (target {args.target_precision} not reached)"
            picks.append(
                f"{name:<16} {label:<24} calibrate picks {result.threshold:.3f}: precision {result.precision:.3f}, "
                f"recall {result.recall:.3f}{met}; guard {guard_microseconds(pairs[:2000], rule):.0f} us/pair"
            )
        for rule in ("off", "strict") if name in SETS else ():  # odd and even rows apart: the spread of halves
            for half, rows in (("odd rows", slice(0, None, 2)), ("even rows", slice(1, None, 2))):
                result = calibrate(pairs[rows], embedder=embedder, guard=rule, target_precision=args.target_precision)
                p, r, n = result.metrics(args.threshold)
                label = "cosine (baseline)" if rule == "off" else "cosine + guard strict"
                halves.append(f"{name:<16} {label:<24} {half:<9} precision {p:.3f}, recall {r:.3f} ({n} predicted)")
        if name not in GOALS:
            continue
        least_p, least_r = GOALS[name]
        p, r, _ = results["strict"].metrics(args.threshold)
        verdict = "met" if p >= least_p and r >= least_r else "MISSED"
        goals.append(f"{name}: precision {p:.3f} (goal >= {least_p}), recall {r:.3f} (goal >= {least_r}): {verdict}")
        curves[name] = results["strict"]
    print("\n".join(table), "", "\n".join(picks), "", "\n".join(halves), sep="\n")
    print("\ngoals at the default settings (strict guard):")
    print("\n".join(f"  {g}" for g in goals))
    print(f"\nembedding: {len(embedder.vectors)} texts in {embedder.seconds:.1f} s")
    if curves:
        print(f"curves saved to {plot_curves(curves, args.plot)}")


if __name__ == "__main__":
    main()
