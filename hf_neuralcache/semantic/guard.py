"""The look-alike guard: after the nearest-neighbour search, check that the candidate asks the *same* thing.

Sentence embeddings place "What is the capital of France?" near "... of Germany?", and "Convert 5 km to miles" nearer
still to "Convert 5 miles to km". A look-alike differs from its request in a **slot**: a number, a name, a negation,
the direction of a relation, the kind of question, the order of the roles, or a content word put in place of another.
A paraphrase rewords the frame around the same slots. [`LookAlikeGuard`] compares the slots of the two texts with
precompiled regular expressions, word tables and a word lexicon distilled from WordNet 3.0
([`hf_neuralcache.semantic.lexicon`]: which words and 2-3 word phrases can replace each other, and their parts of
speech): pure Python, deterministic, about 40 microseconds to analyse a short request (memoized per text) and 0.1 to
0.3 ms to compare two texts. Nothing is learned from the evaluation data: the rules and tables are general English
(function words, irregular verbs, number words, units, dimension adjectives) and WordNet's word relations.

**Analysis of a text.** Unicode NFKC, straight quotes, single spaces ([`normalize_query`]); words are lower-cased and
reduced to a light stem ([`stem`]: irregular forms from a table, a plural "s", one common suffix, a final "e"/"y":
"written" -> "writ", "dehydration" and "dehydrated" -> "dehydr"). It yields:

- **numbers**: digits (`1,000`, `3.5`, `-2`, `5km`), number words ("fifteen", "two hundred"), ordinals ("second",
  "2nd"; not "a second"), Roman numerals after a capitalized word ("World War II"); `%` reads "percent" and unit
  abbreviations read as the unit ("km" = "kilometers").
- **names**: capitalized words that do not open a sentence, acronyms (`HTTP`, anywhere), quoted strings
  (`'good morning'`) and code identifiers (`os.path`, `snake_case`, `camelCase`, `sqrt(`).
- **negation**: not, no, never, none, nothing, nobody, neither, nor, without, cannot, `n't`.
- **question kind**: who (person), when / what year (time), where (place), why / what makes (reason), "how do" /
  "how to", "how X works" (manner), "how far" / "how many" (degree). "what" and "which" alone fit any kind.
- **content words**: stems left after function words ("the", "is", "how", "many", "please", "way", ...). "How fast"
  reads as "speed", "how far" as "distance" (a dimension table); "the number of" is framing, and so are a few common
  rewordings of a request: "the formula for" (= calculate), "the meaning of" and "the word" before a quoted one (=
  define), "good"/"best" after a determiner ("a good name for" = suggest a name for); "tallest" reads as "highest",
  "boiling/freezing/melting point" as "temperature", "short for", "full form", "abbreviation" as "stand for";
  "what does X mean" as "define X", "get X out of" as "remove X from", "keep X from" as "stop X from", "how long
  should/does" and "how many minutes/hours/..." as a duration (the unit kept), "18 times 7" as "multiplied", "full
  name" as "stand for", "US" (in capitals) as the country "USA", not the pronoun.
  Request verbs opening a sentence or following "can you", "please", "how do I"... ("explain", "tell", "list",
  "write", "make") are *frame* words.
- **relations**: for each directional word (to, into, from, than, onto, towards, over, vs/versus), the content stems
  before and after it in its sentence; and whether the text is in the passive voice ("was written by").

**Checks**, in this order; the verdict names the first that fails:

| check | `"balanced"` | `"strict"` (default) |
|---|---|---|
| numbers equal (as multisets; "half", "twice" count as numbers; a 1 said "one" or "single" may be "a") | yes | yes |
| each name of one text is in the other (stem, prefix, initials, WordNet synonym: "UK" / "United Kingdom") | yes | yes |
| negation in both texts or in neither | yes | yes |
| the same negating prefixes ("non-leap", "un-American", "anti-inflammatory", "non leap") | yes | yes |
| the tense of a question's opening auxiliary agrees when both have one ("Is" / "Was X ...") | yes | yes |
| a "who" question asks for the same role ("Who did X teach?" / "Who taught X?") | yes | yes |
| question kinds agree when both texts have one | yes | yes |
| no relation reversed: slots on opposite sides of one marker ("X to Y" / "Y into X") (1) | yes, vs excluded | yes |
| no opposite particles ("on"/"off", "up"/"down", "in"/"out", "more"/"less", "for"/"against", ...) | yes | yes |
| no substitution: not both texts hold content words the other lacks (2) | yes | yes |
| shared slots in the same order up to one moved block, unless only one text is passive | yes | yes |
| texts sharing >= 90% of their words: slots in exactly the same order | no | yes |
| one verb passive in one text only while the roles keep their places ("A loves B" / "A is loved by B") | no | yes |
| no hyphenated qualifier in one text only ("yogurt" / "low-fat yogurt") | no | yes |
| no added qualifier (3) | no | yes |
| at most one extra content word (frame words not counted) in either text | no | yes |
| no extra verb in the place of "get" before the same object ("renew a passport" / "get a passport") | no | yes |

(1) or the same slot after opposite markers ("into French" / "from French"). (2) Frame words pair only together; a
word is not lacking when the other text has a WordNet synonym or phrase for it ("remove" / "delete", "get rid of" /
"eliminate"), but a word both texts have stands for no other word ("Write a sonnet" / "Write a limerick": "sonnet"
is not matched with "write") unless a phrase holds it ("chemical formula" / "formula"); a word that is another plus
a suffix matches it ("recycle" / "recyclable") unless WordNet lists both as different words of one part of speech
("seed" / "seedling"). (3) With the lexicon: a noun, adjective or participle ("a used car") right before a shared
noun ("vegan chocolate cake"), a word put inside two shared ones ("doubly linked list"), a prepositional phrase or a
condition ("while", "when", "if", "unless" not opening the request) that shares nothing with the other text, up to
the next preposition ("in captivity", "in color from my phone", "while pregnant", "when it is hot"), or a compound
that WordNet lists as its own entry, made with a shared word ("time zone" / "time").

`"vetoes"` runs only the checks up to and including the particles (numbers, names, negation, negating prefixes,
question kind, reversed relation, particles; no lexicon): the hard vetoes that [`EquivalenceCheck`] keeps in front
of its learned score. `"order"` runs the vetoes, then refuses one verb in the active in one text and the passive in
the other with the roles in their places ("Which composers influenced X?" / "Which composers were influenced by
X?"), and then, unless both texts are requests (a question or an instruction: ending with "?" or opening with a
question word, an auxiliary or a request verb), the two word-order checks (shared words that swap roles, voice or
not; the same words in another order; with the lexicon's synonyms standing for their partners), and no word
matching: what [`PairClassifier`] keeps in front of its cross-encoder, which judges the wording and the roles of
requests (it was trained on their swaps) but not PAWS-style statements.
`"off"` accepts every candidate (plain cosine). Words match by stem; a stem of 4+ letters also
matches one that is it plus a suffix ("Scandinavia" / "Scandinavian", "east" / "eastern", a doubled consonant:
"travel" / "travelled"), but not one it merely begins ("story" / "stormy": "stor" / "storm"; "pine" / "pineapple").
Common clipped words read as their full form ("dict" = "dictionary", "repo" = "repository"), and a hyphenated word
matches it written as one ("e-mail" / "email"). The order rules stop PAWS-style swaps ("A represented B" / "B
represented A"): when two texts use the same words, only their order can tell them apart, while a reworded
paraphrase may move one block ("Who wrote X?" / "X was written by whom?"), and a passive reverses the roles ("Bob is
loved by Alice"). The extra-word budget stops most specializations ("center a div" / "center a div vertically with
flexbox"). All of this also refuses true paraphrases that use words WordNet does not list as synonyms ("kill" /
"replace", "point" / "temperature"), reorder the same words, or add several words: the price of precision. It
parses no grammar, so a look-alike that changes a word into a function word, adds a qualifier in a form the rules
above do not see, or swaps words WordNet files as synonyms ("freezing point" / "melting point") still passes. A name
that WordNet knows as a common word matches its synonym ("Earth" / "world"). Measured figures are in
docs/semantic_cache.md.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("hf_neuralcache.semantic")

__all__ = ["STRICTNESS", "GuardVerdict", "LookAlikeGuard", "normalize_query", "stem"]

STRICTNESS = ("strict", "balanced", "order", "vetoes", "off")


def _set(words: str) -> frozenset:
    return frozenset(words.split())


_FUNCTION = _set(
    """a an the this that these those of in on at for by with about as then and or but if so such is are was were be
    been being am do does did done doing have has had having can could would should will shall may might must i me my
    mine myself we us our you your yours he him his she her it its they them their there here what which who whom whose
    how why when where whats hows whos s some any all each every both other another own same very really just only also
    too more most much many lot lots way ways step steps please kindly thanks thank hi hello hey someone something
    anything thing things one ones like get got need want let within via per etc ok okay between among through during
    since until while whether upon"""
)
_DIRECTIONS = _set("to into from than onto towards toward over vs versus")
_DETERMINERS = _set("a an the my your his her its our their this that these those some any")
_PREPOSITIONS = _set("in on at for with without during after before under inside outside near since until")
# opposite words that are function words elsewhere: "sign in to" / "sign out of", "more bitter" / "less bitter"
_OPPOSITE_PARTICLES = (
    ("on", "off"), ("up", "down"), ("in", "out"), ("more", "less"), ("more", "fewer"), ("most", "least"),
    ("much", "little"), ("many", "few"), ("for", "against"),
)  # fmt: skip
# words that open a condition on the request: "... while pregnant", "... if I have diabetes" (not at the start)
_CONDITIONS = _set("while whilst when whenever if unless once")
# the light verb that a content verb in the same place with the same object replaces: "get" / "renew a passport"
_GET = _set("get gets got getting gotten")
# parts and multiples of a quantity, read as numbers: "half an avocado" is not "an avocado"
# ("quarter" is not one: "quarterfinal", "a quarter of an hour", "the first quarter"; nor "half-life")
_FRACTIONS = {"half": 0.5, "halves": 0.5, "twice": 2.0, "thrice": 3.0}
# markers that point the same way, recorded as one: "X to Y" = "X into Y", "versus" = "vs"
_SAME_WAY = {"into": "to", "onto": "to", "towards": "to", "toward": "to", "versus": "vs"}
_NEGATIONS = _set("not no never none nothing nobody neither nor without cannot n't")
# a prefix that negates the word it is hyphenated to ("non-leap", "anti-war", "un-American"); "non" alone too
_NEGATING_PREFIXES = _set("non un anti counter contra dis in im il ir de a")
# clipped forms read as their full word ("dict" = "dictionary"); not "min" (minutes) nor "max" alone
_CLIPPED = {
    "dict": "dictionary", "dicts": "dictionary", "info": "information", "config": "configuration",
    "repo": "repository", "repos": "repository", "app": "application", "apps": "application",
    "spec": "specification", "specs": "specification", "stats": "statistics", "env": "environment",
    "lib": "library", "libs": "library", "auth": "authentication", "admin": "administrator", "math": "mathematics",
    "maths": "mathematics", "exam": "examination", "lab": "laboratory", "photo": "photograph",
    "photos": "photograph", "doc": "document", "docs": "document", "func": "function", "param": "parameter",
    "params": "parameter", "arg": "argument", "args": "argument", "dir": "directory", "intro": "introduction",
    "demo": "demonstration", "temp": "temperature", "bike": "bicycle", "fridge": "refrigerator",
}  # fmt: skip
_FRAME_VERBS = _set(
    """tell give show explain describe define list name summarize summarise write compose provide say know find
    calculate compute recommend suggest teach help generate create make draft translate"""
)
_OPENERS = _set("can could would will you please kindly i want need to me do does help just how")
# the first words of a request (a question or an instruction), as opposed to a statement
_REQUEST_OPENERS = _FRAME_VERBS | _set(
    """what whats which who whom whose when where why how is are was were do does did can could would will should
    shall may might must has have had am please kindly"""
)
_FRAME_NOUNS = _set("number amount kind type")  # "the number of legs": framing when followed by "of"
_WH_KIND = {"who": "person", "whom": "person", "whose": "person", "when": "time", "where": "place", "why": "reason"}
_WH_NOUNS = {"year": "time", "date": "time", "day": "time", "month": "time", "century": "time", "time": "time",
             "place": "place", "location": "place", "person": "person"}  # fmt: skip
_DIMENSIONS = {"fast": "speed", "quick": "speed", "far": "distance", "tall": "height", "high": "height", "big": "size",
               "large": "size", "old": "age", "heavy": "weight", "deep": "depth", "wide": "width", "hot": "temperature",
               "cold": "temperature", "warm": "temperature", "expensive": "price", "often": "frequency"}  # fmt: skip
_HOW_CLAUSE = _set("a an the my your his her its our their this these those")  # "how a fridge works": manner
_WORKS = _set("work works function functions operate operates")  # "how mortgage schedules work": manner too
_DEGREE_WORDS = frozenset(_DIMENSIONS) | _set("much many long")
_CAUSES = _set("makes make made causes cause caused")  # "what makes X blue" asks why
_DURATION_AUX = _set("do does did should can could will would must to")  # not "is": "how long is the Nile"
_TIME_UNITS = _set("time seconds minutes hours days weeks months years second minute hour day week month year")
# one way of asking put another way, word by word (see `_reword`)
_TALL = {"tall": "high", "taller": "higher", "tallest": "highest"}  # "the tallest mountain" / "the highest mountain"
# "a good name for" / "suggest a name for", "the ideal temperature": framing after a determiner
_PRAISE = _set("good best great ideal right proper correct recommended")
_FRAME_BEFORE = _set("formula meaning definition")  # "the formula for X" asks to calculate X, "the meaning of X"
_POINTS = _set("boiling freezing melting")  # "the boiling point of X" / "at what temperature does X boil"
_AUX = _set("do does did can could should would will is are was were to i you we one")
_UNITS = {
    "km": "kilometer", "kms": "kilometer", "kilometre": "kilometer", "mi": "mile", "m": "meter", "metre": "meter",
    "cm": "centimeter", "centimetre": "centimeter", "mm": "millimeter", "kg": "kilogram", "g": "gram", "lb": "pound",
    "lbs": "pound", "oz": "ounce", "ft": "foot", "l": "liter", "litre": "liter", "ml": "milliliter", "h": "hour",
    "hr": "hour", "hrs": "hour", "min": "minute", "mins": "minute", "s": "second", "sec": "second", "mph": "mile hour",
    "kmh": "kilometer hour", "c": "celsius", "f": "fahrenheit", "gb": "gigabyte", "mb": "megabyte", "kb": "kilobyte",
    "kj": "kilojoule", "kcal": "kilocalorie", "cal": "calorie", "tbsp": "tablespoon", "tsp": "teaspoon",
}  # fmt: skip
_IRREGULAR = {  # base form first; rows separated by "|" or a new line
    form: row.split()[0]
    for row in """write wrote written|run ran|begin began begun|buy bought|bring brought|think thought|teach taught
    catch caught|fight fought|seek sought|make made|say said|pay paid|find found|build built|send sent|spend spent
    lose lost|leave left|feel felt|keep kept|sleep slept|meet met|sell sold|tell told|hold held|stand stood
    understand understood|speak spoke spoken|break broke broken|choose chose chosen|freeze froze frozen
    steal stole stolen|drive drove driven|ride rode ridden|rise rose risen|give gave given|take took taken
    eat ate eaten|fall fell fallen|forget forgot forgotten|see saw seen|know knew known|grow grew grown
    throw threw thrown|fly flew flown|draw drew drawn|go went gone|sing sang sung|drink drank drunk|swim swam swum
    win won|sit sat|hide hid hidden|bite bit bitten|shake shook shaken|wear wore worn|tear tore torn|lead led
    bear bore born borne|feed fed|hear heard|mean meant|deal dealt|shoot shot|die died dying|lie lay lain
    person people persons|child children|man men|woman women|mouse mice|foot feet|tooth teeth|goose geese
    leaf leaves|life lives|knife knives|wife wives|half halves""".replace("\n", "|").split("|")
    for form in row.split()
}
# one of these goes (longest first) when at least 4 letters with a vowel remain (3 for -ing and -ed)
_SUFFIXES = sorted(
    """ational ization isation fulness iveness ation ition ment ness ingly ing edly ated ating ate ed ity ive ence ance
    ency ancy ent ion ize ized izing ise ised ising ically ical ic al ly ful est ist ism ous""".split(),
    key=len,
    reverse=True,
)
# what may follow a word that another begins for the two to count as one word ("Scandinavia-n", "east-ern",
# "prosecut-or"), also with the final "e" or "y" that the stem drops ("legislat-ur(e)"); not "stor-m" ("story" /
# "stormy") nor compounds ("pine-apple")
_DERIVATIONS = _set(
    """s es n an ian ean ese ish ern er or ar ary ic ics ical al ial ist ism ite ive ure able ible ward wards ion ation
    ition ment ness ity ous ful less ly ing ed ize ise"""
) | frozenset(_SUFFIXES)
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS.update({w: 10 * i for i, w in enumerate(_TENS, 2)})
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000, "dozen": 12}
_ORDINALS = {
    w: i
    for i, w in enumerate(
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
        "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split(),
        1,
    )
}
_SECOND_UNIT = _set("a per each every few one split")  # "a second" is time, not an ordinal
_ONE_PRONOUN = _set("which the this that each any every no another someone")  # "which one" is not a number
_ROMAN = re.compile(r"^(?=[MDCLXVI])M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})$")
_ROMAN_VALUES = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}

_QUOTED = re.compile(r"(?<!\w)'([^'\n]{1,80})'(?!\w)|\"([^\"\n]{1,80})\"|`([^`\n]{1,80})`")
# dotted.names, snake_case, _private, camelCase, call(
_IDENTIFIER = re.compile(
    r"\b(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w+)+|[A-Za-z]\w*_\w*|_\w+|[a-z]+[A-Z]\w*|[A-Za-z_]\w*(?=\())"
)
_TOKEN = re.compile(r"-?\d+(?:[.,]\d+)*[^\W\d_]*|%|[^\W\d_]+(?:'[^\W\d_]+)?|[.!?;:]")
_NUMERIC = re.compile(r"-?\d+(?:[.,]\d+)*")
_HYPHENATED = re.compile(r"(?<![\w-])([^\W\d_]+)-[^\W\d_]+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_VOWEL = re.compile(r"[aeiouy]")
_SPACES = re.compile(r"\s+")
_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2212": "-"})


def normalize_query(text: str) -> str:
    """Unicode NFKC, straight quotes, single spaces, stripped: the form in which a request is compared."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).translate(_TRANSLATE)).strip()


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Light stem of a lower-case word: "written" -> "writ", "dehydration" / "dehydrated" -> "dehydr", "miles" -> "mil".

    Irregular forms from a table, then a plural or third-person "s", then at most one common suffix, then a final
    "e" or "y". Deterministic and consistent, not a dictionary form.
    """
    word = _IRREGULAR.get(word, word)
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes")) or (word.endswith("ses") and len(word) > 4):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is", "ous")):
        word = word[:-1]
    for suffix in _SUFFIXES:
        base = word[: -len(suffix)]
        if not word.endswith(suffix) or len(base) < (3 if suffix in ("ing", "ed") else 4) or not _VOWEL.search(base):
            continue
        if suffix == "ed" and base.endswith("e"):  # speed, need
            continue
        word = base[:-1] if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "aeiouls" else base
        break
    if (len(word) > 3 and word[-1] == "e") or (len(word) > 4 and word[-1] == "y"):
        word = word[:-1]
    return word


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's answer for one (query, candidate) pair; true when the candidate may be served.

    Attributes:
        ok (`bool`): Whether the candidate may be served for the query.
        reason (`str`): What disagreed ("numbers differ: ['5'] vs ['6']"); empty when `ok`.
    """

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class _Analysis:
    """What the guard compares of one text (see the module docstring)."""

    numbers: Counter = field(default_factory=Counter)
    ones: int = 0  # how many of the numbers' 1s are the words "one" or "single", which "a" says as well
    names: dict = field(default_factory=dict)  # key (stem, acronym, quoted phrase or identifier) -> surface form
    acronyms: set = field(default_factory=set)
    negated: bool = False
    tense: str = ""  # of the auxiliary that opens a question ("is" / "was", "does" / "did"); "" when none does
    asks: str = ""  # "object" for "Who did X teach?", "subject" for "Who taught X?", "" for other texts
    passive: str = ""  # the stem of the passive's verb ("love" in "is Bob loved by Alice"), "" when none
    kinds: set = field(default_factory=set)
    content: list = field(default_factory=list)  # content stems in text order
    surface: dict = field(default_factory=dict)  # content stem -> its first surface word (for reasons)
    frames: set = field(default_factory=set)
    words: set = field(default_factory=set)  # every lower-case word
    stems: Counter = field(default_factory=Counter)  # every word's stem, function words included
    relations: list = field(default_factory=list)  # (marker, stems before it, stems after it)
    slots: list = field(default_factory=list)  # numbers and content stems in text order
    negators: Counter = field(default_factory=Counter)  # negating prefixes: "non-leap" -> {"non": 1}
    hyphenated: dict = field(default_factory=dict)  # stem of a hyphenated qualifier -> the compound ("low-fat")
    compounds: dict = field(default_factory=dict)  # stem of each part of a hyphenated word -> its joined stem
    tokens: tuple = ()  # every lower-case word in text order (for phrases: "get rid of")
    request: bool = False  # a question or an instruction: ends with "?" or opens with a question word or request verb


def _words(text: str) -> tuple[list[str], list[str]]:
    """Lower-case words and their surface forms; "n't" split off, "5km" split, possessives dropped, % -> percent."""
    words, surface = [], []
    for token in _TOKEN.findall(text):
        lower = token.lower()
        if lower.endswith("n't"):
            head = {"won": "will", "ca": "can", "sha": "shall"}.get(lower[:-3], lower[:-3])
            words += [head, "n't"] if head else ["n't"]
            surface += [head, "n't"] if head else ["n't"]
        elif "'" in lower:
            words.append(lower.split("'")[0])
            surface.append(token.split("'")[0])
        elif (number := _NUMERIC.match(lower)) and (unit := lower[number.end() :]) not in _ORDINAL_SUFFIXES:
            words += [lower[: -len(unit)], unit]
            surface += [lower[: -len(unit)], unit]
        else:
            words.append("percent" if token == "%" else lower)
            surface.append(token)
    return words, surface


_ORDINAL_SUFFIXES = ("", "st", "nd", "rd", "th", "s")


def _number(token: str) -> str:
    """Canonical text of a number: "1,000" -> "1000", "3.50" -> "3.5", "2nd" -> "2"; "1940s" keeps its "s"."""
    digits = _NUMERIC.match(token).group(0)
    suffix = token[len(digits) :]
    if _THOUSANDS.fullmatch(digits):
        digits = digits.replace(",", "")
    if digits.count(",") + digits.count(".") <= 1:
        digits = _format(float(digits.replace(",", ".")))
    return digits + (suffix if suffix == "s" else "")


def _format(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _analyse(text: str) -> _Analysis:
    text = normalize_query(text)
    out, quoted_stems = _Analysis(), set()
    for match in _QUOTED.finditer(text):
        quoted = next(g for g in match.groups() if g is not None).strip()
        key = " ".join(stem(w) for w in re.findall(r"\w+", quoted.lower()))
        if key:
            out.names[key] = quoted
            quoted_stems.update(key.split())
    for match in _IDENTIFIER.finditer(text):
        if match.group(0).lower() not in _UNITS:  # "kJ" is a unit, not camelCase
            out.names[match.group(0).lower()] = match.group(0)
    for match in _HYPHENATED.finditer(text):  # "non-leap", "low-fat": the first part qualifies the second
        first, compound = match.group(1).lower(), match.group(0).lower()
        if first in _NEGATING_PREFIXES:
            out.negators[first] += 1
        else:
            out.hyphenated[stem(_CLIPPED.get(first, first))] = compound
            for part in compound.split("-"):  # "e-mail" is "email" written in two
                out.compounds[stem(part)] = stem(compound.replace("-", ""))
    words, surface = _words(text)
    out.words, out.tokens = set(words), tuple(words)
    first = next((w for w in words if w.isalpha()), "")
    out.request = text.rstrip().endswith("?") or first in _REQUEST_OPENERS
    start, opener, pending = True, True, []  # sentence start; request opening; number words being combined
    for i, (word, form) in enumerate(zip(words, surface, strict=True)):
        prev, nxt = (words[i - 1] if i else ""), (words[i + 1] if i + 1 < len(words) else "")
        if word in ".!?;:":
            start = opener = True
            continue
        number = None
        if word[0].isdigit() or (word[0] == "-" and len(word) > 1):
            number = _number(word)
        elif (
            _ROMAN.match(form)
            and surface[i - 1 : i]
            and surface[i - 1][:1].isupper()
            and prev.isalpha()
            and prev not in _FUNCTION
            and (form != "I" or not nxt.isalpha() or (i > 1 and surface[i - 2][:1].isupper()))
        ):  # "World War II", "World War I ended"; not "Can I", "Python I have"
            number = str(sum(-v if v < n else v for v, n in zip(*_roman_pairs(form), strict=True)))
        elif word == "single" and nxt.isalpha() and nxt not in _FUNCTION:  # "a single game": one
            number = "1"
        elif word in _FRACTIONS and f"{word}-" not in text.lower():
            number = f"x{_format(_FRACTIONS[word])}"  # "x0.5": a part, not the count 0.5
        elif word in _ORDINALS and not (word == "second" and (prev in _SECOND_UNIT or prev[:1].isdigit())):
            number = str(_ORDINALS[word])
        elif (word in _NUMBER_WORDS or (word in _SCALES and pending)) and not (
            word == "one" and (prev in _ONE_PRONOUN or nxt == "of")
        ):
            pending.append(word)
            if nxt in _NUMBER_WORDS or nxt in _SCALES:
                continue
            number, pending = _format(_combine(pending)), []
        if number is not None:
            out.numbers[number] += 1
            out.ones += word in ("one", "single") and number == "1"
            out.slots.append(number)
            start = opener = False
            continue
        if prev in ("what", "which") and word in _CAUSES:
            out.kinds.add("reason")
            continue
        word, form = _reword(words, i, form, text, out.names)
        if not word:
            continue
        unit = _UNITS.get(word) if (prev[:1].isdigit() or len(word) > 1) else None  # "m" only after a number
        unit = unit or _CLIPPED.get(word)
        opened = opener  # whether this word still opens the request
        for part in (unit or word).split():
            base = stem(part)
            out.stems["a" if base == "an" else base] += 1  # "in a pound" / "in an ounce": the same frame
            if part in _NEGATIONS:
                out.negated = True
            elif part in _WH_KIND:
                out.kinds.add(_WH_KIND[part])
            elif part in ("what", "which") and nxt in _WH_NOUNS:
                out.kinds.add(_WH_NOUNS[nxt])
            elif part == "how":  # "how do I" / "... - how?" ask for a manner, "how far" for a degree
                works = nxt not in _DEGREE_WORDS and _WORKS & set(words[i + 1 : i + 6])  # "how X works"
                manner = nxt in _AUX or nxt in _HOW_CLAUSE or not nxt.isalpha() or works
                out.kinds.add("manner" if manner else "degree")
            negator = part == "non" and nxt.isalpha() and f"non-{nxt}" not in text.lower()  # "non leap year"
            if negator or (part in out.negators and nxt.isalpha() and f"{part}-{nxt}" in text.lower()):
                out.negators[part] += negator  # a hyphenated one was counted above
                out.slots.append(f"{part}-")  # not a content word, but its place counts ("non-X ... X" / "X ... non-X")
                out.stems[f"{part}-"] += 1
                continue
            if part in _FUNCTION or part in _NEGATIONS or part in _DIRECTIONS:
                opened = opened and part in _OPENERS
                continue
            if part in _FRAME_NOUNS and nxt == "of":
                continue
            if opener and part in _FRAME_VERBS:
                out.frames.add(base)
            if form.isupper() and len(form) >= 2 and form.isalpha():
                out.names[word] = form
                out.acronyms.add(word)
            elif form[:1].isupper() and not start and not (len(form) == 1 and f"{form}-" in text):  # "T-shirt"
                out.names[base] = form
            out.content.append(base)
            out.surface.setdefault(base, part)
            out.slots.append(base)
            opened = False
        start, opener = start and opened, opened
    out.relations = _relations(words)
    out.passive = _passive_verb(words, quoted_stems)
    out.tense = _tense(words)
    out.asks = _asks(words)
    return out


def _reword(words: list[str], i: int, form: str, text: str, names: dict) -> tuple[str, str]:
    """Word `i` of `words` (surface `form`) as a paraphrase would put it, with its surface form: a dimension or a
    duration after "how" ("how fast" = "speed", "how long should" / "how many minutes" = "duration"), "18 times 7" =
    "multiplied", the rewordings of `_reword_word`, then "US" = "USA", "get X out of" = "remove X from", "keep X from"
    = "stop X from", "what does X mean" = "define X". The word is "" when it only frames the request."""
    word, prev = words[i], (words[i - 1] if i else "")
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if prev == "how" and word == "long" and nxt in _DURATION_AUX:  # not "how long is the Nile": a length
        word = "duration"
    elif prev in ("many", "much") and words[i - 2 : i - 1] == ["how"] and word in _TIME_UNITS:
        word = "duration" if word == "time" else f"duration {word}"  # the unit kept: hours are not minutes
    elif prev == "how" and word in _DIMENSIONS:
        word = _DIMENSIONS[word]
    elif word == "times" and prev[:1].isdigit() and nxt[:1].isdigit():
        word = "multiplied"
    word = _reword_word(word, prev, nxt, names)
    if form == "US" and not text.isupper() and "US $" not in text:  # the country, not "us" nor "US $ 300"
        return "usa", "USA"
    if word == "out" and _GET & set(words[max(0, i - 5) : i]):
        word = "remove"
    elif word == "keep" and "from" in words[i + 1 : i + 5]:
        word = "stop"
    elif word in ("mean", "means") and words[:2] in (["what", "does"], ["what", "do"]):
        word = "define"
    return word, form


def _reword_word(word: str, prev: str, nxt: str, names: dict) -> str:
    """`word` as its paraphrase would put it, from its neighbours alone, or "" when it only frames the request:
    "tallest" = "highest"; "good"/"best" after a determiner ("a good name for X" = "suggest a name for X"); "the
    formula for" / "the meaning of"; "the word" before a quoted one; "boiling point" = "temperature"; "short for",
    "abbreviation", "full form" = "stand for"."""
    if word in _TALL:
        return _TALL[word]
    if (word in _PRAISE and prev in _DETERMINERS) or (word in _FRAME_BEFORE and nxt in ("for", "of")):
        return ""
    if word in ("word", "term") and (" ".join(stem(w) for w in re.findall(r"\w+", nxt)) in names or (
        prev == "the" and nxt.isalpha() and nxt not in _FUNCTION
    )):  # "the word 'X'", "the word X"
        return ""
    if word == "point" and prev in _POINTS:
        return "temperature"
    if (word == "short" and nxt == "for") or word in ("abbreviation", "acronym") or (
        word == "full" and nxt in ("form", "name")
    ):
        return "stand"
    return "" if word in ("form", "name") and prev == "full" else word


# the tense an auxiliary gives the question it opens (perfect counts as past: "Has X won" = "Did X win"); modals
# are left out: "Can you" / "Could you" / "Will you" ask the same
_TENSES = {**dict.fromkeys("is are am do does".split(), "present"), **dict.fromkeys("was were did has have had".split(),
           "past"), "will": "future", "shall": "future"}  # fmt: skip


def _tense(words: list[str]) -> str:
    """The tense of the first auxiliary among the first three words of a sentence ("Was Pluto ...", "Who is ...",
    "How does ..."), or ""."""
    start = 0
    for end in [*(i for i, w in enumerate(words) if w in ".!?;:"), len(words)]:
        found = next((_TENSES[w] for w in words[start : min(start + 3, end)] if w in _TENSES), "")
        if found:
            return found
        start = end + 1
    return ""


def _asks(words: list[str]) -> str:
    """Which role a "who" question asks for: "object" ("Who did Aristotle teach?"), "subject" ("Who taught
    Aristotle?", a content verb right after "who"), or "" (any other text: "Who is ...", "What ...")."""
    if len(words) < 3 or words[0] not in ("who", "whom"):
        return ""
    if words[1] in ("did", "does", "do"):
        return "object"
    return "subject" if words[1].isalpha() and words[1] not in _FUNCTION and words[1] not in _AUX else ""


_BE = _set("is are was were be been being get gets got")


def _passive_verb(words: list[str], quoted: set[str]) -> str:
    """The stem of the first passive's verb: "by" after a participle shortly after a form of "be" ("is X loved by",
    "was made by"), not inside a quoted name ("What is 'Stairway to Heaven' by ..."); "" when there is none."""
    for i, word in enumerate(words):
        participle = words[i - 1] if i else ""
        if participle in ("multiplied", "divided"):  # "18 multiplied by 7": arithmetic, not a passive
            continue
        if word == "by" and (participle.endswith(("ed", "en", "wn")) or participle in _IRREGULAR):
            verb = stem(participle)
            if _BE & set(words[max(0, i - 5) : i - 1]) and verb not in quoted:
                return verb
    return ""


def _voice_swap(a: _Analysis, b: _Analysis, b_slots: list[str], breaks: int) -> bool:
    """One verb in the active in one text and the passive in the other, the shared words in the same order: the
    roles swapped ("Which composers influenced X?" / "Which composers were influenced by X?")."""
    if breaks or bool(a.passive) == bool(b.passive):
        return False
    passive, active = (a, b) if a.passive else (b, a)
    return passive.passive in active.stems and len(set(a.slots) & set(b_slots)) >= 2


def _roman_pairs(numeral: str) -> tuple[list[int], list[int]]:
    values = [_ROMAN_VALUES[c] for c in numeral]
    return values, [*values[1:], 0]


def _combine(words: list[str]) -> float:
    """Value of a run of number words: ["two", "hundred", "fifty"] -> 250."""
    total, current = 0, 0
    for word in words:
        if word in _NUMBER_WORDS:
            current += _NUMBER_WORDS[word]
        else:
            current = max(current, 1) * _SCALES[word]
            if _SCALES[word] >= 1000:
                total, current = total + current, 0
    return float(total + current)


_BEFORE_INFINITIVE = _set("way ways how want wants need needs like trying try able going ought used best easiest")


def _relations(words: list[str]) -> list[tuple[str, frozenset, frozenset]]:
    """For each directional word: the content stems before and after it, within its sentence."""
    out, start = [], 0
    for end in [*(i for i, w in enumerate(words) if w in ".!?;:"), len(words)]:
        sentence = words[start:end]
        slots = [(j, stem(_UNITS.get(w) or _CLIPPED.get(w, w))) for j, w in enumerate(sentence)
                 if w not in _FUNCTION | _DIRECTIONS]  # fmt: skip
        for j, word in enumerate(sentence):
            if word == "to" and j and sentence[j - 1] in _BEFORE_INFINITIVE:  # "the best way to get": no direction
                continue
            if word in _DIRECTIONS:
                before = frozenset(s for k, s in slots if k < j)
                after = frozenset(s for k, s in slots if k > j)
                out.append((_SAME_WAY.get(word, word), before, after))
        start = end + 1
    return out


def _breakpoints(first: list[str], second: list[str]) -> int:
    """Breakpoints between the orders of the slots both lists hold (the n-th "paris" matches the n-th "paris").

    0 = same order; 3 = one block moved ("Who wrote X?" / "X was written by whom?"); 4 or more = roles swapped.
    """

    def numbered(slots: list[str]) -> list[tuple[str, int]]:
        seen: Counter = Counter()
        return [(s, seen.update([s]) or seen[s]) for s in slots]

    a, b = numbered(first), numbered(second)
    shared = set(a) & set(b)
    position = {s: k for k, s in enumerate(s for s in b if s in shared)}
    ranks = [-1, *(position[s] for s in a if s in shared), len(shared)]
    return sum(y != x + 1 for x, y in zip(ranks, ranks[1:], strict=False))


def _overlap(a: Counter, b: Counter) -> float:
    """Dice coefficient of two texts' word stems (as multisets): 1.0 = the same words, maybe reordered."""
    total = sum(a.values()) + sum(b.values())
    return 2 * sum((a & b).values()) / total if total else 1.0


class LookAlikeGuard:
    """Verifies a nearest-neighbour candidate: numbers, names, negation, question kind, direction and words agree.

    The rules of each strictness are in the module docstring. Deterministic; each text's analysis is memoized.

    Args:
        strictness (`str`, *optional*, defaults to `"strict"`):
            `"strict"` (highest precision), `"balanced"` (also accepts reworded paraphrases that reorder the same
            words or add several words, and so some role swaps), `"order"` (the vetoes and the word-order checks,
            no word matching), `"vetoes"` (only numbers, names, negation, question kind and direction) or `"off"`
            (accepts everything: plain cosine).
        memo_size (`int`, *optional*, defaults to 4096):
            Texts whose analysis is kept (cached requests are checked again and again).
        synonyms (`bool` or `Lexicon`, *optional*, defaults to `True`):
            Whether a content word of one text also matches a WordNet synonym in the other ("remove" / "delete",
            "movie" / "film"; not "gold" / "silver": see [`hf_neuralcache.semantic.lexicon`]). `True` uses the
            shipped lexicon (read once, about half a second, on the first pair that needs it); `False` matches
            words by stem only, as before; or pass a `Lexicon`.

    Example:

    ```python
    >>> from hf_neuralcache.semantic import LookAlikeGuard
    >>> guard = LookAlikeGuard()
    >>> guard.check("Convert 5 km to miles", "Convert 5 miles to km").reason
    "direction reversed: 'to' has ['kilometer'] and ['miles'] on opposite sides"
    >>> guard.check("What is the capital of France?", "Which city is the capital of France?").ok
    True
    ```
    """

    def __init__(self, strictness: str = "strict", memo_size: int = 4096, synonyms=True):
        if strictness not in STRICTNESS:
            raise ValueError(f"expected strictness in {STRICTNESS}, got {strictness!r}")
        if not isinstance(memo_size, int) or memo_size < 0:
            raise ValueError(f"expected memo_size to be a non-negative int, got {memo_size!r}")
        if not isinstance(synonyms, bool) and not callable(getattr(synonyms, "synonyms", None)):
            raise ValueError(f"expected synonyms to be True, False or a Lexicon, got {synonyms!r}")
        self.strictness, self.synonyms = strictness, synonyms
        self._analyse = functools.lru_cache(maxsize=memo_size)(_analyse)

    def __repr__(self) -> str:
        return f"LookAlikeGuard(strictness={self.strictness!r}, synonyms={bool(self.synonyms)})"

    def _lexicon(self):
        if self.synonyms is True:
            from .lexicon import default_lexicon

            try:
                return default_lexicon()
            except (OSError, ValueError) as e:  # a broken install: match by stem only rather than fail a lookup
                logger.warning("LookAlikeGuard: %s; words are matched by stem only", e)
                self.synonyms = False
                return None
        return self.synonyms or None

    def check(self, query: str, candidate: str) -> GuardVerdict:
        """Whether `candidate` (a cached request) asks the same as `query`; `reason` names what disagreed."""
        if not isinstance(query, str) or not isinstance(candidate, str):
            raise ValueError(f"expected two strings, got {type(query).__name__} and {type(candidate).__name__}")
        if self.strictness == "off":
            return GuardVerdict(True)
        a, b = self._analyse(query), self._analyse(candidate)
        strict = self.strictness == "strict"
        if a.numbers != b.numbers and _without_ones(a) != _without_ones(b):  # "in one stick" / "in a stick"
            return _no(f"numbers differ: {sorted(a.numbers.elements())} vs {sorted(b.numbers.elements())}")
        lexicon = self._lexicon() if self.strictness != "vetoes" else None
        for x, y, where in ((a, b, "candidate"), (b, a, "query")):
            spelled = _spelled(x, y)
            missing = [form for key, form in x.names.items() if not _has_name(y, key, key in x.acronyms)
                       and key not in spelled and not _name_synonym(key, form, x, y, lexicon)]  # fmt: skip
            if missing:
                return _no(f"names differ: {missing} not in the {where}")
        if a.negated != b.negated:
            return _no(f"negation in the {'query' if a.negated else 'candidate'} only")
        if a.negators != b.negators:
            where = "query" if (a.negators - b.negators) else "candidate"
            prefixes = sorted(f"{p}-" for p in (a.negators - b.negators) + (b.negators - a.negators))
            return _no(f"negation differs: {prefixes} in the {where} only")
        if a.tense and b.tense and a.tense != b.tense:  # "Was Pluto a planet?" / "Is Pluto a planet?"
            return _no(f"tense differs: {a.tense} vs {b.tense}")
        if a.asks and b.asks and a.asks != b.asks:  # "Who did Aristotle teach?" / "Who taught Aristotle?"
            return _no(f"roles differ: the query asks for the {a.asks}, the candidate for the {b.asks}")
        if a.kinds and b.kinds and not a.kinds & b.kinds:
            return _no(f"question kinds differ: {sorted(a.kinds)} vs {sorted(b.kinds)}")
        for marker, before_a, after_a in a.relations:
            for other, before_b, after_b in b.relations:
                if other != marker or (marker == "vs" and not strict):
                    continue
                left, right = (before_a - after_a) & (after_b - before_b), (after_a - before_a) & (before_b - after_b)
                if left and right:
                    sides = f"{_forms(a, left)} and {_forms(a, right)}"
                    return _no(f"direction reversed: {marker!r} has {sides} on opposite sides")
        for on, off in _OPPOSITE_PARTICLES:  # "turn on" / "turn off", "scale up" / "scale down"
            more_on = a.tokens.count(on) - b.tokens.count(on)  # "turn off X on my phone" / "turn on X on my phone"
            if more_on and more_on == b.tokens.count(off) - a.tokens.count(off):
                return _no(f"particle differs: {on!r} vs {off!r}")
        ways_a, ways_b = ({m for m, *_ in x.relations} & {"to", "from"} for x in (a, b))
        if len(ways_a) == len(ways_b) == 1 and ways_a != ways_b:  # one way each ("from X to Y" has both), opposite
            (way_a,), (way_b,) = ways_a, ways_b
            shared = {s for m, _, after in a.relations if m == way_a for s in after} & {
                s for m, _, after in b.relations if m == way_b for s in after
            }
            if shared:
                return _no(f"direction reversed: {way_a!r} / {way_b!r} before {_forms(a, shared)}")
        if self.strictness == "vetoes":  # only the slot checks above: the learned check judges the wording
            return GuardVerdict(True)
        if self.strictness == "order":  # and the order checks: the pair classifier judges the wording
            b_slots, breaks, reordered = _word_order(a, b, lexicon)
            if _voice_swap(a, b, b_slots, breaks):
                return _no("voice differs but the roles keep their places (active vs passive)")
            if a.request and b.request:  # and the roles of requests too: it was trained on their swaps
                return GuardVerdict(True)
            if breaks > 3:  # a passive too: the classifier, not this rule, tells a voice change from a swap
                return _no("order differs: shared words swap roles")
            if reordered:
                return _no("order differs: the same words in another order")
            return GuardVerdict(True)
        only_a, only_b = _unmatched(a, b, lexicon), _unmatched(b, a, lexicon)
        if only_a & a.frames and only_b & b.frames:  # two request verbs ("write" / "compose"): framing, not content
            only_a, only_b = only_a - a.frames, only_b - b.frames
        if only_a and only_b:
            return _no(f"different words: {_forms(a, only_a)} vs {_forms(b, only_b)}")
        b_slots, breaks, reordered = _word_order(a, b, lexicon)
        voice = bool(a.passive) != bool(b.passive)
        if breaks > 3 and not voice:  # passive vs active reverses the roles' order: expected, not a swap
            return _no("order differs: shared words swap roles")
        if strict:
            for x, y, extra, where in ((a, b, only_a, "query"), (b, a, only_b, "candidate")):
                hyphenated = [s for s in extra if s in x.hyphenated]  # a hyphenated qualifier is not an extra word
                joined = {s: stem(x.hyphenated[s].replace("-", "")) for s in hyphenated}  # "e-mail" / "email"
                qualifiers = sorted(x.hyphenated[s] for s in hyphenated if joined[s] not in y.stems)
                if qualifiers:
                    return _no(f"qualifier differs: {qualifiers} in the {where} only")
            if reordered:
                return _no("order differs: the same words in another order")
            if _voice_swap(a, b, b_slots, breaks):
                return _no("voice differs but the roles keep their places (active vs passive)")
            for x, y, extra in ((a, b, only_a - a.frames), (b, a, only_b - b.frames)):
                if len(extra) > 1:
                    return _no(f"extra words: {_forms(x, extra)}")
                qualifiers = [q for w in extra if lexicon is not None and (q := _qualifier(x, y, w, lexicon))]
                if qualifiers:
                    return _no(f"qualifier added: {qualifiers[0]}")
                actions = [v for w in extra if lexicon is not None and (v := _replaces_get(x, y, w, lexicon))]
                if actions:
                    return _no(f"action differs: {actions[0]}")
        return GuardVerdict(True)


def _without_ones(text: _Analysis) -> Counter:
    """The numbers without the 1s said as "one" or "single" ("one cup" / "a cup", "a single game" / "one game")."""
    return text.numbers - Counter({"1": text.ones})


def _word_order(a: _Analysis, b: _Analysis, lexicon) -> tuple[list[str], int, bool]:
    """`b`'s slots with each synonym in its partner's place, the breakpoints between the two orders, and whether the
    same words (overlap >= 0.9) come in another order: what the order checks read."""
    alias = _synonym_alias(a, b, lexicon)
    b_slots = [alias.get(w, w) for w in b.slots]
    breaks = _breakpoints(a.slots, b_slots)
    reordered = bool(breaks) and _overlap(a.stems, Counter({alias.get(w, w): n for w, n in b.stems.items()})) >= 0.9
    return b_slots, breaks, reordered


def _no(reason: str) -> GuardVerdict:
    return GuardVerdict(False, reason)


def vetoes_guard(vetoes, default: str) -> LookAlikeGuard | None:
    """The guard a learned check keeps in front of its score: `True` is `default`, a strictness other than `"off"`
    names one, `False` none. Raises `ValueError` for anything else."""
    if vetoes is True:
        vetoes = default
    allowed = tuple(name for name in STRICTNESS if name != "off")
    if vetoes is not False and vetoes not in allowed:
        raise ValueError(f"expected vetoes in {(True, False, *allowed)}, got {vetoes!r}")
    return LookAlikeGuard(vetoes) if vetoes else None


def scored_verdict(vetoes: LookAlikeGuard | None, query: str, candidate: str, score, threshold: float,
                   name: str) -> GuardVerdict:  # fmt: skip
    """The verdict of a learned check: the `vetoes` guard first (its refusal, if it refuses), then `score()` (a
    callable, run only when no veto refused) against `threshold`; a low score is refused as `"<name> <score> <
    <threshold>"`. Raises `ValueError` unless both texts are strings."""
    if not isinstance(query, str) or not isinstance(candidate, str):
        raise ValueError(f"expected two strings, got {type(query).__name__} and {type(candidate).__name__}")
    if vetoes is not None:
        verdict = vetoes.check(query, candidate)
        if not verdict.ok:
            return verdict
    value = score()
    if value < threshold:
        return GuardVerdict(False, f"{name} {value:.3f} < {threshold:.3f}")
    return GuardVerdict(True)


def _forms(text: _Analysis, stems: set[str]) -> list[str]:
    return sorted(text.surface.get(s, s) for s in stems)


def _spells(content: list[str], acronym: str) -> bool:
    """Whether consecutive words of `content` have `acronym` as initials ("gross domestic product" -> "gdp")."""
    return any("".join(w[0] for w in content[j : j + len(acronym)]) == acronym for j in range(len(content)))


def _has_name(text: _Analysis, key: str, acronym: bool) -> bool:
    """Whether a name (stem, acronym, quoted phrase or identifier) occurs in `text`, in any case."""
    if acronym:  # exactly ("HTTP" is not in "HTTPS"), or spelled out
        return key in text.names or key in text.words or _spells(text.content, key)
    if key in text.names or key in text.words or key in text.stems:
        return True
    if len(key) >= 4 and key.isalpha() and _prefixed(key, text.stems):
        return True  # "Scandinavia" / "Scandinavian"
    parts = re.findall(r"[^\W_]+", key)
    if len(parts) > 1 and all(p in text.stems or p in text.words for p in parts):
        return True
    return key.isalpha() and 2 <= len(key) <= 6 and _spells(text.content, key)


def _synonym_in(form: str, text: _Analysis, lexicon, skip=frozenset()) -> str | None:
    """The first content stem of `text` (not an acronym, not in `skip`) whose word WordNet lists as a synonym of
    `form`, or `None`."""
    return next((w for w in dict.fromkeys(text.content) if w not in text.acronyms and w not in skip
                 and lexicon.synonyms(form, text.surface.get(w, w))), None)  # fmt: skip


def _synonym_alias(a: _Analysis, b: _Analysis, lexicon) -> dict[str, str]:
    """Content stems of `b` that `a` lacks, mapped to the stem of their synonym in `a` ("fatherly" -> "paternal")."""
    if lexicon is None:
        return {}
    pairs = ((v, _synonym_in(b.surface.get(v, v), a, lexicon, skip=b.stems)) for v in dict.fromkeys(b.content)
             if v not in a.stems and v not in b.acronyms)  # fmt: skip
    return {v: w for v, w in pairs if w is not None}


def _stands_for(unit: str, covers: set, other: str, their: set, x: _Analysis, lexicon) -> bool:
    """Whether `other` (a word or phrase of the other text, covering stems `their`) can replace `unit` of `x`
    (covering `covers`): a WordNet synonym, but a word both texts have stands only for a phrase that holds it
    ("chemical formula" / "formula"), not for another word ("Write a sonnet" / "Write a limerick": not "sonnet" /
    "write"), and a unit of measure only for itself ("calories" / "calorie", not "hour" / "minute")."""
    if their <= x.stems.keys() and not their <= covers:
        return False
    if (covers | their) & _MEASURES and set(lexicon.lemmas(unit)).isdisjoint(lexicon.lemmas(other)):
        return False
    return lexicon.synonyms(unit, other)


def _listed(name: str, lexicon) -> bool:
    """Whether WordNet lists `name` as it is written, not as an inflection ("USA"; not "HTTPS" as "HTTP"s)."""
    return lexicon.lemmas(name)[:1] == (name.lower(),)


def _name_synonym(key: str, form: str, x: _Analysis, y: _Analysis, lexicon) -> bool:
    """Whether WordNet lists a name of `x`, or the phrase of `x` that holds it ("United Kingdom"), as a synonym of a
    word, phrase or name of `y` ("UK"; "Earth" / "world"; "Oscars" / "Academy Awards"). An acronym is taken only as
    WordNet lists it, not inflected: "HTTPS" is not a plural of "HTTP"."""
    if lexicon is None or not form.isalpha():
        return False
    usable = lambda name, text: name.lower() not in text.acronyms or _listed(name, lexicon)  # noqa: E731
    mine = [*([form] if usable(form, x) else []),
            *(u for u, covers in _units(x, lexicon) if "_" in u and key in covers)]  # fmt: skip
    theirs = [*(unit for unit, _ in _units(y, lexicon)), *(n for n in y.names.values() if usable(n, y))]
    return any(lexicon.synonyms(m, t) for m in mine for t in theirs)


def _derived(short: str, long: str) -> bool:
    """Whether stem `long` is stem `short` (4+ letters) and a suffix: "scandinavia" / "scandinavian", "east" /
    "eastern", "travel" / "travell"; not "stor" / "storm" ("story" / "stormy") nor "pine" / "pineappl"."""
    if len(short) < 4 or len(long) <= len(short) or not long.startswith(short):
        return False
    rest = long[len(short) :]
    if rest[0] == short[-1]:  # a doubled consonant: "travel" / "travelled", "program" / "programmer"
        rest = rest[1:]
    return not rest or rest in _DERIVATIONS or f"{rest}e" in _DERIVATIONS or f"{rest}y" in _DERIVATIONS


def _prefixed(word: str, others) -> bool:
    """Whether `word` and one of `others` are one word, one of them with a suffix the other lacks (see `_derived`)."""
    return any(_derived(word, w) or _derived(w, word) for w in others)


def _spelled(x: _Analysis, y: _Analysis) -> set[str]:
    """Content stems of `x` that spell out an acronym of `y` ("National Basketball Association" / "NBA")."""
    covered = set()
    for acronym in y.acronyms:
        for j in range(len(x.content) - len(acronym) + 1):
            if "".join(w[0] for w in x.content[j : j + len(acronym)]) == acronym:
                covered.update(x.content[j : j + len(acronym)])
    return covered


def _unmatched(x: _Analysis, y: _Analysis, lexicon=None) -> set[str]:
    """Content stems of `x` that `y` lacks (by stem, by prefix of 4+ letters, spelling out an acronym, or, given a
    `lexicon`, by a synonym among `y`'s content words)."""
    covered = _spelled(x, y)
    covered.update(w for w in x.content if w in y.compounds.values() or x.compounds.get(w) in y.stems)
    out = set()
    for word in set(x.content) - set(y.stems) - covered:
        if word in x.acronyms:
            if _spells(y.content, word):
                continue
        elif len(word) >= 4:
            partners = [w for w in y.content if w not in y.acronyms and _prefixed(word, [w])]
            if lexicon is not None:  # two words WordNet lists apart are not one word: "seed" / "seedling"
                form = x.surface.get(word, word)
                partners = [w for w in partners if not _apart(form, y.surface.get(w, w), lexicon)]
            if partners:
                continue
        out.add(word)
    if lexicon is not None and out:
        others = _units(y, lexicon)
        matched = set()
        for unit, covers in _units(x, lexicon):
            if covers & out and any(_stands_for(unit, covers, v, their, x, lexicon) for v, their in others):
                matched |= covers
        out -= matched
    return out


_NOT_HEADS = _FUNCTION | _DIRECTIONS | _NEGATIONS
# stems of units of measure: never matched by a WordNet synonym ("hour" / "minute", "cup" / "mug")
_MEASURES = frozenset(
    stem(w)
    for w in " ".join(_UNITS.values()).split()
    + """time second minute hour day week month year decade century cup tablespoon teaspoon inch yard acre hectare
    gallon pint quart ton tonne degree percent calorie kilocalorie joule kilojoule watt volt dollar euro""".split()
)


def _qualifier(x: _Analysis, y: _Analysis, word: str, lexicon) -> str | None:
    """The qualifier that extra content stem `word` of `x` adds, if it adds one (quoted, for the verdict): a noun or
    adjective right before a noun that `y` has ("vegan" before "cake"), a word put inside two shared ones ("doubly
    linked list"), a compound that WordNet lists as its own entry with a shared word ("time zone" is not "time"), or a
    prepositional phrase or a condition that shares nothing with `y` ("in captivity", "while pregnant", "when it is
    hot")."""
    form = x.surface.get(word, word).lower()
    if form not in x.tokens:
        return None
    i = x.tokens.index(form)
    head = x.tokens[i + 1] if i + 1 < len(x.tokens) else ""
    if head.isalpha() and head not in _NOT_HEADS and stem(_CLIPPED.get(head, head)) in y.stems:
        # a noun's modifier: not a verb ("using Java") nor before a verb
        participle = (form.endswith("ed") or form in _IRREGULAR) and i > 0 and x.tokens[i - 1] in _DETERMINERS
        if (lexicon.pos(form) in ("n", "a") or participle) and lexicon.pos(head) in ("n", None):  # "a used car"
            return f"{form!r} before {head!r}"
    inside = x.tokens[i + 1 : i + 3]  # "doubly" in "a doubly linked list" / "a linked list": both next words shared
    if len(inside) == 2 and all(t.isalpha() and t not in _FUNCTION and stem(t) in y.stems for t in inside):
        if lexicon.pos(form) != "v" and y.tokens and " ".join(inside) in " ".join(y.tokens):
            return repr(f"{form} {' '.join(inside)}")
    for j, k in ((i - 1, i), (i, i + 1)):  # "time zone", "zone time"
        if 0 <= j and k < len(x.tokens) and stem(x.tokens[j if k == i else k]) in y.stems:
            compound = f"{x.tokens[j]}_{x.tokens[k]}"
            if x.tokens[j].isalpha() and x.tokens[k].isalpha() and compound in lexicon and lexicon.pos(compound) == "n":
                return repr(compound.replace("_", " "))
    j = i - 1
    while j >= 0 and x.tokens[j] in _DETERMINERS:
        j -= 1
    if j >= 0 and x.tokens[j] not in _PREPOSITIONS:  # or a condition: "while pregnant", "when it is hot"
        while j > 0 and x.tokens[j] not in _CONDITIONS and x.tokens[j] in _FUNCTION:
            j -= 1
        j = j if j > 0 and x.tokens[j] in _CONDITIONS else -1  # not the request's own "When did ..."
    if j < 0:
        return None
    stops = _PREPOSITIONS | _DIRECTIONS | {".", "!", "?", ";", ":", "by", "via", "through", "about"}
    end = next((k for k in range(i, len(x.tokens)) if x.tokens[k] in stops), len(x.tokens))
    tail = x.tokens[j + 1 : end]
    if any(stem(t) in y.stems for t in tail if t not in _FUNCTION and t not in _DETERMINERS):
        return None  # the phrase names something the other text has: a rewording ("on the theme of autumn")
    return repr(" ".join(x.tokens[j:end]))


def _object(tokens: tuple, k: int) -> str | None:
    """The word after `tokens[k]` past determiners: a verb's direct object when it is a content word."""
    k += 1
    while k < len(tokens) and tokens[k] in _DETERMINERS:
        k += 1
    word = tokens[k] if k < len(tokens) else ""
    return stem(word) if word.isalpha() and word not in _FUNCTION and word not in _DIRECTIONS else None


def _replaces_get(x: _Analysis, y: _Analysis, word: str, lexicon) -> str | None:
    """The verb (quoted) that extra stem `word` of `x` puts where `y` has "get" before the same object: "renew a
    passport" is not "get a passport"."""
    form = x.surface.get(word, word).lower()
    if form not in x.tokens or lexicon.pos(form) != "v":
        return None
    thing = _object(x.tokens, x.tokens.index(form))
    if thing is None:
        return None
    for k, token in enumerate(y.tokens):
        if token in _GET and _object(y.tokens, k) == thing:
            return f"{form!r} vs {token!r}"
    return None


def _apart(first: str, second: str, lexicon) -> bool:
    """Whether WordNet knows both words as different lemmas of one part of speech that are not synonyms ("seed" /
    "seedling"); a suffix that changes the part of speech ("recycle" / "recyclable") keeps the meaning."""
    a, b = lexicon.lemmas(first), lexicon.lemmas(second)
    if not a or not b or set(a) & set(b) or lexicon.pos(first) != lexicon.pos(second):
        return False
    return not lexicon.synonyms(first, second)


def _units(text: _Analysis, lexicon) -> list[tuple[str, set[str]]]:
    """The text's content words and the WordNet phrases of 2-3 words in it ("get_rid_of"), each with the content
    stems it covers."""
    units = [(form, {w}) for w in dict.fromkeys(text.content)  # an acronym only as WordNet lists it
             if (form := text.surface.get(w, w)).lower() not in text.acronyms or _listed(form, lexicon)]  # fmt: skip
    tokens = text.tokens
    for i in range(len(tokens)):
        for n in (2, 3):
            phrase = "_".join(tokens[i : i + n])
            if i + n <= len(tokens) and phrase.replace("_", "").replace("-", "").isalpha() and phrase in lexicon:
                covers = {stem(t) for t in tokens[i : i + n]} & set(text.content)
                if covers:
                    units.append((phrase, covers))
    return units
