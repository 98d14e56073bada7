"""Calibration of the semantic cache's cosine threshold on labelled pairs, with and without the look-alike guard.

A pair counts as a predicted match when the cosine similarity of its two embeddings is at least the threshold **and**
the guard accepts it; [`calibrate`] sweeps the threshold, returns the precision/recall curve of that rule beside plain
cosine's, and picks the threshold with the best recall among those reaching a target precision.

`DEFAULT_THRESHOLD` was chosen from this curve on the project's development data (`llm_query_pairs_dev.tsv`, 80
pairs, and `paws_wiki_dev.tsv`, 8,000 pairs; `benchmarks/semantic_quality.py` measures both) with all-MiniLM-L6-v2
and the default `"strict"` guard; the figures and the reasoning are in the comment next to it.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .guard import LookAlikeGuard

__all__ = ["DEFAULT_THRESHOLD", "CalibrationResult", "calibrate", "load_pairs", "plot_curves"]

logger = logging.getLogger("hf_neuralcache.semantic")

# Measured with all-MiniLM-L6-v2 + LookAlikeGuard("strict") by benchmarks/semantic_quality.py:
# - llm_query_pairs_dev.tsv (40 same / 40 look-alike pairs): the guard refuses all 40 look-alikes, so guarded precision
#   is 1.00 at every threshold, and recall is 0.675 (27/40) at every threshold up to 0.82, falling above it;
#   calibrate(target_precision=0.98) picks 0.82, the top of that plateau. Plain cosine at 0.80: precision 0.69, recall
#   0.95 (its best precision anywhere is 0.85, at 0.90 with recall 0.575).
# - paws_wiki_dev.tsv (3,539 of 8,000 paraphrases): at 0.80 guarded precision 0.945, recall 0.28 (the strict guard
#   refuses reordered same-word paraphrases); plain cosine precision 0.44 to 0.47 at any threshold up to 0.95.
# 0.80 rather than 0.82: the same figures, a margin below the two paraphrases at 0.822, and the cosine still screens
# what the guard cannot parse (a rule-based check knows no synonyms).
DEFAULT_THRESHOLD = 0.80

_LLM_HEADER = ["label", "query_a", "query_b"]
_PAWS_HEADER = ["id", "sentence1", "sentence2", "label"]


def load_pairs(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Read labelled pairs from a tab-separated file: `(text_a, text_b, label)` with label 1 = same request.

    Two formats are recognized by their header: `label, query_a, query_b` (LLM query pairs) and
    `id, sentence1, sentence2, label` (PAWS). Line endings may be LF or CRLF; fields are not quoted.

    Args:
        path (`str` or `os.PathLike`): The file.

    Raises:
        `ValueError`: for an unknown header, a row with the wrong number of fields, or a label other than 0 or 1.
    """
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.strip().lstrip("\ufeff") for h in next(rows, [])]
        if header == _LLM_HEADER:
            a, b, label = 1, 2, 0
        elif header == _PAWS_HEADER:
            a, b, label = 1, 2, 3
        else:
            raise ValueError(
                f"expected a header {'/'.join(_LLM_HEADER)} or {'/'.join(_PAWS_HEADER)} (tab-separated), "
                f"got {header!r} in {path}"
            )
        pairs = []
        for line, row in enumerate(rows, start=2):
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise ValueError(f"expected {len(header)} tab-separated fields at {path}:{line}, got {len(row)}")
            value = row[label].strip()
            if value not in ("0", "1"):
                raise ValueError(f"expected label 0 or 1 at {path}:{line}, got {value!r}")
            pairs.append((row[a], row[b], int(value)))
    return pairs


@dataclass
class CalibrationResult:
    """The threshold [`calibrate`] chose, and the curves it chose from.

    Attributes:
        threshold (`float`): The chosen cosine threshold.
        precision (`float`), recall (`float`): Of the guarded rule at `threshold`.
        met_target (`bool`): Whether `precision` reaches `target_precision` (otherwise `threshold` is the most precise
            point of the curve).
        target_precision (`float`): The precision asked for.
        thresholds (`np.ndarray`): `[K]` the swept thresholds, ascending.
        precisions (`np.ndarray`), recalls (`np.ndarray`): `[K]` of the guarded rule (precision is NaN where nothing
            is predicted).
        cosine_precisions (`np.ndarray`), cosine_recalls (`np.ndarray`): `[K]` of plain cosine.
        scores (`np.ndarray`): `[N]` cosine similarity of each pair.
        accepted (`np.ndarray`): `[N]` bool, whether the guard accepted each pair.
        labels (`np.ndarray`): `[N]` bool, the labels.
        guard (`str`): Which guard was used.
    """

    threshold: float
    precision: float
    recall: float
    met_target: bool
    target_precision: float
    thresholds: np.ndarray
    precisions: np.ndarray
    recalls: np.ndarray
    cosine_precisions: np.ndarray
    cosine_recalls: np.ndarray
    scores: np.ndarray
    accepted: np.ndarray
    labels: np.ndarray
    guard: str

    def metrics(self, threshold: float, guarded: bool = True) -> tuple[float, float, int]:
        """`(precision, recall, predicted)` at `threshold`, of the guarded rule or (`guarded=False`) plain cosine."""
        predicted = self.scores >= threshold
        if guarded:
            predicted &= self.accepted
        return _precision_recall(predicted, self.labels)

    def plot(self, path: str | os.PathLike, title: str = "") -> Path:
        """Save a PNG of precision and recall against the threshold, plain cosine vs guarded; returns its path."""
        return plot_curves({title or "pairs": self}, path)


def _precision_recall(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    hits, count, positives = int((predicted & labels).sum()), int(predicted.sum()), int(labels.sum())
    return (hits / count if count else float("nan")), (hits / positives if positives else float("nan")), count


def _curve(scores: np.ndarray, ok: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision `[K]` and recall `[K]` of `scores >= t & ok` for each threshold t."""
    predicted = (scores[None, :] >= thresholds[:, None]) & ok[None, :]  # [K, N]
    hits = (predicted & labels[None, :]).sum(axis=1)
    counts = predicted.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    recall = hits / max(int(labels.sum()), 1)
    return precision, recall


def calibrate(
    pairs: Iterable[tuple[str, str, int]],
    embedder=None,
    guard=None,
    target_precision: float = 0.98,
    plot: str | os.PathLike | None = None,
    sweep: str = "cosine",
) -> CalibrationResult:
    """Choose a cosine threshold for the semantic cache from labelled pairs.

    Sweeps thresholds 0.000, 0.005, ..., 1.000 and returns the one with the highest recall among those whose guarded
    precision is at least `target_precision` (the highest such threshold on ties, the safer one). If no threshold
    reaches the target, the most precise one is returned with `met_target=False` (and a warning is logged).

    Args:
        pairs (`Iterable[tuple[str, str, int]]`):
            `(text_a, text_b, label)`, label 1 (or `True`) when the answer to one may be served for the other.
        embedder (*optional*):
            Any object with `encode(list[str]) -> np.ndarray` of normalized rows; defaults to [`MiniLMEmbedder`].
        guard (`str` or guard object, *optional*):
            A strictness for [`LookAlikeGuard`] or an object with `check(a, b).ok`; defaults to `LookAlikeGuard()`
            (`"strict"`). `"off"` calibrates plain cosine.
        target_precision (`float`, *optional*, defaults to 0.98):
            Least precision of the chosen threshold, in (0, 1].
        plot (`str` or `os.PathLike`, *optional*):
            Where to save a PNG of the curves (see [`CalibrationResult.plot`]).
        sweep (`str`, *optional*, defaults to `"cosine"`):
            What the threshold applies to: the cosine (the guard accepts or refuses), or `"score"`: the guard's own
            `score(a, b)` in [0, 1] (an [`EquivalenceCheck`]; its vetoes accept or refuse), which chooses the
            check's `threshold`. The "cosine" curves are then those of the score without the vetoes.

    Returns:
        [`CalibrationResult`]

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_neuralcache.semantic import calibrate
    >>> class Letters:  # a toy embedder: texts are normalized letter counts
    ...     dim = 26
    ...     def encode(self, texts):
    ...         v = np.array([[t.lower().count(chr(97 + i)) for i in range(26)] for t in texts], dtype=np.float32)
    ...         return v / np.linalg.norm(v, axis=1, keepdims=True)
    >>> pairs = [("abc", "abc", 1), ("abc", "abd", 0), ("hello", "hello!", 1), ("cat", "dog", 0)]
    >>> result = calibrate(pairs, embedder=Letters(), guard="off", target_precision=1.0)
    >>> result.threshold, result.precision, result.recall
    (1.0, 1.0, 1.0)
    ```
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"expected target_precision in (0, 1], got {target_precision!r}")
    pairs = list(pairs)
    for row in pairs:
        if len(row) != 3 or not isinstance(row[0], str) or not isinstance(row[1], str) or row[2] not in (0, 1):
            raise ValueError(f"expected pairs of (str, str, 0 or 1), got {row!r}")
    labels = np.array([bool(row[2]) for row in pairs], dtype=bool)  # [N]
    if not labels.any() or labels.all():
        raise ValueError(f"expected both labels among the pairs, got {int(labels.sum())} positives of {len(pairs)}")
    if embedder is None and sweep == "score":
        embedder = getattr(guard, "embedder", None)  # the check's own: its vectors are memoized
    if embedder is None:
        from .embedders import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    if guard is None or isinstance(guard, str):
        guard = LookAlikeGuard(guard or "strict")
    if not callable(getattr(guard, "check", None)):
        raise ValueError(f"expected guard to be a strictness name or an object with check(a, b), got {guard!r}")

    texts = list(dict.fromkeys(t for row in pairs for t in row[:2]))
    index = {t: k for k, t in enumerate(texts)}
    vectors = np.asarray(embedder.encode(texts), dtype=np.float32)  # [U, dim]
    first = vectors[[index[row[0]] for row in pairs]]  # [N, dim]
    second = vectors[[index[row[1]] for row in pairs]]
    # rounded to 6 decimals so that float32 rounding (0.99999994 for equal texts) does not decide a threshold
    scores = np.round(np.clip((first.astype(np.float64) * second).sum(axis=1), -1.0, 1.0), 6)  # [N]
    if sweep == "score":
        if not callable(getattr(guard, "score", None)):
            raise ValueError(f"expected a guard with score(a, b) for sweep='score', got {guard!r}")
        vetoes = getattr(guard, "vetoes", None)
        scores = np.round([guard.score(row[0], row[1]) for row in pairs], 6)  # [N]
        accepted = np.array([vetoes is None or bool(vetoes.check(row[0], row[1]).ok) for row in pairs], dtype=bool)
    elif sweep == "cosine":
        accepted = np.array([bool(guard.check(row[0], row[1]).ok) for row in pairs], dtype=bool)  # [N]
    else:
        raise ValueError(f"expected sweep 'cosine' or 'score', got {sweep!r}")

    thresholds = np.round(np.linspace(0.0, 1.0, 201), 3)  # [K]
    precisions, recalls = _curve(scores, accepted, labels, thresholds)
    cosine_precisions, cosine_recalls = _curve(scores, np.ones_like(accepted), labels, thresholds)
    eligible = np.flatnonzero(np.nan_to_num(precisions, nan=-1.0) >= target_precision - 1e-12)
    met = eligible.size > 0
    if met:
        best = eligible[recalls[eligible] == recalls[eligible].max()][-1]
    else:
        ranked = np.nan_to_num(precisions, nan=-1.0)
        candidates = np.flatnonzero(ranked == ranked.max())
        best = candidates[np.argmax(recalls[candidates])]
        logger.warning(
            "no threshold reaches precision %.3f (best %.3f at %.3f)", target_precision, ranked.max(), thresholds[best]
        )
    result = CalibrationResult(
        threshold=float(thresholds[best]),
        precision=float(precisions[best]),
        recall=float(recalls[best]),
        met_target=bool(met),
        target_precision=float(target_precision),
        thresholds=thresholds,
        precisions=precisions,
        recalls=recalls,
        cosine_precisions=cosine_precisions,
        cosine_recalls=cosine_recalls,
        scores=scores,
        accepted=accepted,
        labels=labels,
        guard=repr(guard),
    )
    if plot is not None:
        result.plot(plot)
    return result


def plot_curves(results: Mapping[str, CalibrationResult], path: str | os.PathLike) -> Path:
    """Save one panel per result (title -> result): precision and recall vs threshold, plain cosine vs guarded.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change); matplotlib is imported here only.
    """
    if not results:
        raise ValueError("expected at least one CalibrationResult to plot, got none")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(results), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (title, res) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), k + 1)
        ax.plot(res.thresholds, res.precisions, color="tab:blue", label="precision, guarded")
        ax.plot(res.thresholds, res.recalls, color="tab:orange", label="recall, guarded")
        ax.plot(res.thresholds, res.cosine_precisions, "--", color="tab:blue", alpha=0.6, label="precision, cosine")
        ax.plot(res.thresholds, res.cosine_recalls, "--", color="tab:orange", alpha=0.6, label="recall, cosine")
        ax.axvline(res.threshold, color="gray", linewidth=0.8, label=f"chosen {res.threshold:.3f}")
        ax.axhline(res.target_precision, color="gray", linestyle=":", linewidth=0.8)
        low = max(0.0, float(np.floor(np.quantile(res.scores, 0.02) * 20) / 20))
        ax.set(xlim=(low, 1.0), ylim=(0.0, 1.02), xlabel="cosine threshold", title=f"{title} ({res.labels.size} pairs)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
