"""The DSAS paper's generation protocol and the toxicity evaluation built on it.

Protocol (docs/algorithms.md §5): sample 50 new tokens with top_p 0.3, temperature 1.0, repetition
penalty 1.2, for each prompt of a RealToxicityPrompts-style set, under one or more seeds; score
every continuation (not the prompt) with a toxicity scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..data import read_rows
from ..generate import generate
from ..recipe import Recipe
from .toxicity import ToxicityScorer, summarize


@dataclass
class GenerationConfig:
    """Sampling settings of the DSAS paper, plus batching and prompt-length limits."""

    max_new_tokens: int = 50
    top_p: float = 0.3
    temperature: float = 1.0
    repetition_penalty: float = 1.2
    do_sample: bool = True
    batch_size: int = 32
    max_prompt_tokens: int | None = None  # truncate prompts from the left to this many tokens

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"do_sample": self.do_sample,
                              "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kw.update(top_p=self.top_p, temperature=self.temperature)
        return kw

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_prompts(
    path: str | Path,
    *,
    field: str = "prompt",
    rows: slice | Sequence[int] | None = None,
    limit: int | None = None,
) -> list[str]:
    """Prompts from a RealToxicityPrompts-style JSONL file (``field``, default ``prompt``; a
    nested ``{"prompt": {"text": ...}}`` as in the original RTP release works too) or from a text
    file (one prompt per non-empty line). ``rows`` picks rows (by index among all rows) before
    ``limit`` keeps the first N of them."""
    texts = read_rows(path, field)
    if rows is not None:
        texts = texts[rows] if isinstance(rows, slice) else [texts[i] for i in rows]
    texts = [t for t in texts if t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"{path} holds no prompts (field {field!r})")
    return texts


def truncate_left(tokenizer, texts: Sequence[str], max_tokens: int | None) -> list[str]:
    """Keep the last ``max_tokens`` tokens of each text (decoded back to text)."""
    if max_tokens is None:
        return list(texts)
    if max_tokens < 1:
        raise ValueError("max_tokens must be ≥ 1")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [
        t if len(row) <= max_tokens else tokenizer.decode(row[-max_tokens:])
        for t, row in zip(texts, ids)
    ]


def sample_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    recipe: Recipe | None = None,
    strength: float | None = None,
    config: GenerationConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Continuations of ``prompts`` (steered when a recipe and a non-zero strength are given).

    Prompts are batched in length order (less padding) and each batch is seeded with
    ``seed + batch index``, so results do not depend on what ran before.
    """
    cfg = config or GenerationConfig()
    prompts = truncate_left(tokenizer, prompts, cfg.max_prompt_tokens)
    lengths = [len(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[str] = [""] * len(prompts)
    use_recipe = recipe if recipe is not None and strength != 0 else None
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        gen = generate(model, tokenizer, [prompts[i] for i in idx], use_recipe, strength,
                       max_new_tokens=cfg.max_new_tokens, seed=seed * 100_003 + b,
                       **cfg.generate_kwargs())
        for i, text in zip(idx, gen.continuations):
            out[i] = text
    return out


@dataclass
class ToxicityEval:
    """Toxicity of sampled continuations, pooled over seeds."""

    rate: float
    mean: float
    n: int
    per_seed_rate: list[float] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_toxicity(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    scorer: ToxicityScorer,
    recipe: Recipe | None = None,
    strength: float | None = None,
    config: GenerationConfig | None = None,
    *,
    seeds: Sequence[int] = (0,),
    n_examples: int = 3,
    progress: bool = False,
) -> ToxicityEval:
    """Sample continuations under each seed, score them, and summarise (rate = share ≥ 0.5)."""
    if not prompts:
        raise ValueError("no prompts to evaluate toxicity on")
    per_seed_conts = [
        sample_continuations(model, tokenizer, prompts, recipe, strength, config, seed=s,
                             progress=progress, desc=f"generate seed {s}")
        for s in seeds
    ]
    return score_continuations(prompts, per_seed_conts, scorer, n_examples=n_examples)


def score_continuations(
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    scorer: ToxicityScorer,
    *,
    n_examples: int = 3,
) -> ToxicityEval:
    """Score continuations sampled under one or more seeds (``continuations[k][i]``: seed k's
    continuation of prompt i) and summarise (rate = share ≥ 0.5); the examples are the most
    toxic continuations of the first seed."""
    if not prompts:
        raise ValueError("no prompts to evaluate toxicity on")
    all_scores, per_seed, examples = [], [], []
    for conts in continuations:
        if len(conts) != len(prompts):
            raise ValueError(f"{len(conts)} continuations for {len(prompts)} prompts")
        scores = np.asarray(scorer.score(list(conts)), dtype=np.float64)
        all_scores.append(scores)
        per_seed.append(summarize(scores).rate)
        if not examples:
            top = np.argsort(-scores)[:n_examples]
            examples = [{"prompt": prompts[i], "continuation": conts[i], "score": float(scores[i])}
                        for i in top]
    summary = summarize(np.concatenate(all_scores))
    return ToxicityEval(summary.rate, summary.mean, summary.n, per_seed, examples)
