"""Sampled answers: how the inference and semantic caches keep more than one answer to a sampled request.

A `do_sample=True` call has many right answers. A cache that stored one and returned it forever would turn sampling
into a constant, so a sampled request owns `sampled_answers` slots (`k`): the first `k` calls run the model and each
fills a slot; once all `k` are filled, a call gets one of them chosen at random (with PyTorch's global generator, so
`torch.manual_seed` makes the choice repeatable as it makes sampling repeatable). `k = 0` never caches a sampled
call; `k = 1` returns the same stored sample every time.
"""

from __future__ import annotations

import torch

from .fingerprint import digest

__all__ = ["DEFAULT_SAMPLED_ANSWERS", "SampleSlots", "sampled_answers_setting"]

DEFAULT_SAMPLED_ANSWERS = 4
_MOST = 64


def sampled_answers_setting(sampled_answers: int, cache_sampled: bool | None) -> int:
    """The number of answers kept per sampled request, from `sampled_answers` and the older `cache_sampled` switch
    (`False`: 0, `True`: at least 1, `None`: `sampled_answers` as given)."""
    if not isinstance(sampled_answers, int) or isinstance(sampled_answers, bool) or not 0 <= sampled_answers <= _MOST:
        raise ValueError(f"sampled_answers must be an int from 0 to {_MOST}, got {sampled_answers!r}")
    if cache_sampled is None:
        return sampled_answers
    if not isinstance(cache_sampled, bool):
        raise ValueError(f"cache_sampled must be a bool or None, got {cache_sampled!r}")
    return max(sampled_answers, 1) if cache_sampled else 0


class SampleSlots:
    """The slot keys of one request's key: slot 0 is the key itself, slot `i` a digest of it."""

    def __init__(self, store, key: str, count: int):
        self.store, self.keys = store, [key] + [digest("sample-slot", key, i) for i in range(1, max(count, 1))]

    def filled(self) -> list[str]:
        """The keys of the slots holding an answer (slots fill in order: the first empty one ends the list)."""
        found = []
        for key in self.keys:
            if not self.store.contains(key):
                break
            found.append(key)
        return found

    def pick(self) -> str | None:
        """A random filled slot's key when every slot is filled, else `None` (the call runs the model)."""
        filled = self.filled()
        if len(filled) < len(self.keys):
            return None
        return filled[int(torch.randint(len(filled), (1,)).item())]

    def free(self) -> str | None:
        """The key of the first empty slot, or `None` when all are filled."""
        filled = self.filled()
        return self.keys[len(filled)] if len(filled) < len(self.keys) else None

    @staticmethod
    def all_keys(key: str) -> list[str]:
        """Every slot key a request could have (to remove all its answers)."""
        return [key] + [digest("sample-slot", key, i) for i in range(1, _MOST)]
