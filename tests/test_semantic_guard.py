"""LookAlikeGuard: each rule at each strictness on hand-written pairs, paraphrases that must pass, and its contract."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from hf_neuralcache.semantic import STRICTNESS, GuardVerdict, LookAlikeGuard, normalize_query
from hf_neuralcache.semantic.guard import _analyse, stem

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (query, candidate, reason the strict guard gives or None when it accepts, whether the balanced guard accepts)
LOOK_ALIKES = {
    "numbers": ("What is 15% of 200?", "What is 20% of 150?", "numbers differ: ['15', '200'] vs ['150', '20']", False),
    "number-words": ("Name five rivers in Asia", "Name six rivers in Asia", "numbers differ: ['5'] vs ['6']", False),
    "ordinals": ("Who was the first man on the Moon?", "Who was the second man on the Moon?", "numbers differ", False),
    "roman": ("When did World War I end?", "When did World War II end?", "numbers differ: ['1'] vs ['2']", False),
    "year-added": ("Who painted the Mona Lisa?", "Who stole the Mona Lisa in 1911?", "numbers differ", False),
    "entity": ("What is the capital of France?", "What is the capital of Germany?", "names differ: ['France']", False),
    "acronym": ("What does HTTP stand for?", "What does HTTPS stand for?", "names differ: ['HTTP']", False),
    "quoted": ("Define 'ephemeral'.", "Define 'ethereal'.", "names differ: ['ephemeral']", False),
    "identifier": ("How do I use os.path.join?", "How do I use os.path.split?", "names differ", False),
    "negation": ("Is coffee bad for your health?", "Isn't coffee bad for your health?", "negation", False),
    "without": ("Can I take ibuprofen with food?", "Can I take ibuprofen without food?", "negation", False),
    "question-kind": ("When did the Berlin Wall fall?", "Why did the Berlin Wall fall?", "question kinds", False),
    "unit-direction": ("Convert 5 km to miles", "Convert 5 miles to km", "direction reversed: 'to'", False),
    "type-direction": (
        "How do I convert a string to an integer in JavaScript?",
        "How do I convert an integer to a string in JavaScript?",
        "direction reversed",
        False,
    ),
    "vs-order": ("Compare TCP vs UDP", "Compare UDP vs TCP", "direction reversed: 'vs'", True),
    "than": ("Is Python faster than Java?", "Is Java faster than Python?", "direction reversed: 'than'", False),
    "substitution": ("How do I sort a dict by value?", "How do I sort a dict by key?", "different words", False),
    "antonym": ("What is the boiling point of water?", "What is the freezing point of water?", "different", False),
    "frame-vs-content": ("Write a poem about cats", "Read a poem about cats", "different words", False),
    "role-swap": ("Did Alice marry Bob?", "Did Bob marry Alice?", "order differs", False),
    "same-words-reordered": ("In 2010 the new park opened", "The new park opened in 2010", "order differs", True),
    "voice": ("Does Alice love Bob?", "Is Alice loved by Bob?", "voice differs", True),
    "extra-words": ("How do I center a div?", "How do I center a div vertically with flexbox?", "extra words", True),
    # issue 11: a stem that begins another ("stor" / "storm") is not the same word unless a suffix follows
    "prefix-not-suffix": (
        "Write a short story about a stormy submarine who lives in Hanoi.",
        "Write a short story about a velvet submarine who lives in Hanoi.",
        "different words: ['stormy'] vs ['velvet']",
        False,
    ),
    "compound": ("How do I grow a pine in a pot?", "How do I grow a pineapple in a pot?", "different words", False),
    "non-prefix": (
        "How many days does February have in a leap year?",
        "How many days does February have in a non-leap year?",
        "negation differs: ['non-'] in the candidate only",
        False,
    ),
    "non-unhyphenated": ("Is a leap year divisible by 4?", "Is a non leap year divisible by 4?", "negation", False),
    "un-prefix": ("Is this policy American?", "Is this policy un-American?", "negation differs: ['un-']", False),
    "anti-prefix": ("Is aspirin an inflammatory drug?", "Is aspirin an anti-inflammatory drug?", "negation", False),
    "hyphenated-qualifier": (
        "What are the benefits of yogurt for children?",
        "What are the benefits of low-fat yogurt for children?",
        "qualifier differs: ['low-fat'] in the candidate only",
        True,
    ),
    "qualifier-adjective": ("Describe a sunny beach at dawn.", "Describe a stormy beach at dawn.", "different", False),
    "qualifier-color": ("Draw a red dragon with wings.", "Draw a golden dragon with wings.", "different words", False),
}
PARAPHRASES = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("What is 15% of 200?", "Calculate fifteen percent of 200."),
    ("What year did World War II end?", "When did the Second World War end?"),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by whom?"),
    ("Does Alice love Bob?", "Is Bob loved by Alice?"),
    # a participle inside a quoted title is no passive ("Heaven' by"): no voice change to refuse
    ("What is 'Stairway to Heaven' by Led Zeppelin about?",
     "Explain the meaning of 'Stairway to Heaven' by Led Zeppelin."),
    ("Tell me a joke about cats.", "Do you know a joke about cats?"),
    ("Write a haiku about autumn.", "Compose a haiku on the theme of autumn."),
    ("What is the GDP of Germany?", "How large is Germany's gross domestic product?"),
    ("What is the speed of light?", "How fast is light?"),
    ("How do I sort a dictionary by value in Python?", "Sort a Python dict by its values - how?"),
    ("Convert 5km to miles", "convert 5 kilometers to miles"),
    ("Translate 'good morning' into Spanish.", "How do you say 'good morning' in Spanish?"),
    ("List the countries in Scandinavia.", "Name the Scandinavian countries."),
    # derived forms and clipped words are still one word; a negating prefix in both texts is no difference
    ("Write a short story about a stormy night.", "Write a short story about a stormy night, please."),
    ("Who is the prosecutor in the trial?", "Who is prosecuting the trial?"),
    ("Which languages are spoken in Sri Lanka?", "Which languages do Sri Lankans speak?"),
    ("How do I merge two dicts in Python?", "How do I merge two dictionaries in Python?"),
    ("How many days does a non-leap year have?", "How many days are in a non-leap year?"),
    ("How do I send an e-mail with Python?", "How do I send an email with Python?"),
]


def ids(cases):
    return [re.sub(r"\W+", "-", a)[:40] for a, *_ in cases]


@pytest.mark.parametrize("name", list(LOOK_ALIKES))
def test_strict_refuses_each_kind_of_look_alike_and_names_it(name):
    query, candidate, reason, _ = LOOK_ALIKES[name]
    verdict = LookAlikeGuard("strict").check(query, candidate)
    assert not verdict.ok and not verdict
    assert verdict.reason.startswith(reason), verdict.reason


@pytest.mark.parametrize("name", list(LOOK_ALIKES))
def test_balanced_relaxes_only_order_voice_extra_words_and_vs(name):
    query, candidate, _, balanced_accepts = LOOK_ALIKES[name]
    verdict = LookAlikeGuard("balanced").check(query, candidate)
    assert verdict.ok == balanced_accepts, verdict.reason
    if not balanced_accepts:  # the rules both strictnesses share fire first, with the same reason
        assert verdict == LookAlikeGuard("strict").check(query, candidate)


@pytest.mark.parametrize(("query", "candidate"), PARAPHRASES, ids=ids(PARAPHRASES))
@pytest.mark.parametrize("strictness", STRICTNESS)
def test_true_paraphrases_pass_at_every_strictness(query, candidate, strictness):
    verdict = LookAlikeGuard(strictness).check(query, candidate)
    if strictness == "order" and candidate == "Is Bob loved by Alice?":  # a passive that moves the roles: passes
        assert verdict.ok  # "order" as both are requests (the classifier reads their roles); refused as statements:
        assert LookAlikeGuard("order").check("Alice loves Bob.", "Bob is loved by Alice.").reason == (
            "order differs: shared words swap roles"
        )  # (the PAWS precision it buys)
        return
    assert verdict == GuardVerdict(True, ""), verdict.reason


def test_off_accepts_everything():
    guard = LookAlikeGuard("off")
    assert all(guard.check(a, b).ok for a, b, _, _ in LOOK_ALIKES.values())


@pytest.mark.parametrize("strictness", ["strict", "balanced"])
def test_verdicts_are_symmetric_and_deterministic(strictness):
    pairs = [(a, b) for a, b, _, _ in LOOK_ALIKES.values()] + PARAPHRASES
    first, second = LookAlikeGuard(strictness), LookAlikeGuard(strictness, memo_size=0)
    for a, b in pairs:
        verdict = first.check(a, b)
        assert verdict == first.check(a, b) == second.check(a, b)  # memoized or not, same answer
        assert first.check(b, a).ok == verdict.ok, (a, b)


def test_numbers_words_and_units_are_read_as_values():
    guard = LookAlikeGuard()
    assert guard.check("Convert 1,000 meters to feet", "Convert 1000 m to ft").ok
    assert guard.check("What is two hundred fifty divided by 5?", "What is 250 divided by five?").ok
    assert guard.check("Who won the 3rd race?", "Who won the third race?").ok
    assert not _analyse("Wait a second, please").numbers and _analyse("on the second day").numbers == {"2": 1}
    assert not guard.check("What is 1234567 squared?", "What is 1234568 squared?").ok  # no float formatting collision
    assert not _analyse("Which version of Python I have?").numbers  # the pronoun, not a Roman numeral
    assert _analyse("World War I ended in 1918").numbers == {"1": 1, "1918": 1}


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="expected strictness in"):
        LookAlikeGuard("lenient")
    with pytest.raises(ValueError, match="memo_size"):
        LookAlikeGuard(memo_size=-1)
    with pytest.raises(ValueError, match="expected two strings"):
        LookAlikeGuard().check("a question", None)


def test_normalization_and_stems():
    assert normalize_query("  What\u2019s   the\ncapital\u00a0of France? ") == "What's the capital of France?"
    assert {stem(w) for w in ("written", "writes", "wrote")} == {"writ"}
    assert stem("dehydration") == stem("dehydrated")
    assert stem("speed") == "speed" and stem("values") == stem("value") and stem("miles") == stem("mile")


def test_a_check_takes_microseconds():
    pairs = [(a, b) for a, b, _, _ in LOOK_ALIKES.values()] + PARAPHRASES
    guard = LookAlikeGuard()
    start = time.perf_counter()
    for a, b in pairs:
        guard.check(a, b)  # first time: both texts analysed
    cold = (time.perf_counter() - start) / len(pairs)
    start = time.perf_counter()
    for _ in range(20):
        for a, b in pairs:
            guard.check(a, b)
    warm = (time.perf_counter() - start) / (20 * len(pairs))
    assert cold < 2e-3 and warm < 2e-4, (cold, warm)  # measured about 1e-4 and 1.5e-5 s on a shared CPU


def test_refuses_every_look_alike_of_the_llm_dev_pairs():
    path = DATA / "llm_query_pairs_dev.tsv"
    if not path.is_file():
        pytest.skip(f"shared data folder not found: {path}")
    from hf_neuralcache.semantic import load_pairs

    pairs = load_pairs(path)
    guard = LookAlikeGuard()
    accepted = [(a, b) for a, b, label in pairs if label == 0 and guard.check(a, b).ok]
    assert accepted == []
    # the guard alone (no cosine threshold) keeps about two thirds of the same-request pairs
    kept = sum(guard.check(a, b).ok for a, b, label in pairs if label == 1)
    assert kept >= 24
