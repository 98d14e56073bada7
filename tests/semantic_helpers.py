"""Test helpers of the semantic cache (imported by its tests and by their worker processes): a word tokenizer, a
bag-of-words embedder, a stand-in guard, chat prompts and a forward counter."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from hf_neuralcache.semantic.cache import SemanticCache
from hf_neuralcache.testing import ForwardCounter

SPECIAL = {1: "<|im_start|>user", 2: "<|im_end|>", 3: "<|im_start|>assistant", 4: "<|im_start|>system"}
WORDS = ["what", "is", "the", "capital", "of", "france", "germany", "whats", "tell", "me", "today", "be", "brief",
         "a", "pirate", "please", "cache", "explain", "how", "works",
         "fix", "repair", "flat", "bike", "car", "tire", "can", "i", "do", "on", "my"]  # fmt: skip
VOCAB = {**SPECIAL, **{10 + i: w for i, w in enumerate(WORDS)}}
IDS = {w: i for i, w in VOCAB.items()}


class WordTokenizer:
    """Just enough tokenizer: ids <-> words, with chat-template special tokens."""

    all_special_tokens = list(SPECIAL.values())

    def decode(self, ids, **kwargs):
        return " ".join(VOCAB.get(int(i), f"x{int(i)}") for i in ids)


class BagOfWords:
    """A deterministic embedder: hashed bag of words, L2-normalized (so paraphrases sharing words are close)."""

    dim = 64
    fingerprint = "test-bag-of-words-64"

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@dataclass
class Verdict:
    ok: bool
    reason: str = ""


class CountryGuard:
    """A stand-in guard: the country named must agree."""

    def check(self, query, candidate):
        countries = lambda text: {w for w in text.split() if w in ("france", "germany")}  # noqa: E731
        return Verdict(countries(query) == countries(candidate), "country differs")


def chat(question: str, system: str | None = None, history: tuple[tuple[str, str], ...] = ()) -> torch.Tensor:
    """A chat prompt of known words: optional system prompt, earlier (user, assistant) turns, the question."""
    words = lambda text: [IDS[w] for w in text.split()]  # noqa: E731
    ids = []
    if system:
        ids += [IDS["<|im_start|>system"], *words(system), IDS["<|im_end|>"]]
    for user, assistant in history:
        ids += [IDS["<|im_start|>user"], *words(user), IDS["<|im_end|>"]]
        ids += [IDS["<|im_start|>assistant"], *words(assistant), IDS["<|im_end|>"]]
    ids += [IDS["<|im_start|>user"], *words(question), IDS["<|im_end|>"]]
    ids += [IDS["<|im_start|>assistant"]]
    return torch.tensor([ids])


def make(path, **kwargs):
    kwargs = {"embedder": BagOfWords(), "guard": CountryGuard(), "threshold": 0.6, "tokenizer": WordTokenizer(),
              **kwargs}  # fmt: skip
    return SemanticCache(path, **kwargs)


Forwards = ForwardCounter


def ask(model, cache, question, system=None, history=(), **kwargs):
    """generate() on a chat ending with `question` (greedy, 5 tokens unless told)."""
    kwargs = {"max_new_tokens": 5, "do_sample": False, **kwargs}
    return model.generate(chat(question, system, history), semantic_cache=cache, **kwargs)


# ---- direct put/get (no forward pass): requests "explain x<n>", answers that name their request ----------------------
def request(n: int, model, words: tuple[str, ...] = ("explain",)):
    """The parsed generate() call of the chat "explain x<n>" (`n` >= 100 decodes as the word "x<n>")."""
    from hf_neuralcache.hooks.generate import Request

    ids = [IDS["<|im_start|>user"], *[IDS[w] for w in words], n, IDS["<|im_end|>"], IDS["<|im_start|>assistant"]]
    prompt = torch.tensor([ids])
    return Request(prompt, torch.ones_like(prompt), model.generation_config, None, WordTokenizer())


def answer(n: int, prompt: torch.Tensor, length: int = 3) -> torch.Tensor:
    """What generate() would return for request `n`: its prompt, then `length` tokens that say `n`."""
    return torch.cat([prompt, torch.full((1, length), n, dtype=torch.long)], dim=1)


def store(cache, model, n: int, length: int = 3) -> None:
    req = request(n, model)
    cache.put(model, req, answer(n, req.input_ids, length), seconds=0.01)


def served(cache, model, n: int) -> int | None:
    """The request number whose answer a lookup of request `n` got, or `None` on a miss."""
    req = request(n, model)
    out = cache.get(model, req)
    return None if out is None else int(out[0, req.input_ids.shape[1]])


def consistent(cache) -> None:
    """Index labels, records and stored entries agree (no orphan of any kind)."""
    records = cache.records.read_all()
    assert set(cache._labels) == cache.index.labels == set(records)
    assert {r["key"] for r in records.values()} == set(cache.store.keys())


def worker(folder: str, first: int, count: int, others: list[int]) -> dict:
    """One process of the concurrency test: store `count` answers, look up the others' requests meanwhile."""
    from hf_neuralcache.models import tiny_model
    from hf_neuralcache.semantic import LookAlikeGuard

    model = tiny_model("llama")
    cache = make(folder, guard=LookAlikeGuard("strict"))
    cache.refresh_seconds, cache.save_every = 0.0, 4
    wrong, hits = [], 0
    for i in range(count):
        store(cache, model, first + i)
        for n in others[i::count]:
            got = served(cache, model, n)
            hits += got is not None
            if got not in (None, n):
                wrong.append((n, got))
    cache.close()
    return {"wrong": wrong, "hits": hits, "pid": os.getpid()}
