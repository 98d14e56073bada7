"""[`RetentionParams`] and [`fit_retention`]: a fitted score for which retained tokens `tensor_cache` keeps.

With `cache_config["retain"]` a `tensor_cache` keeps, per KV head, the evicted tokens that this forward's queries
attended to most (TOVA, plus `carry` times the previous score). That score looks back; what the cache needs is the
tokens *later* queries will look at. A fitted retention score ranks the candidates by a linear estimate of the log of
the largest attention weight any of the next `horizon` queries will give them, from what the cache knows:

    rank = w . [log(score + 1e-7), log(|k_i| + 1e-3) for each rotary pair i, log(|v| + 1e-3), log(age), 1]

`score` is the TOVA score with carry, `k` the token's key (the norm of each rotary pair `(j, j + D/2)` does not depend
on its position), `v` its value and `age` the distance from the forward's first query. One weight vector per layer
and KV head (`D/2 + 4` floats: 36 for SmolLM2), fitted by ridge regression on the attention of the frozen model
over a training text, without a gradient (Locret, Huang et al. 2024, trains small "retaining heads" for the same
purpose; this is the least such head).

A folder holds `retention_config.json` (model fingerprint and config signature, window, chunk, carry, horizon, how
the fit ran) and `retention.safetensors` (`layers.{i}.weight` `[Hkv, D/2 + 4]`). No pickle.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from .tensor_cache_params import check_fitted_model, config_signature, save_folder

__all__ = ["RetentionParams", "fit_retention", "retention_features"]

CONFIG_NAME = "retention_config.json"
WEIGHTS_NAME = "retention.safetensors"
FORMAT_VERSION = 1
_EPS = 1e-7


def retention_features(score, keys, values, positions, start) -> torch.Tensor:
    """The fitted score's inputs `[..., n, D/2 + 4]` (float32) for candidates with TOVA `score` `[..., n]`, `keys`
    `[..., n, D]`, `values` `[..., n, Dv]` and `positions` `[..., n]`, in a forward whose first query is `start`."""
    k = keys.float()
    half = k.shape[-1] // 2
    pairs = torch.log(torch.sqrt(k[..., :half] ** 2 + k[..., half : 2 * half] ** 2) + 1e-3)
    age = torch.log((start - positions).clamp(min=1).float())
    norm = torch.log(values.float().norm(dim=-1) + 1e-3)
    ones = torch.ones_like(age)
    return torch.cat([torch.log(score.float() + _EPS).unsqueeze(-1), pairs, norm.unsqueeze(-1), age.unsqueeze(-1),
                      ones.unsqueeze(-1)], -1)  # fmt: skip


@dataclass
class RetentionParams:
    """A fitted retention score for `tensor_cache`'s retained tokens: one weight vector per layer and KV head.

    Args:
        weights (`dict[int, torch.Tensor]`): Per layer, `[Hkv, D/2 + 4]` float32 (see the module docstring).
        window (`int`): The window it was fitted for (`cache_config["window"]`).
        chunk (`int`): Tokens per forward it was fitted for (the prefill chunk).
        carry (`float`): The carry it was fitted with (`cache_config["carry"]`).
        horizon (`int`): How many later queries the target looked at.
        model_fingerprint (`str`): [`hf_neuralcache.hooks.fingerprint.model_fingerprint`] of the model fitted on.
        signature (`dict`): [`config_signature`] of that model's config.
        fit (`dict`, *optional*): How the fit ran (texts, tokens, seconds); informative.
    """

    weights: dict[int, torch.Tensor]
    window: int
    chunk: int
    carry: float
    horizon: int
    model_fingerprint: str
    signature: dict
    fit: dict = field(default_factory=dict)

    def layer(self, index: int) -> torch.Tensor | None:
        return self.weights.get(index)

    def check(self, config=None, window: int | None = None, carry: float | None = None, model=None) -> None:
        """Refuse a score fitted for another model, window or carry.

        Raises:
            `ValueError`: saying what differs and what to do.
        """
        where = self.fit.get("source", "these retention params")
        if window is not None and window != self.window:
            raise ValueError(
                f"{where} were fitted for window={self.window}, got window={window}. Use window={self.window} or "
                f"fit again (hf_neuralcache.fit_retention(..., window={window}))."
            )
        if carry is not None and float(carry) != self.carry:
            raise ValueError(
                f"{where} were fitted for carry={self.carry}, got carry={carry}. Use carry={self.carry} or fit again "
                f"(hf_neuralcache.fit_retention(..., carry={carry}))."
            )
        fit_again = "Fit them for this model (hf_neuralcache.fit_retention)"
        check_fitted_model(where, self.signature, self.model_fingerprint, fit_again, config=config, model=model)

    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "model_signature": self.signature,
            "window": self.window,
            "chunk": self.chunk,
            "carry": self.carry,
            "horizon": self.horizon,
            "layers": sorted(self.weights),
            "fit": self.fit,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `retention_config.json` and `retention.safetensors` into `directory` (created if missing)."""
        tensors = {f"layers.{i}.weight": w for i, w in self.weights.items()}
        save_folder(directory, tensors, WEIGHTS_NAME, self.config_dict(), CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> RetentionParams:
        """Load what [`save_pretrained`] wrote.

        Raises:
            `ValueError`: a missing file, another format version, or missing or malformed tensors.
        """
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        missing = [p for p in (config_path, weights_path) if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"expected a retention params folder with {CONFIG_NAME} and {WEIGHTS_NAME}, missing {missing}. "
                "Write one with RetentionParams.save_pretrained or `hf-neuralcache tensor-cache fit-retention`."
            )
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("format_version") != FORMAT_VERSION:
            found = config.get("format_version")
            raise ValueError(f"{config_path}: expected format_version {FORMAT_VERSION}, got {found}.")
        tensors = load_file(weights_path)
        signature = config["model_signature"]
        shape = [signature["num_key_value_heads"], signature["head_dim"] // 2 + 4]
        weights = {}
        for i in config["layers"]:
            tensor = tensors.get(f"layers.{i}.weight")
            if tensor is None or list(tensor.shape) != shape or not torch.isfinite(tensor).all():
                raise ValueError(f"{weights_path}: layers.{i}.weight must be a finite {shape} tensor.")
            weights[int(i)] = tensor.float()
        fit = dict(config.get("fit", {}), source=f"retention params {os.fspath(directory)!r}")
        return cls(weights, config["window"], config["chunk"], float(config["carry"]), config["horizon"],
                   config["model_fingerprint"], signature, fit)  # fmt: skip


class _Normal:
    """Ridge-regression sums `X^T X`, `X^T y` of one layer's KV heads."""

    def __init__(self, heads: int, features: int):
        self.xtx = torch.zeros(heads, features, features, dtype=torch.float64)
        self.xty = torch.zeros(heads, features, dtype=torch.float64)

    def add(self, head: int, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.xtx[head] += x.T @ x
        self.xty[head] += x.T @ y

    def solve(self, ridge: float) -> torch.Tensor:
        features = self.xtx.shape[-1]
        penalty = ridge * torch.eye(features, dtype=torch.float64)
        penalty[-1, -1] = 0.0  # the bias is not shrunk
        return torch.linalg.solve(self.xtx + penalty, self.xty.unsqueeze(-1)).squeeze(-1).float()


def _accumulate(normal, query, key, value, scaling, window, chunk, carry, horizon, sinks) -> None:
    """Add one segment of one layer: for every forward of `chunk` queries, the candidates (tokens that left the
    window), their features and the log of the largest weight the next `horizon` queries give them."""
    _, hq, length, _ = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    positions = torch.arange(length, device=query.device)
    for head in range(hkv):
        q = query[0, head * group : (head + 1) * group].float()
        logits = (q @ key[0, head].float().T) * scaling
        weights = logits.masked_fill(causal, float("-inf")).softmax(-1).mean(0)  # [T, T]
        acc = torch.zeros(length, device=query.device)
        for start in range(0, length - chunk, chunk):
            stop = start + chunk
            queries = positions[start:stop]
            sees = queries.view(-1, 1) - window >= positions.view(1, -1)  # [chunk, T]: outside the window
            count = sees.sum(0)
            score = torch.where(sees, weights[start:stop], 0.0).sum(0) / count.clamp(min=1)
            acc = torch.where(count > 0, score + carry * acc, 0.0)
            cand = positions[sinks : max(sinks, stop - window)]
            future = weights[stop : stop + horizon, sinks : max(sinks, stop - window)]
            if cand.numel() == 0 or future.shape[0] < min(horizon, 256):
                continue
            x = retention_features(acc[cand], key[0, head, cand], value[0, head, cand], cand, start)
            normal.add(head, x, torch.log(future.amax(0) + _EPS))


def fit_retention(
    model,
    tokenizer,
    texts: list[str],
    window: int = 64,
    sink_tokens: int = 4,
    chunk: int = 64,
    carry: float = 0.5,
    horizon: int = 2048,
    segment_tokens: int = 4096,
    max_segments: int = 2,
    ridge: float = 1.0,
) -> RetentionParams:
    """Fit the retention score of `tensor_cache`'s retained tokens on the frozen `model` (no gradient).

    The model runs with full attention over `max_segments` segments of `segment_tokens` tokens of `texts`; every
    layer's attention weights (the mean over each KV group's query heads) give, for each forward of `chunk` queries,
    every token that has left the `window` its TOVA score with `carry` and the largest weight the next `horizon`
    queries give it. A ridge regression per layer and KV head predicts the log of the latter from the features of
    [`retention_features`].

    Args:
        model (`PreTrainedModel`): The frozen model (any attention implementation; it is switched for the fit and
            back).
        tokenizer: Its tokenizer.
        texts (`list[str]`): Training text, read in order, cut into segments.
        window, sink_tokens, carry: The `cache_config` the score is for.
        chunk (`int`): Tokens per forward the scores are carried over; the cache must use
            `cache_config["carry_span"]` equal to it (64, the default of both).
        horizon (`int`): Later queries the target looks at.
        segment_tokens (`int`), max_segments (`int`): How much text, as independent segments.
        ridge (`float`): The ridge penalty (the bias is not shrunk).

    Returns:
        [`RetentionParams`]

    Raises:
        `ValueError`: if `segment_tokens` is not longer than `window + chunk + min(horizon, 256)`, or the texts
            hold fewer than `segment_tokens` tokens.
    """
    from tqdm.auto import tqdm
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..hooks.fingerprint import model_fingerprint
    from ..registry import register_attention
    from .tensor_cache_fit import text_segments

    signature = config_signature(model.config)
    layers, hkv, dim = signature["num_hidden_layers"], signature["num_key_value_heads"], signature["head_dim"]
    shortest = window + chunk + min(horizon, 256)
    if segment_tokens <= shortest:
        raise ValueError(
            f"expected segment_tokens > window + chunk + min(horizon, 256) = {shortest} (the fit needs tokens that "
            f"left the window and later queries), got segment_tokens={segment_tokens}."
        )
    segments = text_segments(tokenizer, texts, segment_tokens, max_segments)
    normals = [_Normal(hkv, dim // 2 + 4) for _ in range(layers)]

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        _accumulate(normals[module.layer_idx], query, key, value, scale, window, chunk, carry, horizon, sink_tokens)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    name = "neuralcache_retention_fit"
    register_attention(name, attention)
    before = model.config._attn_implementation
    began = time.perf_counter()
    device = next(model.parameters()).device
    try:
        model.set_attn_implementation(name)
        with torch.no_grad():
            for segment in tqdm(segments, desc="fit_retention", unit="segment"):
                model(segment.unsqueeze(0).to(device), use_cache=False)
    finally:
        model.set_attn_implementation(before)
    weights = {i: normals[i].solve(ridge) for i in range(layers)}
    fit = {"texts": len(texts), "segments": len(segments), "tokens": sum(len(s) for s in segments),
           "sink_tokens": sink_tokens, "ridge": ridge, "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
    return RetentionParams(weights, window, chunk, float(carry), horizon, model_fingerprint(model), signature, fit)
