"""Shared pieces of the activation-scaling tasks (CCC, IOI).

A task example is a prompt plus two candidate next words: the one the model should predict
(``correct``) and the competing one (``wrong``). Answers are bare words; the model sees them with
the tokenizer's leading-space convention, i.e. the answer token is the encoding of ``" " + word``,
which must be exactly one token (:func:`check_single_token`).

Prompts are plain text with ordinary punctuation ("..., John gave a drink to"); their length is
measured in *words* by :func:`count_words` (a word is a run of letters/digits or a run of
punctuation), which equals the token count under a word-level tokenizer such as the shipped
``steerwise/assets/task-lm`` one.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "FILLER_SENTENCES",
    "SPLITS",
    "TaskExample",
    "answer_token_ids",
    "check_single_token",
    "count_words",
    "filler_prefix",
    "load_task_jsonl",
    "save_task_jsonl",
]

SPLITS = ("train", "test")

_WORD_RE = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class TaskExample:
    """One prompt with its correct and wrong single-word continuation."""

    prompt: str
    correct: str
    wrong: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def count_words(text: str) -> int:
    """Number of words in ``text``: runs of word characters and runs of punctuation.

    This is the token count of ``text`` under a word-level tokenizer with the ``Whitespace``
    pre-tokenizer (the shipped task model's tokenizer).
    """
    return len(_WORD_RE.findall(text))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


# Neutral filler sentences, all exactly 6 words (tokens) long and free of names and countries, so
# that ``k`` filler sentences always add exactly ``6 * k`` words to a prompt.
FILLER_SENTENCES: tuple[str, ...] = (
    "It was a warm day.",
    "The sky was very clear.",
    "The town was quiet today.",
    "Nobody had slept very well.",
    "The weather was rather cold.",
    "Everyone was in a hurry.",
    "It had rained all night.",
    "The streets were very busy.",
    "The wind was blowing hard.",
    "The morning was calm again.",
    "Most shops opened quite late.",
    "The air smelled of rain.",
)
FILLER_WORDS = 6


def filler_prefix(rng: random.Random, k: int) -> str:
    """``k`` distinct filler sentences joined by spaces, followed by a space (or ``""``)."""
    if k < 0:
        raise ValueError(f"number of filler sentences must be >= 0, got {k}")
    if k == 0:
        return ""
    if k > len(FILLER_SENTENCES):
        raise ValueError(f"at most {len(FILLER_SENTENCES)} filler sentences, got {k}")
    return " ".join(rng.sample(FILLER_SENTENCES, k)) + " "


def _parse_row(obj: object, where: str) -> TaskExample:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    missing = [k for k in ("prompt", "correct", "wrong") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    vals = {}
    for k in ("prompt", "correct", "wrong"):
        v = obj[k]
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: field {k!r} must be a non-empty string, got {v!r}")
        vals[k] = v
    for k in ("correct", "wrong"):
        if vals[k] != vals[k].strip() or len(vals[k].split()) != 1:
            raise ValueError(
                f"{where}: field {k!r} must be a single word without surrounding spaces, "
                f"got {vals[k]!r}"
            )
    if vals["correct"] == vals["wrong"]:
        raise ValueError(f"{where}: 'correct' and 'wrong' are both {vals['correct']!r}")
    return TaskExample(**vals)


def load_task_jsonl(path: str | Path) -> list[TaskExample]:
    """Read task examples from a JSON-lines file with fields ``prompt``, ``correct``, ``wrong``.

    Blank lines are skipped. Raises ``ValueError`` naming the file and line for a malformed row,
    and for a file without any example.
    """
    from ..data import text_lines  # a missing file or a non-UTF-8 line: named with its line

    path = Path(path)
    out: list[TaskExample] = []
    for i, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        out.append(_parse_row(obj, where))
    if not out:
        raise ValueError(f"{path}: no task examples (empty file)")
    return out


def save_task_jsonl(examples: Iterable[TaskExample], path: str | Path) -> None:
    """Write examples as JSON lines (the format :func:`load_task_jsonl` reads)."""
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples)


def answer_token_ids(word: str, tokenizer) -> list[int]:
    """Token ids of ``" " + word`` (the answer as it follows a prompt), no special tokens."""
    return list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])


def check_single_token(examples: Sequence[TaskExample], tokenizer) -> None:
    """Raise ``ValueError`` if some answer word is not exactly one token (with a leading space).

    The message names the offending word, the tokens it became, and the example index.
    """
    seen: dict[str, bool] = {}
    for idx, ex in enumerate(examples):
        for field in ("correct", "wrong"):
            word = getattr(ex, field)
            if word in seen:
                continue
            ids = answer_token_ids(word, tokenizer)
            ok = len(ids) == 1
            unk = getattr(tokenizer, "unk_token_id", None)
            if ok and unk is not None and ids[0] == unk:
                pieces = [getattr(tokenizer, "unk_token", "<unk>")]
                raise ValueError(
                    f"answer word {word!r} (example {idx}, field {field!r}) is unknown to the "
                    f"tokenizer (encodes to {pieces})"
                )
            if not ok:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(
                    f"answer word {word!r} (example {idx}, field {field!r}) is not a single token: "
                    f"' {word}' encodes to {len(ids)} tokens {pieces}"
                )
            seen[word] = True
