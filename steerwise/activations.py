"""Collect pooled activations at many sites in one batched pass.

Texts are tokenized, sorted by length (less padding), run through the model in batches with
hooks that pool each site's activation per text — masked mean over real tokens and/or the last
real token — and write it into a preallocated (n_texts, d) matrix. Padding never enters a
statistic, and memory is O(n_texts · d · sites), independent of sequence length. The forward
pass stops after the deepest requested site. Pooling ``"tokens"`` keeps the activation of every
real token instead (at most ``MAX_TOKENS_PER_TEXT`` per text, evenly spaced), for gates trained
on tokens as they are applied.

The attention sink stays out of every statistic (``sink_free=True``, the default): the first
real token of each text — the first *position* whose attention mask is 1, whatever its id, so
also for tokenizers that add no BOS and for texts truncated on the left — sees only itself, and
on real models its activation is one huge vector (Gemma 3 270M: 7–13× the median token's
residual norm) shared by every text, so a mean with it depends on text length. Each text
therefore needs at least two tokens; ``sink_free=False`` keeps the old statistics (with the
first token) for comparisons.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .sites import Site

Pooling = Literal["mean", "last", "tokens"]
POOLINGS: tuple[str, ...] = ("mean", "last", "tokens")
# with pooling "tokens" the result also holds, under this key, the index of the text each token
# row comes from (a float (n_tokens, 1) column, so every value stays a float matrix)
TOKEN_TEXT = "tokens_text"
MAX_TOKENS_PER_TEXT = 64


class _Stop(Exception):
    """Raised inside a hook once every site of the batch is captured."""


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its EOS token as pad (the usual causal-LM choice)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set one first")
        tokenizer.pad_token = tokenizer.eos_token


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts every text with its BOS token (Gemma, Llama), else
    ``[]`` (GPT-2, Qwen2). Code that tokenizes pieces without special tokens (perplexity,
    log-likelihoods) puts it back in front, so the model reads text as it was trained to: Gemma 3
    270M without its ``<bos>`` scores RTP continuations at perplexity ≈ 670 instead of ≈ 40."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def max_model_length(model: nn.Module, tokenizer=None) -> int:
    cfg = getattr(model, "config", None)
    limits = [
        getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx")
    ]
    if tokenizer is not None:
        limits.append(getattr(tokenizer, "model_max_length", None))
    valid = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**8]
    return min(valid) if valid else 2048


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int, *, truncate_left: bool = True
) -> list[list[int]]:
    """Token ids per text (with the tokenizer's special tokens), truncated to ``max_length``."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    out, cut = [], 0
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(f"text #{i} is empty after tokenization")
        if len(row) > max_length:
            cut += 1
            row = row[-max_length:] if truncate_left else row[:max_length]
        out.append(list(row))
    if cut:
        warnings.warn(f"{cut} of {len(ids)} texts were longer than {max_length} tokens: truncated")
    return out


def check_statistic_lengths(rows: Sequence[Sequence[int]], desc: str, sink_free: bool) -> None:
    """Every text must keep a real token once its first one (the attention sink) is left out."""
    if not sink_free:
        return
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise ValueError(
                f"text #{i} of the {desc} set has a single token: its first token (the attention "
                f"sink) is left out of every fitted statistic, so nothing would remain; give "
                f"texts of at least two tokens (or fit with sink_free=False)"
            )


def drop_first_token(mask: Tensor) -> Tensor:
    """``mask`` (batch, tokens) with each row's first real position set to 0: the attention sink
    (the first position where the mask is 1, with left or right padding). Rows without a real
    token stay all zero."""
    real = mask != 0
    out = real.clone()
    # argmax finds the first True; a row without real tokens has out[row, 0] False already
    out[torch.arange(mask.shape[0], device=mask.device), real.int().argmax(1)] = False
    return out.to(mask.dtype)


def statistics_mask(mask: Tensor, sink_free: bool) -> Tensor:
    """The positions a fitted statistic reads: the real tokens, less the first one when
    ``sink_free``."""
    return drop_first_token(mask) if sink_free else mask


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad token rows into (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def position_ids_for(mask: Tensor) -> Tensor:
    """Positions that ignore left padding, so a padded row sees the positions it has alone."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_kwargs(model: nn.Module, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Inputs for a plain forward pass of a left-padded batch (position ids where accepted)."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = position_ids_for(mask)
    return kwargs


def pool(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """Pool (batch, tokens, d) over real tokens: masked mean, or the last real token."""
    m = mask.to(x.device, torch.float32)
    if how == "mean":
        return (x.float() * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    if how == "last":
        pos = torch.arange(m.shape[1], device=x.device)
        last = (m * pos).argmax(1)  # index of the last real token (left or right padding)
        return x[torch.arange(x.shape[0], device=x.device), last].float()
    raise ValueError(f"unknown pooling {how!r}; choose from {POOLINGS}")


def token_rows(x: Tensor, mask: Tensor, cap: int) -> tuple[Tensor, Tensor]:
    """The activations of the real tokens of each row of (batch, tokens, d), at most ``cap``
    evenly spaced ones per row, and the row index of each: ((n, d), (n,))."""
    rows, owner = [], []
    for i in range(x.shape[0]):
        real = mask[i].nonzero().flatten().to(x.device)
        if len(real) > cap:
            real = real[torch.linspace(0, len(real) - 1, cap).round().long()]
        rows.append(x[i, real].float())
        owner.append(torch.full((len(real),), i, dtype=torch.long))
    return torch.cat(rows), torch.cat(owner)


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    sites: Sequence[Site],
    *,
    pooling: Sequence[str] = ("mean",),
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "activations",
    project: dict[str, Tensor] | None = None,
    sink_free: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Pooled activations: ``result[site.name][pooling]`` is a float32 CPU (n_texts, d) matrix;
    for ``"tokens"`` it is (n_tokens, d), with the text of each row under ``TOKEN_TEXT``.
    ``project[site.name]`` (d, k): keep each token row multiplied by it, (n_tokens, k) — e.g. a
    gate's logit per token without holding every activation. ``sink_free``: leave each text's
    first real token (the attention sink) out of every pooling (the default; each text then
    needs two tokens)."""
    if len(texts) == 0:
        raise ValueError(f"{desc}: no texts given")
    for how in pooling:
        if how not in POOLINGS:
            raise ValueError(f"unknown pooling {how!r}; choose from {POOLINGS}")
    ensure_pad_token(tokenizer)
    limit = max_length or max_model_length(model, tokenizer)
    rows = tokenize(tokenizer, texts, limit)
    check_statistic_lengths(rows, desc, sink_free)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    out: dict[str, dict[str, Tensor]] = {s.name: {} for s in sites}
    state: dict[str, object] = {}
    captured: set[str] = set()
    tokens: dict[str, list[tuple[Tensor, Tensor]]] = {s.name: [] for s in sites}

    def make_hook(site: Site):
        def store(x: Tensor) -> None:
            mask, idx = state["mask"], state["idx"]
            for how in pooling:
                if how == "tokens":
                    rows_, owner = token_rows(x, mask, MAX_TOKENS_PER_TEXT)  # type: ignore[arg-type]
                    if project is not None and site.name in project:
                        rows_ = rows_ @ project[site.name].to(rows_.device, rows_.dtype)
                    tokens[site.name].append((rows_.cpu(), idx[owner]))  # type: ignore[index]
                    continue
                pooled = pool(x, mask, how).cpu()  # type: ignore[arg-type]
                if how not in out[site.name]:
                    out[site.name][how] = torch.empty(len(rows), pooled.shape[-1])
                out[site.name][how][idx] = pooled  # type: ignore[index]
            captured.add(site.name)
            if len(captured) == len(sites):
                raise _Stop

        if site.io == "input":
            return lambda module, args: store(args[0])

        def hook(module, args, output):
            x = output if isinstance(output, Tensor) else output[site.tuple_index or 0]
            store(x)

        return hook

    handles = []
    try:
        for s in sites:
            module = model.get_submodule(s.module)
            if s.io == "input":
                handles.append(module.register_forward_pre_hook(make_hook(s)))
            else:
                handles.append(module.register_forward_hook(make_hook(s)))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids, mask = pad_batch([rows[i] for i in batch], tokenizer.pad_token_id, device)
            state["mask"], state["idx"] = statistics_mask(mask, sink_free), torch.tensor(batch)
            captured.clear()
            try:
                model(**forward_kwargs(model, ids, mask), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if "tokens" in pooling:
        for name, parts in tokens.items():
            out[name]["tokens"] = torch.cat([p[0] for p in parts])
            out[name][TOKEN_TEXT] = torch.cat([p[1] for p in parts]).float().unsqueeze(1)
    for name, pools in out.items():
        for how, mat in pools.items():
            if not torch.isfinite(mat).all():
                raise ValueError(
                    f"activations at site {name!r} ({how}) contain NaN or inf: the model overflows "
                    f"in its dtype (try float32 or bf16)"
                )
    return out
