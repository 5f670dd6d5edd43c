"""Steered generation, with optional per-token, per-layer gate traces and their renderings."""

from __future__ import annotations

import html
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .activations import ensure_pad_token, max_model_length
from .recipe import Recipe


class PromptTooLongError(ValueError):
    """A prompt plus the requested new tokens does not fit the model's context."""


@dataclass
class GateTrace:
    """Gate values ``a_l·h_l(t)`` per token (prompt then generated) and per steered site.

    ``values[i]`` has shape (n_tokens_i, n_sites); NaN where no value exists (the last
    generated token never goes through the model).
    """

    sites: list[str]
    tokens: list[list[str]]
    values: list[np.ndarray]
    n_prompt: list[int]

    def mean_per_token(self, row: int) -> np.ndarray:
        v = self.values[row]
        out = np.full(v.shape[0], np.nan)
        ok = ~np.isnan(v).all(axis=1)
        out[ok] = np.nanmean(v[ok], axis=1)
        return out

    def to_rich(self, row: int):
        """A rich ``Text``: each token's background is red in proportion to its mean gate."""
        from rich.text import Text

        text = Text()
        for k, (tok, g) in enumerate(zip(self.tokens[row], self.mean_per_token(row))):
            if k == self.n_prompt[row]:
                text.append(" ▸ ", style="bold")
            if np.isnan(g):
                text.append(tok)
                continue
            level = int(round(float(np.clip(g, 0, 1)) * 255))
            text.append(tok, style=f"on rgb({level},{max(0, 60 - level // 4)},{max(0, 60 - level // 4)})")
        return text

    def to_html(self, title: str = "steerwise gate trace") -> str:
        """A self-contained HTML page: one heat map (layers × tokens) per generated row."""
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>",
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:2em}",
            "td,th{padding:2px 4px;font-size:12px;text-align:center;border:1px solid #eee}",
            "th.tok{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;",
            "font-family:monospace;white-space:pre}th.gen{color:#b00}",
            "td.site{text-align:right;font-family:monospace}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            "<p>Cell colour = gate value a<sub>l</sub>·h<sub>l</sub>(t) in [0, 1] (white 0, red 1): "
            "how much of the steering strength each token received at each site. Red column "
            "headers are generated tokens.</p>",
        ]
        for row, toks in enumerate(self.tokens):
            v = self.values[row]
            parts.append(f"<h2>Sequence {row + 1}</h2><table><tr><th></th>")
            for k, tok in enumerate(toks):
                cls = "tok gen" if k >= self.n_prompt[row] else "tok"
                parts.append(f"<th class='{cls}'>{html.escape(tok) or '&nbsp;'}</th>")
            parts.append("</tr>")
            for j, site in enumerate(self.sites):
                parts.append(f"<tr><td class='site'>{html.escape(site)}</td>")
                for k in range(len(toks)):
                    g = v[k, j]
                    if np.isnan(g):
                        parts.append("<td style='background:#ddd'></td>")
                    else:
                        a = float(np.clip(g, 0, 1))
                        parts.append(
                            f"<td title='{g:.3f}' style='background:rgba(200,0,0,{a:.3f})'>"
                            f"{g:.2f}</td>"
                        )
                parts.append("</tr>")
            parts.append("</table>")
        parts.append("</body></html>")
        return "".join(parts)

    def save_html(self, path: str | Path, title: str = "steerwise gate trace") -> Path:
        p = Path(path)
        p.write_text(self.to_html(title), encoding="utf-8")
        return p


@dataclass
class Generation:
    prompts: list[str]
    continuations: list[str]
    trace: GateTrace | None = None


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for k, i in enumerate(ids):
        if i in eos:
            return ids[:k]
    return ids


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    explain: bool = False,
    max_new_tokens: int = 40,
    seed: int | None = None,
    chat: str | None = None,
    **generate_kwargs: Any,
) -> Generation:
    """Generate continuations of ``prompts`` (one left-padded batch), optionally steered.

    Every prompt token and every generated token is gated by its own activation. With
    ``explain=True`` the result carries a ``GateTrace``. Extra keyword arguments go to
    ``model.generate`` (``do_sample``, ``top_p``, ``temperature``, ``repetition_penalty``...).
    ``chat="user"|"assistant"`` renders the prompts with the tokenizer's chat template first
    (``steerwise.chat``); the result keeps the prompts as given.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"prompt #{empty[0]} is empty or not a string; give some text")
    if explain and recipe is None:
        raise ValueError("explain=True needs a recipe (there are no gates to show)")
    ensure_pad_token(tokenizer)
    limit = max_model_length(model, tokenizer)
    texts = list(prompts)
    if chat is not None:
        from .chat import format_chat

        texts = format_chat(tokenizer, texts, chat, for_generation=True)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    lengths = enc["attention_mask"].sum(1).tolist()
    for p, n in zip(prompts, lengths):
        if n + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context of {limit} tokens: {p[:60]!r}..."
            )
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    if seed is not None:
        torch.manual_seed(seed)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    ctx = recipe.apply(model, strength, trace=explain) if recipe is not None else nullcontext()
    with ctx as handle:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **generate_kwargs)
        traced = handle.gate_trace() if explain else None
    width = enc["input_ids"].shape[1]
    eos = _eos_ids(model, tokenizer)
    new_ids = [_cut_at_eos(row[width:].tolist(), eos) for row in out]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    trace = None
    if traced is not None:
        trace = _build_trace(tokenizer, out, enc["attention_mask"], new_ids, traced, width)
    return Generation(list(prompts), texts, trace)


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (spaces included).

    Decoding one id at a time loses the spaces of word-level tokenizers (and of some BPE
    decoders), so each token's text is the growth of the decoded prefix.
    """
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        out.append(text[len(prev):] if text.startswith(prev) else tokenizer.decode(ids[k - 1:k]))
        prev = text
    return out


def _build_trace(tokenizer, out, prompt_mask, new_ids, traced, width) -> GateTrace:
    names, values, _ = traced
    tokens, vals, n_prompt = [], [], []
    for r in range(out.shape[0]):
        real = prompt_mask[r].bool().cpu()
        prompt_ids = out[r, :width][real].tolist()
        ids = prompt_ids + new_ids[r]
        v_all = values[r].numpy()  # (width + steps, sites)
        v_prompt = v_all[:width][real.numpy()]
        v_gen = v_all[width:width + len(new_ids[r])]
        v = np.full((len(ids), len(names)), np.nan)
        v[: len(v_prompt)] = v_prompt
        v[len(v_prompt): len(v_prompt) + len(v_gen)] = v_gen
        tokens.append(token_strings(tokenizer, ids))
        vals.append(v)
        n_prompt.append(len(prompt_ids))
    return GateTrace(sites=names, tokens=tokens, values=vals, n_prompt=n_prompt)
