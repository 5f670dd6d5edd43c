"""Indirect Object Identification (IOI), the second task of activation scaling.

The classic template of Wang et al. (2022)::

    When Mary and John went to the store, John gave a drink to   -> " Mary" / " John"

``correct`` is the indirect object (the name mentioned once), ``wrong`` the subject (the name
mentioned twice). Both name orders are generated: ABBA ("Mary and John ..., John gave ...") and
BABA ("John and Mary ..., John gave ...").

Every template is 14 words long and each filler sentence 6 words, so all prompts of a call have the
same length (:func:`ioi_prompt_words`). ``prefix_sentences`` prepends neutral filler sentences,
giving the *same* task at other prompt lengths (for interventions that must transfer across
lengths). The train and test splits use disjoint sets of names (a fixed partition, independent of
``seed``); templates, places and objects are shared.
"""

from __future__ import annotations

import random

from .base import (
    FILLER_WORDS,
    TaskExample,
    _check_n,
    _check_split,
    count_words,
    filler_prefix,
)

__all__ = [
    "IOI_TEMPLATES",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "ioi_examples",
    "ioi_names",
    "ioi_prompt",
    "ioi_prompt_words",
]

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "David", "Emma",
    "Michael", "Laura", "Paul", "Kate", "Mark", "Lisa", "Peter", "Susan", "Daniel", "Rachel",
    "Steven", "Helen", "Robert", "Julia", "Richard", "Claire", "Thomas", "Amy", "George", "Emily",
    "Andrew", "Lucy", "Edward", "Grace", "Henry", "Sophie", "Jack", "Olivia", "William", "Nina",
    "Frank", "Jane", "Adam", "Rose", "Simon", "Diana", "Kevin", "Hannah",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "store", "park", "school", "station", "market", "restaurant", "office", "beach",
    "library", "hospital", "garden", "house", "cafe", "museum", "bank", "church",
)  # fmt: skip

OBJECTS: tuple[str, ...] = (
    "drink", "book", "ball", "gift", "letter", "snack", "cake", "key",
    "ring", "hat", "bottle", "pen", "bag", "card", "flower", "basket",
)  # fmt: skip

# {a} and {b} are the two names in order; {s} (the subject, repeated) and the answer follow.
# 14 words each.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "After {a} and {b} went to the {place}, {s} gave a {obj} to",
    "When {a} and {b} arrived at the {place}, {s} handed a {obj} to",
    "While {a} and {b} were at the {place}, {s} gave a {obj} to",
    "After {a} and {b} arrived at the {place}, {s} passed a {obj} to",
    "Once {a} and {b} got to the {place}, {s} brought a {obj} to",
)
TEMPLATE_WORDS = 14

_TEST_FRACTION = 1 / 3
_NAME_SPLIT_SEED = 20241008  # fixed: the partition must not depend on the example seed


def ioi_names(split: str = "train") -> list[str]:
    """The names a split draws from; train and test names are disjoint."""
    _check_split(split)
    names = list(NAMES)
    random.Random(_NAME_SPLIT_SEED).shuffle(names)
    n_test = round(len(names) * _TEST_FRACTION)
    chosen = names[:n_test] if split == "test" else names[n_test:]
    return sorted(chosen)


def ioi_prompt_words(prefix_sentences: int = 0) -> int:
    """Length in words of every IOI prompt with ``prefix_sentences`` filler sentences."""
    return prefix_sentences * FILLER_WORDS + TEMPLATE_WORDS


def ioi_prompt(
    io: str,
    subject: str,
    order: str,
    template: str,
    place: str,
    obj: str,
    prefix: str = "",
) -> str:
    """Fill an IOI template. ``order`` is ``"ABBA"`` (IO named first) or ``"BABA"``."""
    if order == "ABBA":
        a, b = io, subject
    elif order == "BABA":
        a, b = subject, io
    else:
        raise ValueError(f"order must be 'ABBA' or 'BABA', got {order!r}")
    return prefix + template.format(a=a, b=b, s=subject, place=place, obj=obj)


def ioi_examples(
    n: int,
    seed: int = 0,
    split: str = "train",
    prefix_sentences: int = 0,
    order: str | None = None,
) -> list[TaskExample]:
    """``n`` IOI examples of a split, deterministic in ``seed``.

    correct = indirect object (named once), wrong = subject (named twice). Name orders alternate
    ABBA/BABA (or are all ``order`` when given). All prompts are :func:`ioi_prompt_words` words
    long (14 without filler).
    """
    _check_n(n)
    _check_split(split)
    if order not in (None, "ABBA", "BABA"):
        raise ValueError(f"order must be None, 'ABBA' or 'BABA', got {order!r}")
    rng = random.Random(f"ioi/{split}/{seed}/{prefix_sentences}")
    names = ioi_names(split)
    out = []
    for i in range(n):
        io, subject = rng.sample(names, 2)
        ex_order = order or ("ABBA" if i % 2 == 0 else "BABA")
        prompt = ioi_prompt(
            io,
            subject,
            ex_order,
            rng.choice(IOI_TEMPLATES),
            rng.choice(PLACES),
            rng.choice(OBJECTS),
            prefix=filler_prefix(rng, prefix_sentences),
        )
        assert count_words(prompt) == ioi_prompt_words(prefix_sentences)
        out.append(TaskExample(prompt=prompt, correct=io, wrong=subject))
    return out
