"""The three-term objective of activation scaling, term by term.

For one prompt with answer-position logits ``z`` (intervened) and ``z⁰`` (original), correct
token ``c``, wrong token ``w``, direction ``β`` and margin ``m``:

* effectiveness  ``E = max(0, m − β·(z_w − z_c))`` — a hinge on the logit difference: at β = +1
  the wrong token must beat the correct one by ``m``; at β = −1 the correct one must beat the
  wrong one by ``m``. (For a general real β the target scales with β.)
* faithfulness   ``F = KL(p⁰ ‖ p)`` over the next-token distribution *without* ``c`` and ``w``:
  ``kl="renormalized"`` (default) renormalises both distributions over the other V − 2 tokens,
  a true KL that is 0 iff the intervention leaves the relative probabilities of all other tokens
  unchanged; ``kl="masked"`` sums ``p⁰_k·log(p⁰_k/p_k)`` over k ∉ {c, w} with the full-vocabulary
  softmax (the literal reading; it can go negative); ``kl="full"`` is the KL over all V tokens.
* minimality     ``M = ‖θ‖₁`` over all intervention parameters.

The training loss is ``mean_{prompts, β}(E + λ_F·F) + λ_M·M``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KL_MODES = ("renormalized", "masked", "full")


def logit_difference(logits: Tensor, correct: Tensor, wrong: Tensor) -> Tensor:
    """``z_w − z_c`` per row of (batch, V) logits."""
    logits = logits.float()
    return logits.gather(-1, wrong.view(-1, 1)).squeeze(-1) - logits.gather(
        -1, correct.view(-1, 1)
    ).squeeze(-1)


def effectiveness_term(
    logits: Tensor, correct: Tensor, wrong: Tensor, beta: Tensor | float, margin: float
) -> Tensor:
    """Per-row hinge ``max(0, m − β·(z_w − z_c))``."""
    beta_t = torch.as_tensor(beta, dtype=torch.float32, device=logits.device)
    return F.relu(margin - beta_t * logit_difference(logits, correct, wrong))


def _answer_mask(logits: Tensor, correct: Tensor, wrong: Tensor) -> Tensor:
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask.scatter_(-1, correct.view(-1, 1), True)
    mask.scatter_(-1, wrong.view(-1, 1), True)
    return mask


def faithfulness_term(
    clean_logits: Tensor,
    logits: Tensor,
    correct: Tensor,
    wrong: Tensor,
    kl: str = "renormalized",
) -> Tensor:
    """Per-row KL(original ‖ intervened) at the answer position, answer tokens excluded."""
    if kl not in KL_MODES:
        raise ValueError(f"unknown kl mode {kl!r}; choose from {', '.join(KL_MODES)}")
    p_logits = clean_logits.float()
    q_logits = logits.float()
    if kl == "full":
        logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
        return (logp.exp() * (logp - logq)).sum(-1)
    mask = _answer_mask(q_logits, correct, wrong)
    if kl == "renormalized":
        logp = F.log_softmax(p_logits.masked_fill(mask, float("-inf")), -1)
        logq = F.log_softmax(q_logits.masked_fill(mask, float("-inf")), -1)
    else:
        logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    terms = logp.exp() * (logp - logq)
    return terms.masked_fill(mask, 0.0).sum(-1)


@dataclass
class ObjectiveTerms:
    """The loss and its three (unweighted) terms, each averaged over prompts and β."""

    total: Tensor
    effectiveness: Tensor
    faithfulness: Tensor
    minimality: Tensor


def scaling_objective(
    clean_logits: Tensor,
    logits: Tensor,
    correct: Tensor,
    wrong: Tensor,
    beta: Tensor,
    l1: Tensor,
    *,
    margin: float,
    lambda_f: float,
    lambda_m: float,
    kl: str = "renormalized",
) -> ObjectiveTerms:
    """``mean(E + λ_F·F) + λ_M·‖θ‖₁`` for a batch of (prompt, β) rows."""
    eff = effectiveness_term(logits, correct, wrong, beta, margin).mean()
    faith = faithfulness_term(clean_logits, logits, correct, wrong, kl).mean()
    total = eff + lambda_f * faith + lambda_m * l1
    return ObjectiveTerms(total, eff, faith, l1)
