"""The bundled, deterministic and verifiable instruction task ("story facts").

Each item gives a short generated sentence and asks for one of its facts:
the colour, the animal, the place or the number of friends. There is exactly
one right answer, so exact match is a true accuracy. Held-out items use
sentences that never occur in training, so a model cannot pass by memorising
items; it has to learn to follow the instruction.

`python -m distft.data.task OUT_DIR` regenerates the files shipped in
`configs/data/`; a test checks that they match this generator.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "silver"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "fox", "bear", "owl", "goat", "tiger", "mouse", "duck", "wolf"]
PLACES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Dublin", "Quito", "Delhi", "Berlin"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]

SENTENCES = [
    "The {color} {animal} walked to {place} with {number} friends.",
    "In {place}, a {color} {animal} met {number} friends.",
    "{number} friends followed the {color} {animal} to {place}.",
    "A {animal} painted {color} travelled to {place} with {number} friends.",
    "With {number} friends, the {color} {animal} reached {place}.",
]

QUESTIONS = {
    "color": "What color is the animal in this sentence?",
    "animal": "Which animal is in this sentence?",
    "place": "Which city is named in this sentence?",
    "number": "How many friends are in this sentence? Answer with a word.",
}


def random_facts(rng: random.Random) -> dict:
    return {
        "color": rng.choice(COLORS),
        "animal": rng.choice(ANIMALS),
        "place": rng.choice(PLACES),
        "number": rng.choice(NUMBERS),
    }


def render_sentence(facts: dict, template: int) -> str:
    text = SENTENCES[template].format(**facts)
    return text[0].upper() + text[1:]


def make_item(facts: dict, template: int, ask: str) -> dict:
    return {"instruction": QUESTIONS[ask], "input": render_sentence(facts, template), "output": facts[ask]}


def make_splits(n_train: int = 4000, n_test: int = 600, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out items; no held-out sentence appears in training."""
    rng = random.Random(seed)
    sentences: dict[str, tuple[dict, int]] = {}
    while len(sentences) < n_train + n_test:
        facts, template = random_facts(rng), rng.randrange(len(SENTENCES))
        sentences.setdefault(render_sentence(facts, template), (facts, template))
    asks = list(QUESTIONS)
    items = [make_item(f, t, asks[i % len(asks)]) for i, (f, t) in enumerate(sentences.values())]
    rng.shuffle(items)
    return items[:n_train], items[n_train:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "configs/data")
    train, test = make_splits()
    write_jsonl(train, out / "facts_train.jsonl")
    write_jsonl(test, out / "facts_test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} held-out items to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
