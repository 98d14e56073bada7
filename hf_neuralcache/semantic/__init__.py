"""Semantic cache: answers a request whose meaning matches a cached one, guarded against look-alike prompts."""

from .calibration import DEFAULT_THRESHOLD, CalibrationResult, calibrate, load_pairs, plot_curves
from .embedders import Embedder, HiddenStateEmbedder, MiniLMEmbedder, minilm_folder
from .equivalence import DEFAULT_EQUIVALENCE_THRESHOLD, STRICT_LEARNED_THRESHOLD, EquivalenceCheck
from .guard import STRICTNESS, GuardVerdict, LookAlikeGuard, normalize_query
from .pair_classifier import DEFAULT_PAIR_THRESHOLD, PairClassifier

__all__ = [
    "CalibrationResult",
    "DEFAULT_EQUIVALENCE_THRESHOLD",
    "DEFAULT_PAIR_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "Embedder",
    "EquivalenceCheck",
    "GuardVerdict",
    "HiddenStateEmbedder",
    "LookAlikeGuard",
    "MiniLMEmbedder",
    "PairClassifier",
    "STRICTNESS",
    "STRICT_LEARNED_THRESHOLD",
    "calibrate",
    "load_pairs",
    "minilm_folder",
    "normalize_query",
    "plot_curves",
]
