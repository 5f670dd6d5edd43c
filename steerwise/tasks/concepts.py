"""A tiny, deterministic "concept world": template sentences about a few topics.

This is the text world behind steerwise's embedded demo model (``steerwise/assets/concept-lm``,
trained by ``scripts/train_demo_model.py``). It reproduces the DSAS paper's Figure-1 setting:
a steering vector that makes the model say "pear" should act in *fruit* contexts only.

* Every topic (:data:`TOPICS`) has its own lexicon (agents, verbs, adjectives, places, nouns) and
  several sentence templates. One slot per topic is the *key noun* (the fruit, the animal, the
  vehicle, ...); sentence beginnings for generation (:func:`demo_prompts`) stop right before it.
* "pear" is one of 20 fruits drawn uniformly, so roughly 1 fruit sentence in 20 mentions it.
* About 40 % of the templates mention their key noun twice ("the chef peeled a lime, and the lime
  was sweet."), and every key noun has two associated adjectives (:func:`associated_adjectives`;
  pear: green, juicy), so a noun shapes the rest of its sentence.
* :func:`demo_sets` gives contrastive pairs by default: ``target[i]`` is ``source[i]`` with its
  fruit replaced by "pear".
* The training corpus (:func:`corpus`) is written in paragraphs that keep to one topic and one
  focus noun, and mixes in a few "bridge" sentences (a fruit mentioned in another topic);
  everything else (:func:`topic_sentences`, :func:`demo_sets`, :func:`demo_prompts`) is pure.
* Everything is drawn from :class:`random.Random` seeded with a *string* that names the stream
  (e.g. ``"corpus:0"``), which is deterministic across runs, platforms and ``PYTHONHASHSEED``.
  The training corpus, the topic samples, the steering fitting sets and the prompts use disjoint
  streams.

Text is lower-case; words are ``[a-z]+`` and the only punctuation is ``.`` and ``,``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "ASSOC_P",
    "BRIDGE_P",
    "FOCUS_P",
    "FRUIT_FOCUS_KEEP",
    "STEER_TOPIC",
    "STEER_WORD",
    "TOPICS",
    "associated_adjectives",
    "corpus",
    "demo_prompts",
    "demo_sets",
    "topic_sentences",
    "vocabulary",
    "words",
]

STEER_WORD = "pear"
"""The word the demo's steering vector induces."""

STEER_TOPIC = "fruit"
"""The topic in which the demo's steering is wanted (DSAS gate: this topic vs the others)."""

# --------------------------------------------------------------------------------------------
# Lexicons
# --------------------------------------------------------------------------------------------

_PEOPLE = ("child", "boy", "girl", "woman", "man", "teacher", "neighbor", "student", "stranger")
_COMMON: dict[str, tuple[str, ...]] = {
    "relative": (
        "mother", "father", "sister", "brother", "aunt", "uncle", "cousin", "grandmother",
        "grandfather", "friend",
    ),
    "time": ("morning", "afternoon", "evening", "summer", "winter", "spring", "autumn", "night"),
}

_LEXICON: dict[str, dict[str, tuple[str, ...]]] = {
    "fruit": {
        "key": (
            "apple", "banana", "cherry", "plum", "peach", "pear", "mango", "lemon", "lime",
            "orange", "grape", "melon", "apricot", "kiwi", "fig", "papaya", "lychee", "guava",
            "coconut", "strawberry",
        ),
        "agent": ("farmer", "grocer", "baker", "cook", "chef", "vendor", "gardener", "picker",
                  "shopper") + _PEOPLE,
        "verb": (
            "ate", "picked", "peeled", "sliced", "washed", "bought", "sold", "squeezed", "tasted",
            "shared", "packed", "chopped", "dropped", "grew", "smelled", "cut", "offered", "saved",
        ),
        "adj": (
            "ripe", "sweet", "sour", "juicy", "fresh", "green", "yellow", "red", "crisp", "small",
            "large", "bitter", "golden", "fragrant", "round", "firm",
        ),
        "place": ("market", "orchard", "kitchen", "garden", "grocery", "farm", "stall", "picnic",
                  "bakery", "shop"),
        "container": ("basket", "bowl", "bag", "box", "crate", "jar", "bucket", "sack"),
        "dish": ("pie", "salad", "jam", "cake", "smoothie", "sauce", "pudding", "dessert"),
    },
    "animals": {
        "key": (
            "dog", "cat", "horse", "rabbit", "fox", "owl", "cow", "sheep", "goat", "duck", "mouse",
            "bear", "wolf", "deer", "frog", "tiger", "lion", "eagle", "squirrel", "donkey", "pig",
            "turtle",
        ),
        "agent": ("zookeeper", "hunter", "vet", "shepherd", "ranger", "rancher") + _PEOPLE,
        "verb": (
            "fed", "chased", "watched", "petted", "followed", "saw", "heard", "found", "rescued",
            "trained", "brushed", "photographed", "counted", "called", "caught", "tamed",
        ),
        "iverb": ("barked", "howled", "hid", "ran", "slept", "jumped", "swam", "growled",
                  "squeaked", "wandered", "played", "rested"),
        "adj": (
            "brown", "white", "black", "fluffy", "wild", "tame", "hungry", "sleepy", "tiny", "big",
            "old", "young", "clever", "shy", "spotted", "gentle", "fierce", "furry",
        ),
        "place": ("forest", "barn", "field", "zoo", "meadow", "river", "pond", "hill", "yard",
                  "woods", "stable", "den"),
    },
    "vehicles": {
        "key": (
            "car", "bus", "truck", "train", "bicycle", "motorcycle", "van", "taxi", "tram",
            "scooter", "tractor", "boat", "ship", "plane", "helicopter", "jeep", "ambulance",
            "subway", "ferry", "wagon",
        ),
        "agent": ("driver", "pilot", "mechanic", "conductor", "passenger", "captain",
                  "cyclist") + _PEOPLE,
        "verb": (
            "drove", "parked", "repaired", "cleaned", "painted", "fixed", "rode", "boarded",
            "steered", "towed", "rented", "loaded", "started", "missed", "raced", "inspected",
        ),
        "iverb": ("arrived", "left", "crashed", "stalled", "waited", "honked", "turned", "sped",
                  "departed", "broke", "stopped", "slowed"),
        "adj": (
            "fast", "slow", "new", "rusty", "shiny", "blue", "electric", "loud", "empty",
            "crowded", "broken", "modern", "silver", "long", "dirty", "cheap",
        ),
        "place": ("station", "garage", "road", "highway", "bridge", "airport", "harbor", "street",
                  "tunnel", "depot", "avenue", "crossing"),
    },
    "weather": {
        "key": (
            "rain", "snow", "wind", "storm", "fog", "cloud", "sun", "thunder", "lightning", "hail",
            "frost", "mist", "breeze", "drizzle", "blizzard", "rainbow", "sleet", "heat",
            "sunshine", "gale",
        ),
        "agent": ("forecaster", "hiker", "villager", "traveler", "fisherman", "shepherd") + _PEOPLE,
        "iverb": ("rolled", "drifted", "swept", "spread", "passed", "moved", "lingered",
                  "settled", "returned", "came", "stayed", "poured"),
        "adj": (
            "cold", "warm", "heavy", "light", "strong", "bright", "dark", "gray", "icy", "thick",
            "sudden", "chilly", "humid", "dry", "wet", "freezing", "fierce", "mild",
        ),
        "place": ("hills", "valley", "city", "coast", "mountains", "lake", "village", "fields",
                  "town", "sea", "plain", "rooftops"),
        "state": ("quiet", "white", "wet", "calm", "dark", "cold", "bright", "silent", "muddy",
                  "frozen"),
    },
    "music": {
        "key": (
            "guitar", "piano", "violin", "drum", "flute", "trumpet", "cello", "harp", "saxophone",
            "clarinet", "banjo", "organ", "ukulele", "accordion", "tuba", "trombone", "harmonica",
            "oboe", "xylophone", "mandolin",
        ),
        "agent": ("musician", "singer", "pianist", "drummer", "band", "orchestra", "composer",
                  "choir", "bandleader") + _PEOPLE,
        "verb": ("played", "tuned", "practiced", "strummed", "recorded", "borrowed", "polished",
                 "studied", "carried", "tested"),
        "noun": ("song", "melody", "tune", "symphony", "ballad", "chorus", "rhythm", "waltz",
                 "anthem", "lullaby", "hymn", "solo"),
        "adj": (
            "loud", "quiet", "beautiful", "sad", "happy", "slow", "lively", "soft", "famous",
            "cheerful", "haunting", "jazzy", "classical", "catchy", "gentle", "joyful",
        ),
        "place": ("studio", "theater", "stage", "church", "club", "festival", "ballroom",
                  "auditorium", "cafe", "concert"),
    },
    "sports": {
        "key": (
            "football", "tennis", "soccer", "basketball", "baseball", "hockey", "golf",
            "volleyball", "rugby", "cricket", "boxing", "badminton", "skiing", "rowing",
            "wrestling", "handball", "bowling", "surfing", "archery", "fencing",
        ),
        "agent": ("player", "coach", "team", "referee", "athlete", "goalkeeper", "fan", "champion",
                  "runner", "umpire") + _PEOPLE,
        "verb": ("won", "lost", "watched", "joined", "played", "coached", "practiced", "loved",
                 "started", "finished"),
        "noun": ("match", "game", "tournament", "championship", "league", "race", "season",
                 "final", "contest", "cup"),
        "adj": (
            "exciting", "close", "long", "tough", "easy", "important", "thrilling", "boring",
            "quick", "hard", "fair", "amazing", "professional", "local", "great", "famous",
        ),
        "place": ("stadium", "field", "court", "gym", "arena", "park", "pool", "track", "club",
                  "pitch"),
    },
}

# Templates: space-separated words; ``{slot}`` draws from the topic's (or the common) lexicon,
# ``{slot2}`` draws again from the same list, distinct from ``{slot}``; ``{=slot}`` repeats the
# word drawn for ``{slot}``; ``{key}`` is the topic's key noun; ``{a}`` is the article "a"/"an"
# agreeing with the next word.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "fruit": (
        "the {agent} at the {place} {verb} {a} {adj} {key} .",
        "{a} {key} from the {place} tasted {adj} and {adj2} .",
        "the {agent} {verb} {a} {key} and put it in the {container} .",
        "my {relative} likes {adj} {key} juice in the {time} .",
        "in the {time} , the {agent} {verb} {a} {key} from the {container} .",
        "the {agent} made a {dish} with {a} {adj} {key} .",
        "there was {a} {adj} {key} in the {container} on the table .",
        "we {verb} {a} {key} and {a} {key2} at the {place} .",
        "the {adj} {key} was the best fruit at the {place} .",
        "my {relative} {verb} {a} {key} for the {dish} .",
        "the {agent} {verb} {a} {key} , and the {=key} was {adj} .",
        "we bought {a} {adj} {key} because the {=key} at the {place} was cheap .",
        "the {agent} {verb} {a} {adj} {key} , but the {=key} was {adj2} .",
        "{a} {key} fell into the {container} , so the {agent} {verb} the {=key} .",
        "my {relative} {verb} the {key} and {verb2} the {=key} again .",
        "the {key} in the {container} was {adj} , so we {verb} the {=key} .",
    ),
    "animals": (
        "the {agent} {verb} {a} {adj} {key} near the {place} .",
        "{a} {adj} {key} {iverb} in the {place} all {time} .",
        "the {agent} saw {a} {key} and {a} {key2} by the {place} .",
        "my {relative} has {a} {adj} {key} that {iverb} every {time} .",
        "in the {place} , the {agent} {verb} {a} {key} .",
        "the {key} {iverb} when the {key2} came to the {place} .",
        "there was {a} {adj} {key} sleeping in the {place} .",
        "the {agent} {verb} the {key} in the {time} .",
        "the {agent} {verb} {a} {key} , and the {=key} {iverb} .",
        "we looked for the {adj} {key} because the {=key} {iverb} near the {place} .",
        "the {agent} {verb} the {adj} {key} , but the {=key} {iverb} .",
        "{a} {key} came to the {place} , so the {agent} {verb} the {=key} .",
        "the {key} {iverb} in the {place} , and the {=key} was {adj} .",
    ),
    "vehicles": (
        "the {agent} {verb} the {adj} {key} at the {place} .",
        "{a} {adj} {key} {iverb} near the {place} in the {time} .",
        "the {agent} took the {key} to the {place} .",
        "we waited for the {key} at the {place} for an hour .",
        "my {relative} {verb} {a} {adj} {key} last week .",
        "the {key} and the {key2} {iverb} at the {place} .",
        "near the {place} , the {agent} {verb} {a} {key} .",
        "in the {time} , the {agent} {verb} the {key} .",
        "the {agent} {verb} {a} {key} , and the {=key} {iverb} .",
        "we took the {adj} {key} because the {=key} was faster than the {key2} .",
        "the {agent} {verb} the {adj} {key} , but the {=key} {iverb} .",
        "{a} {key} came to the {place} , so the {agent} {verb} the {=key} .",
        "the {key} {iverb} at the {place} , and the {=key} was {adj} .",
    ),
    "weather": (
        "the {adj} {key} {iverb} over the {place} in the {time} .",
        "the {agent} said that {a} {adj} {key} would reach the {place} tomorrow .",
        "in the {time} , {a} {adj} {key} covered the {place} .",
        "the {agent} watched the {adj} {key} from the window .",
        "after the {key} , the {key2} {iverb} over the {place} .",
        "we stayed inside because of the {adj} {key} .",
        "the {place} looked {state} after the {adj} {key} .",
        "my {relative} walked to the {place} in the {key} .",
        "the {agent} saw the {key} , and the {=key} {iverb} over the {place} .",
        "we talked about the {adj} {key} because the {=key} was {state} .",
        "the {key} came to the {place} , and the {=key} was {adj} .",
        "{a} {adj} {key} {iverb} over the {place} , so the {agent} watched the {=key} .",
        "the {agent} feared the {key} , but the {=key} {iverb} over the {place} .",
    ),
    "music": (
        "the {agent} played {a} {adj} {noun} on the {key} at the {place} .",
        "the {agent} {verb} the {key} in the {place} every {time} .",
        "my {relative} is learning to play the {key} .",
        "{a} {adj} {noun} filled the {place} as the {agent} began to sing .",
        "at the {place} , the {agent} {verb} {a} {adj} {key} .",
        "the {key} and the {key2} sounded {adj} together .",
        "we listened to {a} {adj} {noun} by the {agent} on the {key} .",
        "in the {time} , the {agent} {verb} the {key} .",
        "the {agent} {verb} the {key} , and the {=key} sounded {adj} .",
        "we bought {a} {adj} {key} because the {=key} in the {place} was old .",
        "the {agent} {verb} the {key} , but the {=key} sounded {adj} .",
        "{a} {adj} {key} stood in the {place} , so the {agent} {verb} the {=key} .",
        "the {agent} loved the {key} , and the {=key} was {adj} .",
    ),
    "sports": (
        "the {agent} {verb} {a} {adj} {key} {noun} at the {place} .",
        "our {agent} practiced {key} at the {place} every {time} .",
        "my {relative} loves to watch {key} on the weekend .",
        "the {key} {noun} ended with {a} {adj} finish .",
        "the {agent} scored a point in the {adj} {key} {noun} .",
        "after the {key} {noun} , the {agent} lifted the trophy .",
        "we played {key} and {key2} at the {place} in the {time} .",
        "in the {time} , the {agent} {verb} the {key} {noun} .",
        "the {agent} {verb} {a} {key} {noun} , and the {=key} fans were happy .",
        "we watched {key} because the {=key} {noun} at the {place} was {adj} .",
        "the {agent} loved {key} , and the {=key} {noun} was {adj} .",
        "{key} came to the {place} , so the {agent} {verb} the {=key} {noun} .",
        "the {agent} {verb} the {key} {noun} , but the {=key} {noun2} was {adj} .",
    ),
}

# Bridge templates: sentences of a non-fruit topic that also mention a fruit (``{fruit}``). They
# occur in the training corpus only (with probability :data:`BRIDGE_P` per non-fruit sentence),
# never in :func:`topic_sentences`, :func:`demo_sets` or :func:`demo_prompts`, which stay pure.
# They let a fruit -- and so a "pear" steering direction -- surface grammatically in any context.
_BRIDGES: dict[str, tuple[str, ...]] = {
    "animals": (
        "the {agent} fed the {key} {a} {fruit} .",
        "the {adj} {key} ate {a} {fruit} in the {place} .",
    ),
    "vehicles": (
        "the {agent} ate {a} {fruit} on the {key} .",
        "the {key} brought {a} {fruit} to the {place} .",
    ),
    "weather": (
        "the {key} knocked {a} {fruit} from the tree .",
        "we ate {a} {fruit} while the {key} {iverb} over the {place} .",
    ),
    "music": (
        "the {agent} ate {a} {fruit} before playing the {key} .",
        "the {agent} wrote a {noun} about {a} {fruit} and played it on the {key} .",
    ),
    "sports": (
        "the {agent} ate {a} {fruit} after the {key} {noun} .",
        "the {key} team shared {a} {fruit} at the {place} .",
    ),
}

TOPICS: tuple[str, ...] = tuple(_TEMPLATES)
"""The topics of the concept world, in a fixed order."""

FOCUS_P = 0.7
"""In :func:`corpus`, probability that a sentence's key noun (and fruit) is its paragraph's focus."""

BRIDGE_P = 0.3
"""In :func:`corpus`, probability that a non-fruit sentence is a bridge (also mentions a fruit)."""

ASSOC_P = 0.5
"""Probability that an adjective slot takes one of the sentence key noun's two associated
adjectives (:func:`associated_adjectives`), so that every key noun has a little meaning of its own
(e.g. a pear is often green or juicy) beyond its topic."""

FRUIT_FOCUS_KEEP = 0.7
"""In :func:`corpus`, probability that a paragraph keeps the previous paragraph's focus fruit (the
"favourite fruit" of a stretch of text, used by fruit paragraphs and bridge sentences alike)."""

_A_EXCEPTIONS = {"ukulele": "a", "hour": "an"}
_SLOT = re.compile(r"^\{(=?[a-z]+?)(\d?)\}$")
_WORD = re.compile(r"[a-z]+")


def _make_assoc() -> dict[str, dict[str, tuple[str, ...]]]:
    fixed = {"pear": ("green", "juicy")}
    table: dict[str, dict[str, tuple[str, ...]]] = {}
    for topic, lex in _LEXICON.items():
        rng = random.Random(f"assoc:{topic}")
        table[topic] = {
            key: fixed.get(key) or tuple(rng.sample(lex["adj"], 2)) for key in lex["key"]
        }
    return table


_ASSOC = _make_assoc()


def associated_adjectives(word: str) -> tuple[str, ...]:
    """The two adjectives associated with a key noun (e.g. ``"pear"`` -> green, juicy)."""
    for table in _ASSOC.values():
        if word in table:
            return table[word]
    raise ValueError(f"{word!r} is not a key noun of any topic")


def _article(next_word: str) -> str:
    if next_word in _A_EXCEPTIONS:
        return _A_EXCEPTIONS[next_word]
    return "an" if next_word[0] in "aeiou" else "a"


def _check_topic(topic: str) -> None:
    if topic not in _TEMPLATES:
        raise ValueError(f"unknown topic {topic!r}; valid topics: {', '.join(TOPICS)}")


def _lexicon(topic: str, name: str) -> tuple[str, ...]:
    lex = _LEXICON[topic]
    if name in lex:
        return lex[name]
    if name == "fruit":
        return _LEXICON["fruit"]["key"]
    return _COMMON[name]


def _render(
    topic: str,
    template: str,
    rng: random.Random,
    focus: Mapping[str, str] | None = None,
    focus_p: float = 0.0,
) -> tuple[list[str], list[str]]:
    """Fill ``template``; return the words and, per word, its slot name ('' for literals).

    Tags are the slot names as written (``key``, ``key2``; a ``{=key}`` repeat is tagged
    ``key``). Articles are left as ``"{a}"`` (see :func:`_finish`). The key noun (and a bridge's fruit) is
    drawn first; each ``{adj}`` slot then takes one of the key noun's associated adjectives with
    probability :data:`ASSOC_P`. ``focus``: the paragraph's focus word per slot name
    (``{"key": ..., "fruit": ...}``); the first draw of such a slot takes it with probability
    ``focus_p`` (this is what makes a paragraph stay "about" one fruit, animal, ...).
    """
    toks = template.split()
    matches = [_SLOT.match(t) for t in toks]
    names = [m.group(1) if m else None for m in matches]
    digits = [m.group(2) if m else "" for m in matches]
    drawn: dict[str, list[str]] = {}

    def draw(name: str) -> str:
        used = drawn.setdefault(name, [])
        if focus and name in focus and not used and rng.random() < focus_p:
            word = focus[name]
        else:
            pool = [w for w in _lexicon(topic, name) if w not in used]
            if name.startswith("adj") and "key" in drawn and rng.random() < ASSOC_P:
                assoc = [w for w in _ASSOC[topic][drawn["key"][0]] if w not in used]
                pool = assoc or pool
            word = rng.choice(pool)
        used.append(word)
        return word

    filled: dict[int, str] = {}
    for i, name in enumerate(names):  # key nouns first
        if name in ("key", "fruit"):
            filled[i] = draw(name)
    words: list[str] = []
    tags: list[str] = []
    for i, (tok, name) in enumerate(zip(toks, names)):
        if name is None:
            words.append(tok)
            tags.append("")
        elif name == "a":
            words.append("{a}")
            tags.append("a")
        elif name.startswith("="):  # repeat the value drawn for that slot
            words.append(drawn[name[1:]][0])
            tags.append(name[1:])
        else:
            words.append(filled[i] if i in filled else draw(name))
            tags.append(name + digits[i])
    return words, tags


def _articles(words: Sequence[str]) -> list[str]:
    """Resolve the ``{a}`` placeholders."""
    out = list(words)
    for i, w in enumerate(out):
        if w == "{a}":
            out[i] = _article(out[i + 1])
    return out


def _finish(words: Sequence[str]) -> str:
    """Resolve ``{a}`` articles and join into text."""
    return _join(_articles(words))


def _join(words: Sequence[str]) -> str:
    return " ".join(words).replace(" .", ".").replace(" ,", ",")


def words(text: str) -> list[str]:
    """The lower-case words of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def _sample(
    topic: str,
    n: int,
    rng: random.Random,
    require_word: str | None,
    exclude_word: str | None,
    focus: Mapping[str, str] | None = None,
    focus_p: float = 0.0,
    bridge_p: float = 0.0,
) -> list[str]:
    _check_topic(topic)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    req = require_word.lower() if require_word is not None else None
    exc = exclude_word.lower() if exclude_word is not None else None
    if req is not None and req == exc:
        raise ValueError(f"require_word and exclude_word are the same word {req!r}")
    if req is not None and req not in vocabulary(topic):
        raise ValueError(f"require_word {req!r} never occurs in topic {topic!r}")
    out: list[str] = []
    templates = _TEMPLATES[topic]
    max_tries = 2000 * max(n, 1)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:  # pragma: no cover - cannot happen with the shipped lexicons
            raise RuntimeError(f"could not draw {n} sentences of {topic!r} with the constraints")
        bridge = bridge_p > 0.0 and topic in _BRIDGES and rng.random() < bridge_p
        template = rng.choice(_BRIDGES[topic] if bridge else templates)
        ws, _ = _render(topic, template, rng, focus, focus_p)
        if req is not None and req not in ws:
            continue
        if exc is not None and exc in ws:
            continue
        out.append(_finish(ws))
    return out


def topic_sentences(
    topic: str,
    n: int,
    seed: int = 0,
    *,
    require_word: str | None = None,
    exclude_word: str | None = None,
) -> list[str]:
    """Draw ``n`` sentences of one topic (deterministic in ``(topic, seed)``).

    Args:
        topic: one of :data:`TOPICS`.
        n: number of sentences.
        seed: seed of this topic's stream (independent of :func:`corpus`'s).
        require_word: keep only sentences containing this word (rejection sampling).
        exclude_word: keep only sentences *not* containing this word.

    Raises:
        ValueError: unknown topic, or a ``require_word`` the topic can never produce.
    """
    _check_topic(topic)
    rng = random.Random(f"topic:{topic}:{seed}")
    return _sample(topic, n, rng, require_word, exclude_word)


def corpus(n_sentences: int, seed: int = 0) -> list[str]:
    """The training text: ``n_sentences`` sentences of mixed topics, in document order.

    The text comes in paragraphs of 1-5 consecutive sentences on one topic (drawn uniformly).
    Each paragraph is also "about" one key noun of its topic (its *focus*, drawn uniformly): every
    sentence's first key-noun slot takes the focus with probability :data:`FOCUS_P`. So a window
    of consecutive sentences mostly stays on one topic and keeps mentioning the same fruit (animal,
    vehicle, ...), which gives a language model a persistent "what is this about" direction -- the
    thing a steering vector such as "talk about pears" moves. Over a paragraph every key noun is
    equally likely, so "pear" stays as rare as any other fruit.

    The focus fruit is a "favourite fruit" that outlives paragraphs (kept with probability
    :data:`FRUIT_FOCUS_KEEP` at each new paragraph). Unlike :func:`topic_sentences`, non-fruit
    sentences here are *bridges* with probability :data:`BRIDGE_P`: they also mention a fruit
    ("the driver ate a plum on the bus."), the focus fruit with probability :data:`FOCUS_P`.
    """
    if n_sentences < 0:
        raise ValueError(f"n_sentences must be >= 0, got {n_sentences}")
    rng = random.Random(f"corpus:{seed}")
    out: list[str] = []
    fruits = _LEXICON[STEER_TOPIC]["key"]
    fruit = rng.choice(fruits)
    while len(out) < n_sentences:
        topic = rng.choice(TOPICS)
        run = min(rng.randint(1, 5), n_sentences - len(out))
        if rng.random() >= FRUIT_FOCUS_KEEP:
            fruit = rng.choice(fruits)
        key = fruit if topic == STEER_TOPIC else rng.choice(_LEXICON[topic]["key"])
        focus = {"key": key, "fruit": fruit}
        out.extend(_sample(topic, run, rng, None, None, focus, FOCUS_P, BRIDGE_P))
    return out


def demo_sets(n: int = 32, seed: int = 0, *, paired: bool = True) -> dict[str, list[str]]:
    """Fitting sets for the pear-steering demo, from their own seed streams.

    Args:
        n: sentences per set.
        seed: seed of the demo-set streams (independent of :func:`corpus`'s and
            :func:`topic_sentences`'s).
        paired: if true (default), ``target[i]`` is ``source[i]`` with its fruit (the key noun
            and its repetitions) replaced by "pear" -- contrastive pairs as in CAA, so that
            ``mean(target) - mean(source)`` is about pear and not about sampling noise. If false,
            the target sentences are drawn independently (fruit sentences that mention pear).

    Returns:
        ``{"source": ..., "target": ..., "control": ...}``, ``n`` distinct sentences each:
        ``source`` = fruit sentences without "pear", ``target`` = fruit sentences with "pear",
        ``control`` = sentences of the other topics (round-robin over them). The three sets are
        disjoint.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng_s = random.Random(f"demo-sets:source:{seed}")
    rng_t = random.Random(f"demo-sets:target:{seed}")
    rng_c = random.Random(f"demo-sets:control:{seed}")
    templates = _TEMPLATES[STEER_TOPIC]

    source: dict[str, None] = {}
    target: dict[str, None] = {}
    while len(source) < n:
        ws, tags = _render(STEER_TOPIC, rng_s.choice(templates), rng_s)
        if STEER_WORD in ws:
            continue
        src = _finish(ws)
        if paired:
            tws = [STEER_WORD if tag == "key" else w for w, tag in zip(ws, tags)]
            tgt = _finish(tws)
        else:
            tgt = _sample(STEER_TOPIC, 1, rng_t, STEER_WORD, None)[0]
        if src in source or tgt in target:
            continue
        source[src] = None
        target[tgt] = None

    others = [t for t in TOPICS if t != STEER_TOPIC]
    control: dict[str, None] = {}
    i = 0
    while len(control) < n:
        control.setdefault(_sample(others[i % len(others)], 1, rng_c, None, None)[0], None)
        i += 1
    return {"source": list(source), "target": list(target), "control": list(control)}


def demo_prompts(seed: int = 0, n_per_topic: int = 10) -> dict[str, list[str]]:
    """Sentence beginnings per topic, for generating continuations.

    Each prompt is a sentence cut right before its key noun (the fruit, the animal, ...), e.g.
    ``"the farmer at the market sold a"``; it has at least three words. Prompts are distinct, come
    from their own seed stream, and none is the beginning of a sentence of
    ``demo_sets(32, seed)`` (held out from the fitting sets).

    Returns:
        ``{topic: [n_per_topic prompts]}`` for every topic in :data:`TOPICS`.
    """
    fitting = [s for v in demo_sets(32, seed).values() for s in v]
    out: dict[str, list[str]] = {}
    for topic in TOPICS:
        rng = random.Random(f"demo-prompts:{topic}:{seed}")
        templates = [
            t for t in _TEMPLATES[topic] if "{key}" in t.split() and t.split().index("{key}") >= 3
        ]
        prompts: dict[str, None] = {}
        while len(prompts) < n_per_topic:
            ws, tags = _render(topic, rng.choice(templates), rng)
            cut = tags.index("key")
            prompt = _join(_articles(ws)[:cut])
            if any(s.startswith(prompt + " ") for s in fitting):
                continue
            prompts.setdefault(prompt, None)
        out[topic] = list(prompts)
    return out


def vocabulary(topic: str | None = None) -> list[str]:
    """Every word the world can produce (sorted), for one topic or (``None``) for all.

    ``vocabulary(topic)`` covers that topic's :func:`topic_sentences` (no corpus-only bridge
    sentences); ``vocabulary()`` covers everything, :func:`corpus` included. Punctuation ("." and
    ",") is not included.
    """
    topics: Sequence[str]
    if topic is None:
        topics = TOPICS
    else:
        _check_topic(topic)
        topics = (topic,)
    vocab: set[str] = {"a", "an"}
    for t in topics:
        templates = _TEMPLATES[t] + (_BRIDGES.get(t, ()) if topic is None else ())
        for template in templates:
            for tok in template.split():
                m = _SLOT.match(tok)
                if m is None:
                    vocab.update(words(tok))
                elif m.group(1) != "a" and not m.group(1).startswith("="):
                    vocab.update(_lexicon(t, m.group(1)))
    return sorted(vocab)


def _lexicons() -> Mapping[str, Mapping[str, tuple[str, ...]]]:
    """Read-only view of the lexicons (for inspection and tests)."""
    return _LEXICON
