"""Utility measured as the *steered* model's perplexity and log-likelihoods.

* ``corpus_perplexity``: held-out running text (e.g. WikiText articles) cut into non-overlapping
  windows of ``window`` tokens, each scored on its own; perplexity = exp(mean token NLL).
* ``text_perplexity``: whole texts, each scored on its own as a fit reads it (with the tokenizer's
  special tokens, so a BOS where the tokenizer adds one); every token after the first is scored.
  ``fit`` chooses a recipe's default strength with it (``steerwise.strength``).
* ``continuation_logprobs``: log p(continuation | context) per pair, the building block of
  conditional perplexity (held-out non-toxic continuations given their prompts) and of MMLU
  log-likelihood scoring.

Steering is applied with ``recipe.apply(model, strength)`` around every forward pass, so gates
see each sequence exactly as in generation (every forward here is a fresh prefill).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import (
    bos_prefix,
    ensure_pad_token,
    forward_kwargs,
    max_model_length,
    pad_batch,
    tokenize,
)
from ..recipe import Recipe


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    n_tokens: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


@contextmanager
def steered(model: nn.Module, recipe: Recipe | None, strength: float | None) -> Iterator[None]:
    """Install ``recipe`` at ``strength`` for the body (nothing when no recipe or strength 0)."""
    ctx = recipe.apply(model, strength) if recipe is not None and strength != 0 else nullcontext()
    with ctx:
        yield


@torch.no_grad()
def _score_rows(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    n_target: Sequence[int],
    pad_id: int,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log-probs of the last ``n_target[i]`` tokens of each row, and their count."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    sums = np.zeros(len(rows))
    counts = np.zeros(len(rows), dtype=np.int64)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids, mask = pad_batch([rows[i] for i in idx], pad_id, device)
        logits = model(**forward_kwargs(model, ids, mask), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, w-1)
        width = ids.shape[1]
        for j, i in enumerate(idx):
            k = int(n_target[i])
            # left padding: the row's tokens occupy the last len(row) positions; the target
            # tokens are the last k of them, predicted from positions width-1-k .. width-2
            sums[i] = float(tok_lp[j, width - 1 - k:].sum())
            counts[i] = k
    return sums, counts


def corpus_perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | str,
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    window: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of running text: texts joined by newlines, tokenized once, cut into windows of
    ``window`` tokens (the last, shorter one kept if ≥ 2 tokens), at most ``max_tokens`` tokens.
    With a tokenizer that starts texts with BOS (``bos_prefix``), each window is BOS + the next
    ``window − 1`` text tokens and every text token is scored."""
    if isinstance(texts, str):
        texts = [texts]
    text = "\n".join(t for t in texts if t.strip())
    if not text:
        raise ValueError("no text to measure perplexity on")
    window = min(window, max_model_length(model, tokenizer))
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    ensure_pad_token(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    lead = bos_prefix(tokenizer)
    step = window - len(lead)
    rows = [lead + ids[i:i + step] for i in range(0, len(ids), step)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("the text is shorter than 2 tokens")
    return _rows_perplexity(model, tokenizer, rows, recipe, strength, batch_size, progress)


def _rows_perplexity(model: nn.Module, tokenizer, rows: list[list[int]], recipe: Recipe | None,
                     strength: float | None, batch_size: int, progress: bool) -> Perplexity:
    """exp(mean NLL) of every token of ``rows`` after each row's first."""
    with steered(model, recipe, strength):
        sums, counts = _score_rows(model, rows, [len(r) - 1 for r in rows],
                                   tokenizer.pad_token_id, batch_size, progress, "perplexity")
    n = int(counts.sum())
    nll = -float(sums.sum()) / n
    return Perplexity(math.exp(nll), nll, n)


def text_perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of ``texts``, each scored on its own: tokenized as ``fit`` tokenizes (the
    tokenizer's special tokens added, cut from the left to ``max_length`` tokens), every token
    after the first scored; perplexity = exp(mean token NLL over all texts)."""
    if len(texts) == 0:
        raise ValueError("no texts to measure perplexity on")
    ensure_pad_token(tokenizer)
    rows = tokenize(tokenizer, texts, max_length or max_model_length(model, tokenizer))
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("every text is shorter than 2 tokens: nothing to score")
    return _rows_perplexity(model, tokenizer, rows, recipe, strength, batch_size, progress)


def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "log-likelihood",
) -> tuple[np.ndarray, np.ndarray]:
    """``(sum log p(continuation | context), n continuation tokens)`` per pair.

    Context and continuation are tokenized separately and concatenated (so a leading space
    belongs to the continuation, as in lm-evaluation-harness); the context starts with the
    tokenizer's BOS when it adds one (``bos_prefix``). When the pair is longer than
    ``max_length`` tokens, the context is cut from the left (after the BOS). An empty context is
    allowed; without a BOS, the first continuation token is then not scored (nothing predicts it).
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if not contexts:
        raise ValueError("no pairs to score")
    ensure_pad_token(tokenizer)
    limit = max_length or max_model_length(model, tokenizer)
    ctx_ids = tokenizer(list(contexts), add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    lead = bos_prefix(tokenizer)
    rows, n_target = [], []
    for i, (c, x) in enumerate(zip(ctx_ids, cont_ids)):
        if not x:
            raise ValueError(f"continuation #{i} is empty after tokenization")
        if len(x) + len(lead) >= limit:
            raise ValueError(f"continuation #{i} alone has {len(x)} tokens (limit {limit})")
        room = limit - len(x) - len(lead)
        c = lead + (list(c)[-room:] if len(c) > room else list(c))
        row = c + list(x)
        rows.append(row)
        n_target.append(len(x) if c else len(x) - 1)
    with steered(model, recipe, strength):
        sums, counts = _score_rows(model, rows, n_target, tokenizer.pad_token_id, batch_size,
                                   progress, desc)
    return sums, counts


def conditional_perplexity(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    recipe: Recipe | None = None,
    strength: float | None = None,
    **kwargs,
) -> Perplexity:
    """Perplexity of reference continuations given their prompts (all continuation tokens)."""
    sums, counts = continuation_logprobs(model, tokenizer, prompts, continuations, recipe,
                                         strength, **kwargs)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("no continuation tokens to score")
    nll = -float(sums.sum()) / n
    return Perplexity(math.exp(nll), nll, n)


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str],
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """(n_contexts, vocab) log-probabilities of the token after each context (cut from the
    left to ``max_length - 1`` tokens)."""
    if not contexts:
        raise ValueError("no contexts given")
    ensure_pad_token(tokenizer)
    lead = bos_prefix(tokenizer)
    limit = (max_length or max_model_length(model, tokenizer)) - 1 - len(lead)
    rows = [list(r)[-limit:] for r in tokenizer(list(contexts), add_special_tokens=False)["input_ids"]]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"context #{i} is empty after tokenization")
    rows = [lead + r for r in rows]
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: np.ndarray | None = None
    with steered(model, recipe, strength):
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for idx in tqdm(batches, desc="next token", disable=not progress, leave=False):
            ids, mask = pad_batch([rows[i] for i in idx], tokenizer.pad_token_id, device)
            kwargs = forward_kwargs(model, ids, mask)
            if last_only:  # the LM head on the last position only (a 262k vocabulary: most of
                kwargs["logits_to_keep"] = 1  # the cost and GBs of logits for long contexts)
            logits = model(**kwargs, use_cache=False).logits[:, -1]
            lp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
            if out is None:
                out = np.empty((len(rows), lp.shape[-1]))
            out[idx] = lp
    assert out is not None
    return out
