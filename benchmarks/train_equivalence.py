"""Train the learned equivalence check's weights on generated pairs, and choose its threshold on held-out ones.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_equivalence.py          # about a minute on one core

Training pairs: `equivalence_data.generate(seed=0)`; held-out pairs for the threshold: `generate(seed=1)` minus any
pair seen in training (the same templates, other combinations: a check of fit, not of generalisation). Fits a
logistic regression (L2, standardized features, plain gradient descent in numpy) on `pair_features`, writes
`hf_neuralcache/semantic/equivalence.safetensors`, and prints the threshold that reaches precision 0.98 on the
held-out pairs with the vetoes applied. No shared evaluation file is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a benchmark script beside its data generator
from equivalence_data import generate  # noqa: E402

from hf_neuralcache.semantic import EquivalenceCheck, LookAlikeGuard, MiniLMEmbedder  # noqa: E402
from hf_neuralcache.semantic.equivalence import FEATURES, WEIGHTS, pair_features  # noqa: E402


def featurize(pairs, embedder) -> np.ndarray:
    texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
    vectors = dict(zip(texts, embedder.encode(texts), strict=True))
    tokens = dict(zip(texts, embedder.encode_tokens(texts), strict=True))
    return np.stack([pair_features(tokens[a], tokens[b], float(vectors[a] @ vectors[b]), (a, b)) for a, b, _ in pairs])


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 5000, lr: float = 0.5):
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        w -= lr * (z.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float((p - y).mean())
    return w, b, mean, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--target-precision", type=float, default=0.98)
    args = parser.parse_args()
    torch.set_num_threads(1)
    embedder = MiniLMEmbedder()
    embedder.token_memo = 1_000_000
    train = generate(seed=0)
    seen = {frozenset((a, b)) for a, b, _ in train}
    held = [p for p in generate(seed=1) if frozenset(p[:2]) not in seen]
    x, y = featurize(train, embedder), np.array([p[2] for p in train], dtype=float)
    w, b, mean, scale = fit(x, y)
    from safetensors.numpy import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"coef": w, "bias": np.array([b]), "mean": mean, "scale": scale}
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(args.out),
              metadata={"features": ",".join(FEATURES), "train_pairs": str(len(train))})  # fmt: skip
    print(f"train {len(train)} pairs ({int(y.sum())} same); held-out {len(held)}; weights -> {args.out}")
    print("weights:", ", ".join(f"{n} {v:+.2f}" for n, v in zip(FEATURES, w, strict=True)), f"bias {b:+.2f}")
    check, vetoes = EquivalenceCheck(embedder=embedder, weights=args.out), LookAlikeGuard("vetoes")
    for name, pairs in (("train", train), ("held-out", held)):
        labels = np.array([p[2] for p in pairs], dtype=bool)
        passed = np.array([vetoes.check(a, c).ok for a, c, _ in pairs])
        scores = np.array([check.score(a, c) for a, c, _ in pairs])
        for t in np.round(np.arange(0.3, 0.96, 0.05), 2):
            pred = passed & (scores >= t)
            p = (pred & labels).sum() / max(pred.sum(), 1)
            print(f"{name:<9} t={t:.2f} precision {p:.3f} recall {(pred & labels).sum() / labels.sum():.3f}")


if __name__ == "__main__":
    main()
