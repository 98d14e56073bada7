"""Which words can replace each other in a request: a small lexicon distilled from Princeton WordNet 3.0.

The look-alike guard refuses a pair whose texts hold content words the other lacks ("different words"), which keeps
"gold" / "silver" and "read" / "write" apart but also refused ordinary rewordings ("remove" / "delete", "sea" /
"ocean", "movie" / "film"). [`Lexicon.synonyms`] answers from WordNet instead of from hand-written lists: two words
are interchangeable when one of the first eight senses of one (WordNet lists senses most frequent first) is a sense of
the other, or is tied to it by an adjective cluster (`similar_to`), by a derivational or pertainym link of the word
itself ("inventor" / "invented", "quickly" / "quick"), or, for a verb's four most frequent senses, as its direct
hypernym when that is not a catch-all ("delete" / "remove", "hone" / "sharpen"; not "reset" / "change").
Co-hyponyms ("gold" / "silver", both noble metals; "fry" / "boil"), antonyms and noun hypernyms ("dog" / "animal")
are not interchangeable.

The data (`lexicon.json.gz` beside this file, 1.7 MB, 144,719 words and phrases of 2-3 words: "get_rid_of") is
built by `benchmarks/build_lexicon.py` from the WordNet 3.0 database and carries WordNet's licence; it is checked
against its SHA-256 before use and read once per process (about half a second), on the first lookup.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path

__all__ = ["LEXICON", "Lexicon", "default_lexicon"]

LEXICON = Path(__file__).with_name("lexicon.json.gz")
# the digest of the shipped file: a file that differs (truncated, edited, another build) is refused
LEXICON_SHA256 = "2c6ab8cf588563006e5f521a3d9d3800f7fe5d8e6ad5df74a31174197442cb71"
# WordNet's detachment rules (morphy(7WN)): suffix -> ending, per part of speech
_RULES = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
          ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
}  # fmt: skip


class Lexicon:
    """WordNet word relations for the look-alike guard (see the module docstring).

    Args:
        path (`str` or `Path`, *optional*):
            A `lexicon.json.gz` built by `benchmarks/build_lexicon.py`. Defaults to the shipped one, which must match
            its pinned SHA-256; another file is checked for its format only.

    Example:

    ```python
    >>> from hf_neuralcache.semantic.lexicon import default_lexicon
    >>> lexicon = default_lexicon()
    >>> lexicon.synonyms("remove", "delete"), lexicon.synonyms("movies", "film")
    (True, True)
    >>> lexicon.synonyms("gold", "silver"), lexicon.synonyms("read", "write"), lexicon.synonyms("dog", "animal")
    (False, False, False)
    ```
    """

    def __init__(self, path: str | Path | None = None):
        shipped = path is None
        path = LEXICON if shipped else Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"cannot read the word lexicon {path}: {e} (reinstall hf-neuralcache)") from e
        if shipped and hashlib.sha256(raw).hexdigest() != LEXICON_SHA256:
            raise ValueError(f"the word lexicon {path} does not match its pinned SHA-256 (reinstall hf-neuralcache)")
        try:
            data = json.loads(gzip.decompress(raw))
            words, exceptions = data["words"], data["exceptions"]
            if data.get("format") != 1 or not isinstance(words, dict) or not isinstance(exceptions, dict):
                raise ValueError("unexpected layout")
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a word lexicon built by benchmarks/build_lexicon.py ({e})") from e
        self.path, self.license = path, data.get("license", "")
        self._words = words  # lemma -> [own sense ids, related sense ids, tagged-sense counts per part of speech]
        self._exceptions = exceptions
        self.lemmas = functools.lru_cache(maxsize=65536)(self._lemmas)
        self.synonyms = functools.lru_cache(maxsize=65536)(self._synonyms)

    def __repr__(self) -> str:
        return f"Lexicon({str(self.path)!r}, words={len(self._words)})"

    def __contains__(self, word: str) -> bool:
        return bool(self.lemmas(word))

    def _lemmas(self, word: str) -> tuple[str, ...]:
        """The lexicon's base forms of `word` (lower-cased; irregular forms from WordNet's exception lists, then
        WordNet's suffix rules). Empty when WordNet does not know the word."""
        word = word.lower()
        if "_" in word:  # a phrase: its first or last word may be inflected ("got_rid_of", "academy_awards")
            head, rest = word.split("_", 1)
            start, last = word.rsplit("_", 1)
            forms = dict.fromkeys([word, *(f"{h}_{rest}" for h in self.lemmas(head)),
                                   *(f"{start}_{t}" for t in self.lemmas(last))])  # fmt: skip
            return tuple(w for w in forms if w in self._words)
        out = [word] if word in self._words else []
        out += [w for w in self._exceptions.get(word, ()) if w in self._words]
        for rules in _RULES.values():
            for suffix, ending in rules:
                if word.endswith(suffix) and len(word) > len(suffix) + 1:
                    base = word[: len(word) - len(suffix)] + ending
                    if base in self._words:
                        out.append(base)
        return tuple(dict.fromkeys(out))

    def pos(self, word: str) -> str | None:
        """The most frequent part of speech of `word` in WordNet's tagged senses: `"n"`, `"v"`, `"a"` (adjective)
        or `"r"` (adverb); `None` for a word WordNet does not know."""
        counts = [0] * 4
        for lemma in self.lemmas(word):
            for k, c in enumerate(self._words[lemma][2]):
                counts[k] += c
        return "nvar"[counts.index(max(counts))] if any(counts) else None

    def _synonyms(self, first: str, second: str) -> bool:
        """Whether the two words can replace each other in a request (symmetric; inflections allowed)."""
        if first.lower() == second.lower():
            return True
        for a in self.lemmas(first):
            own_a, rel_a = set(self._words[a][0]), self._words[a][1]
            for b in self.lemmas(second):
                own_b, rel_b = self._words[b][:2]
                if (
                    a == b
                    or not own_a.isdisjoint(own_b)
                    or not own_a.isdisjoint(rel_b)
                    or any(s in rel_a for s in own_b)
                ):
                    return True
        return False


@functools.cache
def default_lexicon() -> Lexicon:
    """The shipped lexicon, read once per process."""
    return Lexicon()
