"""The bundled, deterministic and verifiable instruction task ("story facts").

Each item gives a short generated sentence and asks for one of its facts:
the colour, the animal, the place or the number of friends. There is exactly
one right answer, so exact match is a true accuracy. Held-out items use
sentences that never occur in training, so a model cannot pass by memorising
items; it has to learn to follow the instruction.

Preference pairs for reward models reuse the same items: `chosen` is the right
answer and `rejected` a near miss, never a random string (see `near_miss`).

Topic rows (`make_topic_splits`) are a text-classification task for encoders such as MiniLM.

`python -m distft.data.task OUT_DIR` regenerates the files shipped in
`configs/data/`; a test checks that they match this generator.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

from distft.data.formats import alpaca_prompt

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


CATEGORIES = {"color": COLORS, "animal": ANIMALS, "place": PLACES, "number": NUMBERS}
NEAR_MISS_KINDS = ("typo", "same_category", "swap")


def facts_in(sentence: str) -> dict:
    """The facts of a rendered sentence: each category occurs in it exactly once."""
    words = {w.strip(".,").lower() for w in sentence.split()}
    facts = {}
    for key, values in CATEGORIES.items():
        found = [v for v in values if v.lower() in words]
        if len(found) != 1:
            raise ValueError(f"expected one {key} in {sentence!r}, found {found}")
        facts[key] = found[0]
    return facts


def typo(word: str, rng: random.Random) -> str:
    """`word` with one letter replaced, never landing on a real answer of any category."""
    known = {v.lower() for values in CATEGORIES.values() for v in values}
    while True:
        i = rng.randrange(len(word))
        letter = rng.choice(string.ascii_lowercase)
        if letter == word[i].lower():
            continue
        candidate = word[:i] + (letter.upper() if word[i].isupper() else letter) + word[i + 1 :]
        if candidate.lower() not in known:
            return candidate


def near_miss(facts: dict, ask: str, kind: str, rng: random.Random) -> str:
    """A wrong answer that is close to the right one.

    - typo: the right word with one letter wrong ("bear" -> "bexr")
    - same_category: another value of the asked category, absent from the sentence ("bear" -> "wolf")
    - swap: another fact of the same sentence, from the wrong slot (asked the animal, answers its colour)
    """
    answer = facts[ask]
    if kind == "typo":
        return typo(answer, rng)
    if kind == "same_category":
        return rng.choice([v for v in CATEGORIES[ask] if v != answer])
    if kind == "swap":
        return facts[rng.choice([k for k in facts if k != ask])]
    raise ValueError(f"unknown near-miss kind {kind!r}; one of {', '.join(NEAR_MISS_KINDS)}")


def make_preference_item(item: dict, kind: str, rng: random.Random) -> dict:
    """A chat-format pair from a task item: the prompt SFT trains on, the answer, and a near miss."""
    ask = next(k for k, q in QUESTIONS.items() if q == item["instruction"])
    miss = near_miss(facts_in(item["input"]), ask, kind, rng)
    return {
        "prompt": [{"role": "user", "content": alpaca_prompt(item)}],
        "chosen": [{"role": "assistant", "content": item["output"]}],
        "rejected": [{"role": "assistant", "content": miss}],
        "kind": kind,
    }


# Training pairs lean on the hard kind: a typo or a wrong-slot answer is learned within an epoch,
# telling a same-category entity from the one in the sentence takes in-context retrieval and
# most of the steps (measured). Held-out pairs keep the kinds in equal thirds.
TRAIN_KIND_CYCLE = ("same_category", "typo", "same_category", "swap")


def make_preference_splits(n_train: int = 3000, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pairs from the task's train and held-out items, so held-out sentences stay unseen."""
    train, test = make_splits()
    rng = random.Random(seed + 1)

    def pairs(items, kinds):
        return [make_preference_item(item, kinds[i % len(kinds)], rng) for i, item in enumerate(items)]

    return pairs(train[:n_train], TRAIN_KIND_CYCLE), pairs(test, NEAR_MISS_KINDS)


def make_feedback_rows(n_train: int = 3000, seed: int = 0) -> list[dict]:
    """Unpaired binary feedback (KTO's data) from the task's train items: each item's prompt once, with
    either its answer (label true) or a near miss (label false), alternating, so no prompt has both."""
    train, _ = make_splits()
    rng = random.Random(seed + 2)
    rows = []
    for i, item in enumerate(train[:n_train]):
        pair = make_preference_item(item, TRAIN_KIND_CYCLE[(i // 2) % len(TRAIN_KIND_CYCLE)], rng)
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return rows


# Topic classification for encoders: held-out sentences use topic words that never occur in training,
# so only a model that knows what the words mean (a pretrained encoder) can classify them.
TOPIC_WORDS = {
    "sports": (["football", "tennis", "swimming", "cycling", "marathon", "goalkeeper", "referee", "tournament"],
               ["rugby", "hockey", "volleyball", "sprinter", "coach", "stadium"]),
    "food": (["bread", "pasta", "soup", "cheese", "salad", "bakery", "recipe", "dessert"],
             ["noodles", "pancakes", "chef", "omelette", "restaurant", "curry"]),
    "weather": (["rain", "storm", "snow", "sunshine", "thunder", "forecast", "humidity", "drizzle"],
                ["hail", "blizzard", "fog", "heatwave", "hurricane", "frost"]),
    "technology": (["software", "laptop", "robot", "database", "smartphone", "algorithm", "server", "browser"],
                   ["processor", "keyboard", "internet", "compiler", "tablet", "encryption"]),
}
TOPIC_TEMPLATES = [
    "Yesterday in {place} everyone was talking about the {w1}.",
    "My neighbour wrote a long letter about {w1} and {w2}.",
    "The news this morning covered the {w1} near {place}.",
    "We spent the whole afternoon discussing {w1}, then {w2}.",
    "Nobody in {place} expected the {w1} to matter so much.",
    "Her favourite topic has always been {w1}.",
]


def make_topic_splits(n_train: int = 800, n_test: int = 400, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) rows of {text, label}; test rows use only the held-out topic words."""
    rng = random.Random(seed)

    def rows(n: int, held_out: bool) -> list[dict]:
        out = []
        for i in range(n):
            label = sorted(TOPIC_WORDS)[i % len(TOPIC_WORDS)]
            words = TOPIC_WORDS[label][1 if held_out else 0]
            w1, w2 = rng.sample(words, 2)
            text = rng.choice(TOPIC_TEMPLATES).format(w1=w1, w2=w2, place=rng.choice(PLACES))
            out.append({"text": text, "label": label})
        rng.shuffle(out)
        return out

    return rows(n_train, False), rows(n_test, True)


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "configs/data")
    train, test = make_splits()
    write_jsonl(train, out / "facts_train.jsonl")
    write_jsonl(test, out / "facts_test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} held-out items to {out}")
    train, test = make_preference_splits()
    write_jsonl(train, out / "facts_prefs_train.jsonl")
    write_jsonl(test, out / "facts_prefs_test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} held-out preference pairs to {out}")
    feedback = make_feedback_rows()
    write_jsonl(feedback, out / "facts_feedback_train.jsonl")
    print(f"wrote {len(feedback)} labelled responses (unpaired feedback) to {out}")
    train, test = make_topic_splits()
    write_jsonl(train, out / "topics_train.jsonl")
    write_jsonl(test, out / "topics_test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} held-out topic rows to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
