"""MMLU k-shot accuracy by log-likelihood, from the CSV layout ``<dir>/{dev,test}/<subject>_<split>.csv``
with header ``question,choice0,choice1,choice2,choice3,answer`` (answer = index 0–3).

Prompt (the standard MMLU format)::

    The following are multiple choice questions (with answers) about <subject>.

    <question>
    A. <choice0>
    B. <choice1>
    C. <choice2>
    D. <choice3>
    Answer: <letter>           (k solved examples from the dev split, then the test question)

Three scorings (``scoring``):

* ``letter`` (default; lm-evaluation-harness' MMLU): the answer is the letter with the highest
  log-likelihood of `` A``/`` B``/`` C``/`` D`` after ``Answer:``.
* ``text``: the answer is the choice whose *text* has the highest log-likelihood after
  ``Answer:`` of the lettered prompt (length-normalised with ``normalize=True``).
* ``cloze``: the choice text after ``Question: <question>\nAnswer:`` without the lettered
  choices (lm-evaluation-harness' ``mmlu_continuation``). Useful for small models that never
  learned the letter format.

With lm-evaluation-harness installed, ``steerwise.harness.mmlu_accuracy`` measures the same
questions with lm-eval's own ``mmlu`` task (the letter scoring, the prompt above);
``resolve_mmlu_backend`` picks between the two for the sweep.

Scoring goes through a ``ChoiceScorer``: a callable taking (context, continuation) pairs and
returning their log-likelihoods, so the reader and the accuracy can be tested without a model.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn

from ..recipe import Recipe
from .perplexity import continuation_logprobs, next_token_logprobs

LETTERS = ("A", "B", "C", "D")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]

ChoiceScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]
"""(contexts, continuations) → log-likelihood of each continuation given its context."""


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


def _subject_of(path: Path, split: str) -> str:
    return path.stem.removesuffix(f"_{split}")


def read_mmlu_csv(path: str | Path, subject: str | None = None, split: str = "test") -> list[MMLUQuestion]:
    """Questions of one MMLU CSV file; errors name the file and line."""
    p = Path(path)
    subject = subject or _subject_of(p, split)
    out: list[MMLUQuestion] = []
    with p.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{p} is empty")
        if [h.strip() for h in header] != HEADER:
            raise ValueError(f"{p}: expected header {','.join(HEADER)}, got {','.join(header)}")
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != 6:
                raise ValueError(f"{p}:{lineno}: expected 6 fields, got {len(row)}")
            try:
                answer = int(row[5])
            except ValueError:
                answer = LETTERS.index(row[5].strip()) if row[5].strip() in LETTERS else -1
            if answer not in range(4):
                raise ValueError(f"{p}:{lineno}: answer {row[5]!r} is not 0-3 (or A-D)")
            out.append(MMLUQuestion(subject, row[0], (row[1], row[2], row[3], row[4]), answer))
    return out


def list_subjects(directory: str | Path, split: str = "test") -> list[str]:
    d = Path(directory) / split
    if not d.is_dir():
        raise FileNotFoundError(f"no MMLU split directory {d} (expected <dir>/{{dev,test}}/*.csv)")
    return sorted(_subject_of(p, split) for p in d.glob("*.csv"))


def load_mmlu(
    directory: str | Path,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    limit_per_subject: int | None = None,
) -> dict[str, list[MMLUQuestion]]:
    """``{subject: questions}`` for the chosen subjects (default: all present)."""
    known = list_subjects(directory, split)
    subjects = list(subjects) if subjects else known
    missing = [s for s in subjects if s not in known]
    if missing:
        raise ValueError(f"MMLU subjects not found in {directory}/{split}: {', '.join(missing)}")
    out = {}
    for s in subjects:
        qs = read_mmlu_csv(Path(directory) / split / f"{s}_{split}.csv", s, split)
        out[s] = qs[:limit_per_subject] if limit_per_subject is not None else qs
    return out


def format_question(q: MMLUQuestion, answer: bool) -> str:
    lines = [q.question.strip()]
    lines += [f"{letter}. {c}" for letter, c in zip(LETTERS, q.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    if answer:
        text += f" {LETTERS[q.answer]}\n\n"
    return text


def format_cloze(q: MMLUQuestion, answer: bool) -> str:
    text = f"Question: {q.question.strip()}\nAnswer:"
    return text + f" {q.choices[q.answer]}\n\n" if answer else text


def build_prompt(q: MMLUQuestion, shots: Sequence[MMLUQuestion], cloze: bool = False) -> str:
    """The k-shot prompt ending in ``Answer:`` (lettered choices, or the bare question when
    ``cloze``)."""
    subject = q.subject.replace("_", " ")
    if cloze:
        return "".join(format_cloze(s, True) for s in shots) + format_cloze(q, False)
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(q, False)


MMLU_BACKENDS = ("auto", "lm-eval", "steerwise")


def resolve_mmlu_backend(backend: str, scoring: str) -> str:
    """``"lm-eval"`` or ``"steerwise"``: ``auto`` takes lm-eval when it is installed and the
    scoring is ``letter`` (the only one lm-eval's MMLU task has)."""
    import importlib.util

    if backend not in MMLU_BACKENDS:
        raise ValueError(f"unknown MMLU backend {backend!r}; choose {', '.join(MMLU_BACKENDS)}")
    has_lm_eval = importlib.util.find_spec("lm_eval") is not None
    if backend == "auto":
        return "lm-eval" if has_lm_eval and scoring == "letter" else "steerwise"
    if backend == "lm-eval":
        if scoring != "letter":
            raise ValueError(f"lm-eval's MMLU scores the letters: MMLU scoring {scoring!r} needs "
                             f"the steerwise backend")
        if not has_lm_eval:
            raise ValueError("the lm-eval MMLU backend needs lm-eval: pip install "
                             "'steerwise[harness]'")
    return backend


@dataclass
class MMLUResult:
    accuracy: float
    n: int
    per_subject: dict[str, float] = field(default_factory=dict)
    chance: float = 0.25

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_mmlu(
    questions: dict[str, list[MMLUQuestion]],
    scorer: ChoiceScorer,
    *,
    shots: dict[str, list[MMLUQuestion]] | None = None,
    k: int = 5,
    scoring: Literal["letter", "text", "cloze"] = "letter",
    normalize: bool = False,
    token_counts: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> MMLUResult:
    """Accuracy of ``scorer`` on ``questions`` with the first ``k`` dev examples of each subject as
    shots. With ``normalize`` (text scoring) log-likelihoods are divided by ``token_counts`` of
    the continuations (default: character counts)."""
    if scoring not in ("letter", "text", "cloze"):
        raise ValueError(f"unknown MMLU scoring {scoring!r}; choose 'letter', 'text' or 'cloze'")
    contexts, conts, owners = [], [], []
    flat: list[MMLUQuestion] = []
    for subject, qs in questions.items():
        sub_shots = (shots or {}).get(subject, [])[:k] if k > 0 else []
        if k > 0 and shots is not None and len(sub_shots) < k:
            raise ValueError(f"subject {subject!r} has only {len(sub_shots)} dev examples for {k} shots")
        for q in qs:
            prompt = build_prompt(q, sub_shots, cloze=scoring == "cloze")
            for j in range(4):
                contexts.append(prompt)
                conts.append(f" {LETTERS[j]}" if scoring == "letter" else f" {q.choices[j]}")
                owners.append(len(flat))
            flat.append(q)
    if not flat:
        raise ValueError("no MMLU questions to evaluate")
    ll = np.asarray(scorer(contexts, conts), dtype=np.float64)
    if ll.shape != (len(conts),):
        raise ValueError(f"the scorer returned shape {ll.shape}, expected ({len(conts)},)")
    if normalize and scoring != "letter":
        lengths = (np.asarray(token_counts(conts)) if token_counts is not None
                   else np.array([len(c) for c in conts]))
        ll = ll / np.maximum(lengths, 1)
    ll = ll.reshape(len(flat), 4)
    pred = ll.argmax(axis=1)
    correct = pred == np.array([q.answer for q in flat])
    per_subject: dict[str, float] = {}
    i = 0
    for subject, qs in questions.items():
        if qs:
            per_subject[subject] = float(correct[i:i + len(qs)].mean())
        i += len(qs)
    return MMLUResult(float(correct.mean()), len(flat), per_subject)


def model_choice_scorer(
    model: nn.Module,
    tokenizer,
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> ChoiceScorer:
    """A ``ChoiceScorer`` backed by a (steered) causal LM; contexts longer than ``max_length``
    tokens are cut from the left (the question itself stays)."""

    def score(contexts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
        if all(len(x) == 1 for x in cont_ids) and len(set(contexts)) < len(contexts):
            # single-token continuations (letters): one forward pass per distinct context
            uniq = list(dict.fromkeys(contexts))
            logp = next_token_logprobs(model, tokenizer, uniq, recipe, strength,
                                       max_length=max_length, batch_size=batch_size,
                                       progress=progress)
            where = {c: i for i, c in enumerate(uniq)}
            return np.array([logp[where[c], x[0]] for c, x in zip(contexts, cont_ids)])
        sums, _ = continuation_logprobs(model, tokenizer, contexts, continuations, recipe,
                                        strength, max_length=max_length, batch_size=batch_size,
                                        progress=progress, desc="mmlu")
        return sums

    return score


def token_counter(tokenizer) -> Callable[[Sequence[str]], np.ndarray]:
    def count(texts: Sequence[str]) -> np.ndarray:
        return np.array([len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]])

    return count
