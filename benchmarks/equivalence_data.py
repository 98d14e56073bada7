"""Training pairs for the learned equivalence check, generated from templates written for this project.

    .venv/bin/python benchmarks/equivalence_data.py benchmarks/out/equivalence_train.tsv

No public paraphrase corpus ships in a package that installs offline here, and the shared data files are evaluation
sets, so the training pairs are generated: request frames that ask the same thing in other words (label 1), and the
same frames with one slot changed (label 0): another thing of the same kind, an antonym verb or adjective, an added
or changed qualifier, a reversed direction, a number, a negation. The word lists and frames below were written
without looking at the evaluation files, and words of the issue's examples ("sea" / "ocean", "US" / "United States")
are left out on purpose. Deterministic for a seed; writes `label<TAB>query_a<TAB>query_b` (the format `load_pairs`
reads).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

KINDS = {  # things of one kind: swapping one for another changes the request
    "animal": "horse rabbit parrot goat hamster owl turtle wolf bee shark penguin camel squirrel frog eagle".split(),
    "food": "lasagna risotto pancakes hummus sushi omelette bread soup curry waffles dumplings salsa".split(),
    "topic": "photosynthesis gravity inflation blockchain osmosis evolution democracy entropy magnetism "
    "vaccination erosion tides".split(),
    "lang": "Italian German Russian Arabic Hindi Dutch Swedish Greek Turkish Polish".split(),
    "place": "Portugal Kenya Peru Norway Vietnam Egypt Canada Chile Greece Poland Mexico Ireland".split(),
    "city": "Madrid Lisbon Nairobi Oslo Cairo Toronto Athens Warsaw Lima Dublin".split(),
    "plang": "JavaScript Rust Go Java Ruby Kotlin C++ PHP Swift Haskell".split(),
    "object": "bicycle laptop printer guitar tent kettle camera blender drone microwave".split(),
    "material": "wood glass steel plastic leather cotton copper paper".split(),
    "job": "teacher nurse pilot chef lawyer plumber farmer architect".split(),
    "season": "spring summer autumn winter".split(),
}
ANTONYMS = [  # verb or adjective pairs whose swap changes the request
    ("install", "uninstall"), ("open", "close"), ("start", "stop"), ("upload", "download"), ("encrypt", "decrypt"),
    ("buy", "sell"), ("increase", "decrease"), ("enable", "disable"), ("add", "remove"), ("import", "export"),
    ("compress", "extract"), ("freeze", "thaw"), ("hire", "fire"), ("lock", "unlock"), ("mount", "unmount"),
    ("cheap", "expensive"), ("fast", "slow"), ("easy", "hard"), ("hot", "cold"), ("long", "short"),
    ("first", "last"), ("beginner", "expert"), ("healthy", "unhealthy"), ("spicy", "mild"), ("wet", "dry"),
]
SYNONYMS = {  # words that ask the same when swapped, by part of speech
    "noun": [("car", "automobile"), ("film", "movie"), ("shop", "store"), ("child", "kid"), ("picture", "photo"),
             ("trip", "journey"), ("error", "mistake"), ("job", "occupation"), ("present", "gift")],
    "verb": [("begin", "start"), ("buy", "purchase"), ("fix", "repair"), ("help", "assist"), ("choose", "pick"),
             ("show", "display"), ("end", "finish"), ("get", "obtain")],
    "adj": [("big", "large"), ("quick", "fast"), ("smart", "clever"), ("cheap", "inexpensive"), ("rich", "wealthy"),
            ("hard", "difficult"), ("happy", "glad")],
}
QUALIFIERS = "homemade vegan frozen organic wireless portable electric used small old".split()
# frames that ask the same thing: each row's forms are interchangeable; {x} is a slot of the given kind
FRAMES = [
    ("animal", ["What do {x}s eat?", "What is the diet of a {x}?", "What food does a {x} eat?"]),
    ("animal", ["How long does a {x} live?", "What is the lifespan of a {x}?", "How many years do {x}s live?"]),
    ("animal", ["Tell me a fun fact about {x}s.", "Give me an interesting fact about the {x}.",
                "Share a fun fact about {x}s."]),
    ("animal", ["Write a story about a {x}.", "Can you write me a story featuring a {x}?",
                "Compose a tale about a {x}."]),
    ("food", ["How do I make {x}?", "Give me a recipe for {x}.", "What's the recipe for {x}?",
              "How can I cook {x} at home?"]),
    ("food", ["How many calories are in {x}?", "What is the calorie count of {x}?", "How much energy does {x} have?"]),
    ("topic", ["What is {x}?", "Can you explain {x}?", "Explain {x} to me.", "What does {x} mean?"]),
    ("topic", ["Explain {x} in simple terms.", "Describe {x} simply.", "Give me a simple explanation of {x}."]),
    ("topic", ["Why is {x} important?", "What makes {x} important?", "Why does {x} matter?"]),
    ("lang", ["How do I say hello in {x}?", "What is hello in {x}?", "Translate hello into {x}."]),
    ("lang", ["How hard is it to learn {x}?", "Is {x} difficult to learn?", "How difficult is learning {x}?"]),
    ("place", ["What is the capital of {x}?", "Which city is the capital of {x}?", "What's {x}'s capital city?"]),
    ("place", ["What currency does {x} use?", "What is the currency of {x}?", "Which money is used in {x}?"]),
    ("place", ["What language do people speak in {x}?", "What is the official language of {x}?",
               "Which language is spoken in {x}?"]),
    ("city", ["What is the weather like in {x} in July?", "How is the weather in {x} during July?",
              "What's {x}'s weather in July?"]),
    ("city", ["What should I see in {x}?", "What are the main sights in {x}?", "Which attractions are worth "
              "visiting in {x}?"]),
    ("plang", ["How do I reverse a string in {x}?", "What's the way to reverse a string in {x}?",
               "Reverse a string using {x}."]),
    ("plang", ["How do I read a file in {x}?", "How can I open and read a file with {x}?",
               "Show me how to read a file in {x}."]),
    ("object", ["How do I clean a {x}?", "What's the best way to clean a {x}?", "How should I clean my {x}?"]),
    ("object", ["How much does a {x} cost?", "What is the price of a {x}?", "How expensive is a {x}?"]),
    ("material", ["Is {x} recyclable?", "Can {x} be recycled?", "Is it possible to recycle {x}?"]),
    ("job", ["How do I become a {x}?", "What does it take to become a {x}?", "What are the steps to become a {x}?"]),
    ("job", ["How much does a {x} earn?", "What is the average salary of a {x}?", "What does a {x} get paid?"]),
    ("season", ["What flowers bloom in {x}?", "Which flowers bloom during {x}?", "Name flowers that bloom in {x}."]),
]
# frames with an antonym slot {v}: swapping it for its antonym changes the request
VERB_FRAMES = [
    ["How do I {v} a package with pip?", "What's the command to {v} a package with pip?"],
    ["How can I {v} the file?", "What is the way to {v} the file?"],
    ["When is the right time to {v} it?", "When should I {v} it?"],
]
ADJ_FRAMES = [
    ["Suggest a {v} dinner recipe.", "Recommend a {v} recipe for dinner."],
    ["What is a {v} way to travel?", "Tell me a {v} way to travel."],
    ["Name a {v} hobby for retirees.", "What's a {v} hobby for retired people?"],
]
SYNONYM_FRAMES = {
    "noun": ["Where can I find a used {w}?", "What should I look for in a {w}?", "How do I pay for a {w} online?"],
    "verb": ["Where can I {w} a used bicycle?", "How do I {w} my account settings?", "Can you {w} me with taxes?"],
    "adj": ["Is a {w} dog a good pet for a {w2}?", "Name a {w} animal.", "What makes a {w} decision?"],
}
DIRECTIONS = [
    ("Convert {a} to {b}.", "How do I convert {a} into {b}?", [("meters", "feet"), ("liters", "gallons"),
     ("kilograms", "stones"), ("JSON", "YAML"), ("PNG", "JPEG"), ("hours", "seconds"), ("euros", "yen")]),
    ("How far is it from {a} to {b}?", "What is the distance from {a} to {b}?", [("Madrid", "Lisbon"),
     ("Oslo", "Athens"), ("Cairo", "Nairobi"), ("Toronto", "Dublin")]),
    ("Is {a} bigger than {b}?", "Is {a} larger than {b}?", [("Kenya", "Peru"), ("Norway", "Poland"),
     ("Egypt", "Chile"), ("Canada", "Mexico")]),
]


def _one(rng: random.Random, items: list, not_this=None):
    choice = rng.choice(items)
    while choice == not_this:
        choice = rng.choice(items)
    return choice


def generate(seed: int = 0, per_frame: int = 12) -> list[tuple[str, str, int]]:
    """Label-balanced `(text_a, text_b, label)` pairs, shuffled; the same for the same seed."""
    rng, out = random.Random(seed), []
    for kind, forms in FRAMES:
        for _ in range(per_frame):
            x = rng.choice(KINDS[kind])
            f, g = rng.sample(forms, 2)
            out.append((f.format(x=x), g.format(x=x), 1))
            y = _one(rng, KINDS[kind], x)
            out.append((f.format(x=x), rng.choice([f, g]).format(x=y), 0))  # another thing of the same kind
            if kind in ("food", "object", "animal") and rng.random() < 0.5:  # an added qualifier
                q = rng.choice(QUALIFIERS)
                out.append((f.format(x=x), g.format(x=f"{q} {x}"), 0))
            other_kind, other_forms = rng.choice(FRAMES)  # another question about the same kind of thing
            if other_forms is not forms and other_kind == kind:
                out.append((f.format(x=x), rng.choice(other_forms).format(x=x), 0))
    for forms, (a, b) in [(f, p) for f in VERB_FRAMES for p in ANTONYMS[:15]] + [
        (f, p) for f in ADJ_FRAMES for p in ANTONYMS[15:]
    ]:
        if True:
            if rng.random() < 0.6:
                f, g = forms if rng.random() < 0.5 else forms[::-1]
                out.append((f.format(v=a), g.format(v=a), 1))
                out.append((f.format(v=a), rng.choice(forms).format(v=b), 0))
    for pos, frames in SYNONYM_FRAMES.items():
        for frame, (a, b) in [(f, p) for f in frames for p in SYNONYMS[pos]]:
            if rng.random() < 0.6:
                w2 = rng.choice(["child", "teacher", "friend", "neighbor"])
                out.append((frame.format(w=a, w2=w2), frame.format(w=b, w2=w2), 1))
                c = _one(rng, [s for pair in SYNONYMS[pos] for s in pair], a)
                if c != b:
                    out.append((frame.format(w=a, w2=w2), frame.format(w=c, w2=w2), 0))
    for f, g, pairs in DIRECTIONS:
        for a, b in pairs:
            out.append((f.format(a=a, b=b), g.format(a=a, b=b), 1))
            out.append((f.format(a=a, b=b), rng.choice([f, g]).format(a=b, b=a), 0))
    out = [(a, b, y) if rng.random() < 0.5 else (b, a, y) for a, b, y in dict.fromkeys(out)]
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = generate(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        f.write("label\tquery_a\tquery_b\n")
        f.writelines(f"{y}\t{a}\t{b}\n" for a, b, y in pairs)
    print(f"{len(pairs)} pairs ({sum(y for *_, y in pairs)} same) -> {args.out}")


if __name__ == "__main__":
    main()
