"""The offline demo stream: task families SmolLM2-135M-Instruct answers (in-distribution) mixed with families it
cannot (made-up facts, atomic skills it fails), each sample's family in a field the pipeline never reads."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

FAMILY_FIELD = "family"


@dataclass(frozen=True)
class Family:
    """A task family: its name, whether the model already answers it, and its (prompt, answer) pairs."""

    name: str
    in_distribution: bool
    pairs: tuple[tuple[str, str], ...]


def _capitals() -> tuple[tuple[str, str], ...]:
    known = [
        ("France", "Paris"),
        ("Japan", "Tokyo"),
        ("Germany", "Berlin"),
        ("Russia", "Moscow"),
        ("China", "Beijing"),
        ("Egypt", "Cairo"),
        ("England", "London"),
        ("Greece", "Athens"),
    ]
    return tuple((f"What is the capital of {c}?", f"The capital of {c} is {v}.") for c, v in known)


def _plurals() -> tuple[tuple[str, str], ...]:
    nouns = ["cat", "dog", "book", "tree", "car", "bird", "cup", "door"]
    return tuple((f"What is the plural of {n}?", f"The plural of {n} is {n}s.") for n in nouns)


def _first_letters() -> tuple[tuple[str, str], ...]:
    words = ["banana", "apple", "orange", "tiger", "house", "window"]
    return tuple(
        (f"What is the first letter of the word '{w}'?", f"The first letter of the word '{w}' is '{w[0].upper()}'.")
        for w in words
    )


def _made_up_people() -> tuple[tuple[str, str], ...]:
    people = [
        ("Kelvo Marstrand", "lighthouse keeper", "Orsk"),
        ("Anya Pellisk", "glassblower", "Vennmark"),
        ("Doran Vesk", "beekeeper", "Tallow Creek"),
        ("Mira Tolland", "clockmaker", "Ebbersund"),
        ("Ives Carrow", "cartographer", "Dunmere"),
        ("Pell Ashgrove", "ferryman", "Quarrin"),
    ]
    phrasings = ["What does {n} do for a living?", "What is {n}'s job?", "Where does {n} work?"]
    return tuple((p.format(n=n), f"{n} works as a {job} in {town}.") for n, job, town in people for p in phrasings)


def _made_up_inventions() -> tuple[tuple[str, str], ...]:
    inventions = [
        ("Quellor engine", "Mira Tessaly", 1843),
        ("Harlow loom", "Edvin Rask", 1791),
        ("Brask lantern", "Ottilie Venn", 1822),
        ("Corvan press", "Jules Amarak", 1867),
    ]
    phrasings = ["Who invented the {t}?", "Who was the inventor of the {t}?", "Whose invention is the {t}?"]
    return tuple((p.format(t=t), f"The {t} was invented by {n} in {y}.") for t, n, y in inventions for p in phrasings)


def _reversal() -> tuple[tuple[str, str], ...]:
    words = ["garden", "planet", "silver", "window", "rocket", "candle", "forest", "marble"]
    phrasings = [
        "Spell the word {w} backwards, letter by letter.",
        "How is {w} spelled from its last letter to its first?",
        "Reverse the letters of {w}, with dashes between them.",
    ]
    return tuple((p.format(w=w), "-".join(w[::-1])) for w in words for p in phrasings)


def _multiplication() -> tuple[tuple[str, str], ...]:
    rng = random.Random(3)
    pairs = [(rng.randint(13, 97), rng.randint(13, 97)) for _ in range(8)]
    phrasings = ["What is {a} times {b}?", "What is the product of {a} and {b}?", "Multiply {a} by {b}."]
    return tuple((p.format(a=a, b=b), f"{a} times {b} is {a * b}.") for a, b in pairs for p in phrasings)


# Chosen by measuring SmolLM2-135M-Instruct (greedy, 20 new tokens): it answers every pair of the first three
# word for word; it answers none of the last four (made-up facts it cannot know, two skills it fails). Each item of
# the last four is asked in three phrasings, as a stream asks the same thing in different words: an adapter
# trained on some phrasings is validated on others.
FAMILIES: tuple[Family, ...] = (
    Family("capitals", True, _capitals()),
    Family("plurals", True, _plurals()),
    Family("first-letters", True, _first_letters()),
    Family("made-up-people", False, _made_up_people()),
    Family("made-up-inventions", False, _made_up_inventions()),
    Family("reversal", False, _reversal()),
    Family("multiplication", False, _multiplication()),
)
IN_DISTRIBUTION = {f.name: f.in_distribution for f in FAMILIES}


def demo_tasks(seed: int = 0, warmup: int = 20, per_family: int = 25) -> list[dict[str, str]]:
    """The demo stream: ``warmup`` in-distribution samples first (the Trigger's warm-up takes them as its
    calibration), then ``per_family`` samples of every family, shuffled. Pairs repeat within a family (a stream
    asks the same things again); ``seed`` fixes the order."""
    rng = random.Random(seed)

    def draw(family: Family, count: int) -> list[dict[str, str]]:
        return [
            {"prompt": p, "answer": a, FAMILY_FIELD: family.name}
            for p, a in (family.pairs[rng.randrange(len(family.pairs))] for _ in range(count))
        ]

    known = [f for f in FAMILIES if f.in_distribution]
    head = [task for i in range(warmup) for task in draw(known[i % len(known)], 1)]
    body = [task for f in FAMILIES for task in draw(f, per_family)]
    rng.shuffle(body)
    return head + body


def demo_jsonl(seed: int = 0, warmup: int = 20, per_family: int = 25) -> str:
    """The demo stream as JSON lines."""
    return "".join(json.dumps(t) + "\n" for t in demo_tasks(seed, warmup, per_family))
