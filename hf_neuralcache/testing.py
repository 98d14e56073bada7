"""Helpers for checking caches: an independent band-plus-sinks reference and a strict comparison.

Used by the test suite and the benchmarks; also handy to check a cache on your own model. The reference does not
use any cache code: it runs the model once over the whole sequence with an explicit 4D mask.
"""

from __future__ import annotations

import functools

import torch

from .registry import CACHE_KWARG  # "cache" from transformers 5.24, else "past_key_values"

__all__ = [
    "ForwardCounter",
    "assert_close",
    "assert_same_generation",
    "band_sink_mask",
    "cached_logits",
    "random_layout",
    "reference_logits",
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    """Fail with max-abs and relative error when `actual` and `expected` differ by more than `atol`."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs()
    rel = diff.norm() / expected.double().norm().clamp_min(1e-30)
    assert diff.max() <= atol, f"{what}: max abs error {diff.max():.3e} > {atol:.1e} (relative {rel:.3e})"


def band_sink_mask(padding: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """`[B, 1, T, T]` bool: query i sees key j iff j <= i, j is real, and (i - j < window or j is a sink).

    The sinks of a row are its first `sinks` real tokens. Written without the package's code on purpose.
    """
    batch, length = padding.shape
    rank = padding.long().cumsum(-1) - 1  # index of each real token among its row's real tokens
    i = torch.arange(length).view(1, length, 1)
    j = torch.arange(length).view(1, 1, length)
    is_sink = (padding & (rank < sinks)).view(batch, 1, length)
    seen = (j <= i) & padding.view(batch, 1, length) & (((i - j) < window) | is_sink)
    return seen.unsqueeze(1)


def reference_logits(model, input_ids, padding, window, sinks):
    """Logits of a full-attention forward (no cache) under the band-plus-sinks mask."""
    mask = band_sink_mask(padding, window, sinks)
    if model.config._attn_implementation == "eager":
        mask = torch.where(mask, 0.0, torch.finfo(model.dtype).min).to(model.dtype)
    position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids, attention_mask=mask, position_ids=position_ids).logits


def cached_logits(model, cache, input_ids, padding, chunks):
    """Logits of feeding `input_ids` through `cache` in chunks of the given sizes."""
    out, start = [], 0
    position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for size in chunks:
            stop = start + size
            logits = model(
                input_ids[:, start:stop],
                attention_mask=padding[:, :stop].long(),
                position_ids=position_ids[:, start:stop],
                **{CACHE_KWARG: cache},
            ).logits
            out.append(logits)
            start = stop
    assert start == input_ids.shape[1]
    return torch.cat(out, 1)


def assert_same_generation(model, input_ids, new_tokens: int, atol: float, **cache_kwargs):
    """Greedy `generate` with `cache_kwargs` gives the tokens of transformers' default cache, logits within `atol`.

    Returns the `GenerateDecoderOnlyOutput` of the run with `cache_kwargs`.
    """
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref = model.generate(input_ids, **kwargs)
    out = model.generate(input_ids, **cache_kwargs, **kwargs)
    assert torch.equal(out.sequences, ref.sequences), "generated tokens differ"
    for step, (a, b) in enumerate(zip(ref.logits, out.logits, strict=True)):
        finite = torch.isfinite(a)  # min_new_tokens puts -inf on the end-of-sequence token
        assert_close(b[finite], a[finite], atol, f"logits of step {step}")
    return out


def random_layout(batch: int, keys: int, queries: int, sinks: int, seed: int = 0, device=None, holes: bool = True):
    """A cache-like key layout for kernel tests and benchmarks: `(slots, valid, sink, q_slots)`.

    Each row holds `sinks` sink positions, a ring of recent positions in a shuffled order and `queries` new
    positions (the queries' own); with `holes` about 10% of the entries are padding and two are empty (`-1`).
    History is `2 * keys` tokens long, so a window shorter than `keys` leaves keys outside the band.
    """
    generator = torch.Generator().manual_seed(seed)
    history = 2 * keys
    ring = keys - queries - sinks
    if ring < 0:
        raise ValueError(f"expected keys >= queries + sinks, got keys={keys}, queries={queries}, sinks={sinks}")
    rows = []
    for _ in range(batch):
        recent = torch.arange(history - ring, history)[torch.randperm(ring, generator=generator)]
        rows.append(torch.cat([torch.arange(sinks), recent, torch.arange(history, history + queries)]))
    slots = torch.stack(rows)  # [B, K]
    valid = torch.ones(batch, keys, dtype=torch.bool)
    if holes:
        valid = torch.rand(batch, keys, generator=generator) > 0.1
        empty = torch.randint(sinks, max(sinks + 1, keys - queries), (batch, 2), generator=generator)
        slots.scatter_(1, empty, -1)
        valid.scatter_(1, empty, False)
    sink = (slots < sinks) & (slots >= 0)
    q_slots = torch.arange(history, history + queries)
    return tuple(t.to(device) for t in (slots, valid, sink, q_slots))


class ForwardCounter:
    """Counts `model`'s forward calls and the tokens each computes, as a context manager.

    It wraps the instance's `forward` rather than registering a forward hook: a model with forward hooks bypasses
    the generate() hooks' caches (their effect cannot be keyed), which is not what a test that counts wants.
    """

    def __init__(self, model):
        self.model, self.lengths = model, []
        original = model.forward

        @functools.wraps(original)  # generate() reads forward's signature
        def counting(*args, **kwargs):
            ids = kwargs.get("input_ids")
            ids = ids if ids is not None else (args[0] if args else kwargs.get("inputs_embeds"))
            self.lengths.append(ids.shape[1] if ids is not None else 0)
            return original(*args, **kwargs)

        model.forward = counting

    @property
    def count(self) -> int:
        return len(self.lengths)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.model.__dict__.pop("forward", None)
