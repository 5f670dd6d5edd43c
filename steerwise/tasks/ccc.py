"""Country-Capital Conflicts (CCC), the first task of activation scaling (Stoehr et al., 2024).

A context asserts a *wrong* capital for a country, then a question asks for the capital::

    The capital of France is Berlin. Q: What is the capital of France? A:   -> " Paris" / " Berlin"

``correct`` is the true capital (from :data:`COUNTRY_CAPITALS`), ``wrong`` the in-context city
(the true capital of another country). A model that answers from memory ranks ``correct`` first;
an intervention that flips the prediction makes it copy the context instead.

Every prompt of a split has the same length in words (:func:`ccc_prompt_words`): all context
templates are 7 words, all question templates 11 words, every filler sentence 6 words. The train
and test splits use disjoint (country, wrong city) pairs (a fixed partition, independent of
``seed``), with the same templates.
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
    "CONTEXT_TEMPLATES",
    "COUNTRY_CAPITALS",
    "FICTIONAL_COUNTRIES",
    "QUERY_TEMPLATES",
    "ccc_examples",
    "ccc_pairs",
    "ccc_prompt",
    "ccc_prompt_words",
]

# Real countries whose name and capital are single words.
COUNTRY_CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Czechia": "Prague",
    "Slovakia": "Bratislava",
    "Switzerland": "Bern",
    "Iceland": "Reykjavik",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Tunisia": "Tunis",
    "Libya": "Tripoli",
    "Sudan": "Khartoum",
    "Uganda": "Kampala",
    "Senegal": "Dakar",
    "Zimbabwe": "Harare",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Syria": "Damascus",
    "Lebanon": "Beirut",
    "Jordan": "Amman",
    "Turkey": "Ankara",
    "Qatar": "Doha",
    "Afghanistan": "Kabul",
    "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Brazil": "Brasilia",
    "Cuba": "Havana",
    "Canada": "Ottawa",
    "Australia": "Canberra",
}

# Context sentences asserting a capital: 7 words each.
CONTEXT_TEMPLATES: tuple[str, ...] = (
    "The capital of {country} is {city}.",
    "{city} is the capital of {country}.",
    "{country} has its capital in {city}.",
)
CONTEXT_WORDS = 7

# Questions whose answer is the capital: 11 words each.
QUERY_TEMPLATES: tuple[str, ...] = (
    "Q: What is the capital of {country}? A:",
    "Q: Which is the capital of {country}? A:",
    "Q: Tell me the capital of {country}. A:",
)
QUERY_WORDS = 11

# Made-up countries (no capital to remember). Not used by the task itself; the task model's
# training text uses them to teach copying a capital from context, the mechanism CCC pits against
# memory.
FICTIONAL_COUNTRIES: tuple[str, ...] = (
    "Zembla",
    "Arstotzka",
    "Freedonia",
    "Latveria",
    "Genovia",
    "Elbonia",
    "Ruritania",
    "Syldavia",
    "Borduria",
    "Krakozhia",
    "Sokovia",
    "Qumar",
    "Florin",
    "Markovia",
    "Grandfenwick",
    "Molvania",
)

_TEST_FRACTION = 0.25
_PAIR_SPLIT_SEED = 20241007  # fixed: the partition must not depend on the example seed


def _all_pairs() -> list[tuple[str, str]]:
    countries = sorted(COUNTRY_CAPITALS)
    return [(c, COUNTRY_CAPITALS[o]) for c in countries for o in countries if o != c]


def ccc_pairs(split: str = "train") -> list[tuple[str, str]]:
    """The (country, wrong city) pairs of a split; train and test pairs are disjoint."""
    _check_split(split)
    pairs = _all_pairs()
    random.Random(_PAIR_SPLIT_SEED).shuffle(pairs)
    n_test = round(len(pairs) * _TEST_FRACTION)
    chosen = pairs[:n_test] if split == "test" else pairs[n_test:]
    return sorted(chosen)


def ccc_prompt_words(n_context_sentences: int = 1, prefix_sentences: int = 0) -> int:
    """Length in words of every CCC prompt with these settings."""
    return prefix_sentences * FILLER_WORDS + n_context_sentences * CONTEXT_WORDS + QUERY_WORDS


def ccc_prompt(
    country: str,
    city: str,
    rng: random.Random,
    n_context_sentences: int = 1,
    prefix_sentences: int = 0,
) -> str:
    """A prompt whose context asserts ``city`` as the capital of ``country``, then asks for it.

    Context sentences use distinct templates (so at most ``len(CONTEXT_TEMPLATES)``); the question
    template is drawn from :data:`QUERY_TEMPLATES`. ``prefix_sentences`` neutral filler sentences
    come first.
    """
    if not 1 <= n_context_sentences <= len(CONTEXT_TEMPLATES):
        raise ValueError(
            f"n_context_sentences must be in 1..{len(CONTEXT_TEMPLATES)}, got {n_context_sentences}"
        )
    prefix = filler_prefix(rng, prefix_sentences)
    ctx = " ".join(
        t.format(country=country, city=city)
        for t in rng.sample(CONTEXT_TEMPLATES, n_context_sentences)
    )
    query = rng.choice(QUERY_TEMPLATES).format(country=country)
    return f"{prefix}{ctx} {query}"


def ccc_examples(
    n: int,
    seed: int = 0,
    split: str = "train",
    n_context_sentences: int = 1,
    prefix_sentences: int = 0,
) -> list[TaskExample]:
    """``n`` CCC examples of a split, deterministic in ``seed``.

    correct = the true capital of the country, wrong = the (other country's) capital the context
    asserts. Pairs are drawn without replacement while the split has enough of them (train: 3,218
    pairs, test: 1,072), then with replacement. All prompts are
    :func:`ccc_prompt_words` words long (18 with the defaults).
    """
    _check_n(n)
    _check_split(split)
    rng = random.Random(f"ccc/{split}/{seed}/{n_context_sentences}/{prefix_sentences}")
    pairs = ccc_pairs(split)
    if n <= len(pairs):
        chosen = rng.sample(pairs, n)
    else:
        chosen = [rng.choice(pairs) for _ in range(n)]
    out = []
    for country, city in chosen:
        prompt = ccc_prompt(country, city, rng, n_context_sentences, prefix_sentences)
        assert count_words(prompt) == ccc_prompt_words(n_context_sentences, prefix_sentences)
        out.append(TaskExample(prompt=prompt, correct=COUNTRY_CAPITALS[country], wrong=city))
    return out
