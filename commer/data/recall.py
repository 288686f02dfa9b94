"""The recall probe: can the soft prompt carry one fact from a user's documents to the answer?

A synthetic task, made in code (no data files): each user has one document stating a fact about them (a hobby, a city,
a pet or a drink) among ``n_docs - 1`` unrelated sentences, in random order, and is asked for that fact; the answer is
one word. The model that reads the user's documents in its prompt answers it at once, a model without documents can
only guess among the values, so own documents beating another user's documents measures exactly whether compression
and merging pass a document's content through. It is a probe of the machinery, not one of the paper's tasks.
"""

from __future__ import annotations

import random

from commer.errors import ConfigError
from commer.text import Example

# attribute: (how a document states it, how the user asks for it, the values)
FACTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "hobby": (
        "My favourite hobby is {}.",
        "What is my favourite hobby? Answer with one word.",
        ("hiking", "chess", "baking", "surfing", "painting", "cycling", "gardening", "knitting", "fishing", "poetry",
         "tennis", "climbing", "photography", "dancing", "swimming", "pottery"),
    ),
    "city": (
        "I live in {}.",
        "Which city do I live in? Answer with one word.",
        ("Paris", "Berlin", "Tokyo", "Madrid", "Chicago", "Toronto", "Sydney", "Cairo", "Lisbon", "Oslo", "Dublin",
         "Seoul", "Lima", "Vienna", "Prague", "Boston"),
    ),
    "pet": (
        "I have a pet {} at home.",
        "What kind of pet do I have? Answer with one word.",
        ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "lizard", "snake", "ferret", "horse",
         "pony", "frog", "canary", "mouse", "goat"),
    ),
    "drink": (
        "Every morning I drink {}.",
        "What do I drink every morning? Answer with one word.",
        ("coffee", "tea", "milk", "juice", "water", "cocoa", "lemonade", "kombucha", "espresso", "smoothies",
         "matcha", "chai", "soda", "cider", "yogurt", "broth"),
    ),
}  # fmt: skip
FILLER = (
    "I went to the store yesterday.",
    "The weather was nice this week.",
    "Work has been busy lately.",
    "I watched a movie with friends.",
    "My train was late again.",
    "We had pasta for dinner.",
    "The meeting ran long today.",
    "I finally cleaned the kitchen.",
    "My phone battery died at noon.",
    "Traffic was terrible this morning.",
    "I read a few pages before bed.",
    "The neighbours are painting their fence.",
    "I forgot my umbrella at the office.",
    "We are planning a family dinner.",
    "My laptop needs an update.",
    "The bus stop moved down the street.",
)


def recall_examples(n_users: int, n_docs: int, seed: int = 0) -> list[Example]:
    """``n_users`` users (ids ``recall-0``...), each with ``n_docs`` documents, exactly one of which holds the fact
    their question asks for; the same arguments give the same examples."""
    if n_docs < 1:
        raise ConfigError(f"n_docs must be >= 1 for the recall probe, got {n_docs}")
    if n_docs - 1 > len(FILLER):
        raise ConfigError(f"n_docs must be <= {len(FILLER) + 1} for the recall probe, got {n_docs}")
    rng = random.Random(seed)
    examples = []
    for user in range(n_users):
        statement, question, values = FACTS[rng.choice(sorted(FACTS))]
        value = rng.choice(values)
        documents = [statement.format(value), *rng.sample(FILLER, n_docs - 1)]
        rng.shuffle(documents)
        examples.append(Example(f"recall-{user}", documents, question, value))
    return examples
