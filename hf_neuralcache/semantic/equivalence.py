"""The learned equivalence check: after the nearest-neighbour search, score whether a candidate asks the same thing.

[`EquivalenceCheck`] keeps a few hard vetoes in front ([`LookAlikeGuard`] at strictness `"vetoes"`: numbers, names,
negation, question kind, a reversed relation, opposite particles) and replaces the rest of the hand rules by a small
learned score. Its features come from the embedder's own contextual word-piece states (all-MiniLM-L6-v2, the same
forward pass that embeds the request, so a lookup costs no second pass for the query): each content piece of one
text is matched to its most similar piece in the other, and a piece that finds no close match ("dogs" / "cats",
"poach" / "boil") pulls the score down while a synonym ("purchase" / "buy") does not. A logistic regression over
these alignment statistics and the sentence cosine gives a probability; a pair is accepted when it reaches
`threshold`.

The weights (a few dozen numbers) ship as `equivalence.safetensors` beside this file, with their model card
`equivalence.md`: how they were trained (`benchmarks/train_equivalence.py`), on what data, and the figures. Scores
are symmetric: `score(a, b) == score(b, a)`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from .guard import GuardVerdict, scored_verdict, vetoes_guard

__all__ = [
    "DEFAULT_COSINE_FLOOR",
    "DEFAULT_EQUIVALENCE_THRESHOLD",
    "FEATURES",
    "STRICT_LEARNED_THRESHOLD",
    "EquivalenceCheck",
    "content_states",
    "pair_features",
]

WEIGHTS = Path(__file__).with_name("equivalence.safetensors")
FEATURES = ("cosine", "worst_piece", "second_worst_side", "mean_match", "low_share", "word_overlap", "length_gap")
# chosen from benchmarks/train_equivalence.py's held-out generated pairs, where no threshold reaches precision 0.98:
# 0.85 is the most precise point (0.965) that keeps recall above one half (0.53); see equivalence.md
DEFAULT_EQUIVALENCE_THRESHOLD = 0.85
# behind the whole strict guard (`SemanticCache(guard="strict+learned")`, the default): the best recall among the
# thresholds whose precision reaches 0.98 on the development pairs pooled (fresh_pairs_v2-v5, the 60, the LLM
# dev pairs: 0.984 / 0.602) and on held-out generated pairs (0.988), chosen before fresh_pairs_v6 was run and kept
# since (docs/semantic_cache.md, *Out-of-sample evaluation*)
STRICT_LEARNED_THRESHOLD = 0.55
# least cosine of a candidate worth scoring (the cosine is also one of the features)
DEFAULT_COSINE_FLOOR = 0.70

_STOP = frozenset(
    """a an the this that these those of in on at for by with about as and or but if so is are was were be been am do
    does did have has had can could would should will shall may might must i me my we us our you your he him his she
    her it its they them their there here what which who whom whose how why when where some any all each every to
    please just me tell give show explain describe list name write find get want need know like one s ' ? . , ! : ;
    - ( ) " way best good"""
    .split()
)
_WORD = re.compile(r"[^\W_]+")


def content_states(pieces: list[str], states: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The pieces that carry content (whole words not in the stop list, and their continuations) and their states
    `[C, D]`; all of them when none does. Applying it twice changes nothing, so a cache may keep only these."""
    keep, word_kept = [], False
    for piece in pieces:
        if piece.startswith("##"):
            keep.append(word_kept)
            continue
        word_kept = piece.lower() not in _STOP and any(c.isalnum() for c in piece)
        keep.append(word_kept)
    if not any(keep):
        return list(pieces), states
    return [piece for piece, kept in zip(pieces, keep, strict=True) if kept], states[np.array(keep, dtype=bool)]


def pair_features(first: tuple[list[str], np.ndarray], second: tuple[list[str], np.ndarray], cosine: float,
                  words: tuple[str, str]) -> np.ndarray:  # fmt: skip
    """The `FEATURES` of one pair, float64 `[len(FEATURES)]`, symmetric in the two texts.

    Args:
        first, second (`tuple[list[str], np.ndarray]`): Word pieces and unit token states `[T, D]` of each text
            (from `MiniLMEmbedder.encode_tokens`).
        cosine (`float`): Cosine similarity of the two sentence embeddings.
        words (`tuple[str, str]`): The two texts, for the word overlap.
    """
    a, b = content_states(*first)[1], content_states(*second)[1]
    if not len(a) or not len(b):
        return np.array([cosine, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    sims = a @ b.T  # [Ta, Tb]
    a2b, b2a = sims.max(axis=1), sims.max(axis=0)
    worst = sorted([a2b.min(), b2a.min()])
    both = np.concatenate([a2b, b2a])
    wa, wb = (set(_WORD.findall(t.lower())) - _STOP for t in words)
    overlap = len(wa & wb) / max(len(wa | wb), 1)
    gap = abs(len(a) - len(b)) / (len(a) + len(b))
    return np.array([cosine, worst[0], worst[1], both.mean(), (both < 0.6).mean(), overlap, gap])


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FileNotFoundError(f"the equivalence check's weights are missing: {path} (reinstall hf-neuralcache)")
    weights = load_file(str(path))
    if weights["coef"].shape != (len(FEATURES),):
        raise ValueError(f"expected {len(FEATURES)} weights in {path}, got {weights['coef'].shape}")
    return weights


class EquivalenceCheck:
    """Verifies a nearest-neighbour candidate with hard vetoes and a learned equivalence score.

    A drop-in `guard` for [`SemanticCache`] and [`calibrate`]: `check(query, candidate)` returns a [`GuardVerdict`]
    whose `reason` names a veto or the score. `score(query, candidate)` is the probability that the two ask the same.

    Args:
        threshold (`float`, *optional*, defaults to `DEFAULT_EQUIVALENCE_THRESHOLD`):
            Least score accepted, in [0, 1]: the strictness. Choose it for a target precision on labelled pairs
            with `calibrate(pairs, guard=check, sweep="score", target_precision=0.98).threshold`.
        embedder (`MiniLMEmbedder`, *optional*):
            Where the word-piece states come from; pass the cache's own to share its model and its memory of the
            last embedded texts. Defaults to a new `MiniLMEmbedder()`.
        vetoes (`bool` or `str`, *optional*, defaults to `True`):
            What must pass before the score is asked: `True` (the hard vetoes, `LookAlikeGuard("vetoes")`: numbers,
            names, negation, question kind, direction, particles), a strictness of [`LookAlikeGuard`] (`"strict"`:
            the whole guard, so that the score can only refuse more; use it with `STRICT_LEARNED_THRESHOLD`) or
            `False` (the score alone).
        weights (`str` or `Path`, *optional*):
            Another safetensors file of weights (`coef`, `bias`, `mean`, `scale`).

    Example:

    ```python
    >>> from hf_neuralcache.semantic import EquivalenceCheck
    >>> check = EquivalenceCheck()
    >>> check.check("How do I fix a flat tire?", "How can I repair a flat tire?").ok
    True
    >>> check.check("What do horses eat?", "What do goats eat?").reason
    'equivalence score 0.1... < 0.850'
    >>> round(check.score("What do horses eat?", "What do goats eat?"), 3) == round(
    ...     check.score("What do goats eat?", "What do horses eat?"), 3)
    True
    >>> check.check("Convert 5 km to miles", "Convert 5 miles to km").reason
    "direction reversed: 'to' has ['kilometer'] and ['miles'] on opposite sides"
    ```
    """

    def __init__(self, threshold: float | None = None, embedder=None, vetoes: bool = True, weights=None):
        threshold = DEFAULT_EQUIVALENCE_THRESHOLD if threshold is None else threshold
        if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"expected threshold in [0, 1], got {threshold!r}")
        if embedder is None:
            from .embedders import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        if not callable(getattr(embedder, "encode_tokens", None)):
            raise ValueError(f"expected an embedder with encode_tokens (a MiniLMEmbedder), got {embedder!r}")
        self.threshold, self.embedder = float(threshold), embedder
        self.vetoes = vetoes_guard(vetoes, "vetoes")
        w = _load_weights(Path(weights) if weights is not None else WEIGHTS)
        self._coef, self._bias = w["coef"].astype(np.float64), float(w["bias"][0])
        self._mean, self._scale = w["mean"].astype(np.float64), w["scale"].astype(np.float64)
        self._vector = functools.lru_cache(maxsize=4096)(self._sentence)

    def __repr__(self) -> str:
        vetoes = self.vetoes.strictness if self.vetoes is not None else None
        return f"EquivalenceCheck(threshold={self.threshold}, vetoes={vetoes!r})"

    def _sentence(self, text: str) -> np.ndarray:
        return self.embedder.encode([text])[0]

    def summary(self, text: str) -> tuple[list[str], np.ndarray]:
        """What a cache keeps with a stored request so that checking it later needs no forward pass over it: the
        content word pieces of `text` and their states, float16 `[C, D]` (about 0.8 KB a piece with MiniLM)."""
        pieces, states = content_states(*self.embedder.encode_tokens([text])[0])
        return pieces, states.astype(np.float16)

    def features(self, query: str, candidate: str, summary=None, cosine: float | None = None) -> np.ndarray:
        """The `FEATURES` of the pair (see [`pair_features`]); `summary` (the candidate's [`summary`]) and `cosine`
        (of the two sentence embeddings), when the caller has them, save the forward passes over the candidate."""
        if summary is None:
            first, second = self.embedder.encode_tokens([query, candidate])
        else:
            first, second = self.embedder.encode_tokens([query])[0], (summary[0], summary[1].astype(np.float32))
        if cosine is None:
            cosine = float(self._vector(query) @ self._vector(candidate))
        return pair_features(first, second, cosine, (query, candidate))

    def score(self, query: str, candidate: str, summary=None, cosine: float | None = None) -> float:
        """Probability that the two texts ask the same thing (the vetoes are not applied); `summary` and `cosine` as
        in [`features`]."""
        z = (self.features(query, candidate, summary, cosine) - self._mean) / self._scale
        return float(1.0 / (1.0 + np.exp(-(z @ self._coef + self._bias))))

    def check(self, query: str, candidate: str, summary=None, cosine: float | None = None) -> GuardVerdict:
        """Whether `candidate` (a cached request) asks the same as `query`; `reason` names a veto or the score.

        `summary` (the candidate's [`summary`], kept when it was stored) and `cosine` (of the two sentence
        embeddings) are optional: a cache passes them so that a lookup runs no forward pass over the candidate.
        """
        score = lambda: self.score(query, candidate, summary, cosine)  # noqa: E731 - asked only past the vetoes
        return scored_verdict(self.vetoes, query, candidate, score, self.threshold, "equivalence score")
