"""Evaluating a learned intervention on (held-out) prompts.

For each β the report gives, over the prompts:

* ``flip_accuracy`` — the share of prompts where the intervention wins in β's direction: for
  β > 0 the wrong token beats the correct one (``z_w > z_c``), for β < 0 the correct one beats
  the wrong one (``z_c > z_w``);
* ``logit_diff`` — the mean ``z_w − z_c``;
* ``kl`` — the mean faithfulness KL (answer tokens excluded, the recipe's ``kl`` mode);

plus, without intervention, ``clean_accuracy`` (``z_c > z_w``) and the clean mean logit
difference; and for the intervention ``l1``, ``n_parameters`` and ``n_nonzero`` (|θ| above a
tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..tasks.base import TaskExample
from .data import EncodedTask, answer_logits, clean_answer_logits, encode_examples
from .objective import faithfulness_term, logit_difference
from .recipe import ScaleRecipe


@torch.no_grad()
def clean_accuracy(model: nn.Module, tokenizer, examples: Sequence[TaskExample]) -> dict[str, float]:
    """Share of prompts where the unsteered model ranks the correct token above the wrong one,
    and how often the correct token is the top-1 prediction overall."""
    data = encode_examples(tokenizer, examples)
    logits = clean_answer_logits(model, data)
    diff = logit_difference(logits, data.correct, data.wrong)
    return {
        "accuracy": float((diff < 0).float().mean()),
        "top1_accuracy": float((logits.argmax(-1) == data.correct).float().mean()),
        "logit_diff": float(diff.mean()),
        "n": len(data),
    }


@torch.no_grad()
def evaluate_scaling(
    model: nn.Module,
    tokenizer,
    recipe: ScaleRecipe,
    examples: Sequence[TaskExample],
    *,
    betas: Sequence[float] = (1.0, -1.0),
    batch_size: int = 64,
    nonzero_tol: float | None = None,
) -> dict[str, Any]:
    """Metrics of ``recipe`` on ``examples`` at every β (see the module docstring)."""
    recipe.check_model(model)
    iv = recipe.intervention
    width = iv.n_positions if iv.positional else None  # type: ignore[attr-defined]
    data: EncodedTask = encode_examples(tokenizer, examples, width)
    kl_mode = recipe.options.get("kl", "renormalized")
    tol = recipe.options.get("nonzero_tol", 1e-2) if nonzero_tol is None else nonzero_tol
    was_training = model.training
    model.eval()
    try:
        clean = clean_answer_logits(model, data, batch_size)
        clean_diff = logit_difference(clean, data.correct, data.wrong)
        out: dict[str, Any] = {
            "n": len(data),
            "prompt_tokens": sorted({int(x) for x in data.lengths}),
            "clean_accuracy": float((clean_diff < 0).float().mean()),
            "clean_logit_diff": float(clean_diff.mean()),
            "per_beta": {},
        }
        for beta in betas:
            rows = []
            with recipe.apply(model, float(beta)):
                for i in range(0, len(data), batch_size):
                    rows.append(answer_logits(model, data.ids[i:i + batch_size],
                                              data.mask[i:i + batch_size]).cpu())
            logits = torch.cat(rows)
            diff = logit_difference(logits, data.correct, data.wrong)
            won = diff > 0 if beta > 0 else diff < 0
            kl = faithfulness_term(clean, logits, data.correct, data.wrong, kl_mode)
            out["per_beta"][f"{float(beta):+g}"] = {
                "beta": float(beta),
                "flip_accuracy": float(won.float().mean()),
                "logit_diff": float(diff.mean()),
                "kl": float(kl.mean()),
            }
    finally:
        model.train(was_training)
    out.update(
        method=iv.method,
        l1=float(iv.l1().detach()),
        n_parameters=iv.n_parameters(),
        n_nonzero=iv.n_nonzero(tol),
        nonzero_tol=tol,
    )
    return out
