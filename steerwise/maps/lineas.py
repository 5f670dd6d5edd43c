"""LinEAS: per-layer affine maps trained jointly, end to end through the (frozen) model.

Each steered site l gets ``T_l(t) = ω_l⊙t + β_l`` (init ω = 1, β = 0), i.e. in the engine's gated
form ``delta(t) = ω_l⊙t + β_l − t``. All layers are trained together: a batch of source texts
runs through the model *with the steering installed* (so a layer sees the effect of the layers
before it and gradients flow through the model), the steered activations are mean-pooled per
text, and the loss is the mean over sites of the per-dimension 1-D Wasserstein-2 distance to
the (unsteered) target activations — sort both samples per dimension, then MSE. Adam
(lr 1e-3, betas (0.9, 0.9)), cosine decay to 1e-6, 1,000 steps, batch 4 by default.

Sparsity (optional): after every Adam step a proximal step pulls the maps towards identity —
soft-thresholding of (ω − 1) and β (L1, ``l1``) and/or group soft-thresholding of each layer's
whole (ω − 1, β) (``group_l1``, sparse-group lasso with the L1 part). How many dimensions and
layers stay active is reported.

The loop itself (``steerwise.training.train_end_to_end``) is shared with E2E-DSAS gates
(``steerwise.gates.e2e``): every trainable parameter of the entries' maps and gates is
optimised, and with learned gates a control term ``γ · mean_l ‖T̃_l(z_c) − z_c‖₂`` over
mean-pooled control texts keeps the gates shut on C. A fixed (offline) map with E2E gates
trains only the gates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernel import AffineMap
from ..options import Options, non_negative_float, option, positive_float, positive_int
from .base import SteeringMap, register_map


@register_map
class LinEASMap(SteeringMap):
    """``delta(t) = ω⊙t + β − t`` with trainable ``omega`` and ``beta`` (identity at init)."""

    method = "lineas"
    end_to_end = True  # fitted by steerwise.fit through the model, not from pooled activations

    def __init__(self, omega: Tensor, beta: Tensor) -> None:
        super().__init__()
        self.omega = nn.Parameter(omega.detach().float().reshape(-1).clone())
        self.beta = nn.Parameter(beta.detach().float().reshape(-1).clone())

    @classmethod
    def identity(cls, dim: int) -> LinEASMap:
        return cls(torch.ones(dim), torch.zeros(dim))

    def affine(self) -> AffineMap:
        return AffineMap(b=self.beta, a=self.omega - 1.0)

    def active_dims(self) -> int:
        """Dimensions whose map is not the identity (ω ≠ 1 or β ≠ 0)."""
        with torch.no_grad():
            return int(((self.omega != 1.0) | (self.beta != 0.0)).sum())

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> LinEASMap:
        return cls.identity(dim)

    @classmethod
    def train(cls, ctx: Any, entries: list) -> dict[str, Any]:
        """Trained end to end through the model (``steerwise.training``), ungated unless the
        gates are learned too (then their kind trains, ``GateFitter.train``)."""
        from ..training import train_end_to_end

        return train_end_to_end(ctx.model, ctx.tokenizer, entries, ctx.source,
                                ctx.target_means(), ctx.control, ctx.options.lineas,
                                max_length=ctx.options.max_length, progress=ctx.progress,
                                sink_free=ctx.options.sink_free)

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, options: Any = None, **kwargs: Any
            ) -> LinEASMap:
        raise TypeError(
            "LinEAS is trained end to end through the model: use steerwise.fit(model, tok, "
            "source, control, target, method='lineas') rather than LinEASMap.fit"
        )


@dataclass
class LinEASOptions(Options):
    """End-to-end training options (the loop ``steerwise.training`` runs for LinEAS maps and
    E2E-DSAS gates; the E2E gate's own options are ``steerwise.gates.e2e.E2EOptions``)."""

    steps: int = option(1000, "LinEAS / E2E training steps", flag="--lineas-steps",
                        type=positive_int)
    lr: float = option(1e-3, "LinEAS / E2E Adam learning rate", flag="--lineas-lr",
                       type=positive_float)
    betas: tuple[float, float] = option((0.9, 0.9), "Adam betas", cli=False)
    final_lr: float = option(1e-6, "learning rate at the end of the cosine decay", cli=False)
    batch_size: int = option(4, "LinEAS / E2E texts per training step",
                             flag="--lineas-batch-size", type=positive_int)
    l1: float = option(0.0, "LinEAS L1 proximal weight", type=non_negative_float)
    group_l1: float = option(0.0, "LinEAS per-layer group-lasso weight",
                             type=non_negative_float)
    seed: int = option(0, "seed of the batches", flag="--seed")

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.lr <= 0 or self.final_lr < 0:
            raise ValueError("lr must be positive and final_lr non-negative")
        if min(self.l1, self.group_l1) < 0:
            raise ValueError("l1 and group_l1 must be non-negative")


def w2_per_dim(x: Tensor, y: Tensor) -> Tensor:
    """Mean over dimensions of the 1-D Wasserstein-2 (squared) distance of equal-size samples.

    ``x``, ``y``: (n, d). Sorting each column pairs the quantiles; the MSE is W2².
    """
    if x.shape != y.shape:
        raise ValueError(f"W2 needs equal sample counts and widths: {tuple(x.shape)} vs {tuple(y.shape)}")
    return (torch.sort(x, dim=0).values - torch.sort(y, dim=0).values).pow(2).mean()


def prox_step(maps: Sequence[LinEASMap], lr: float, l1: float, group_l1: float) -> None:
    """Proximal steps towards identity: soft-threshold (ω−1, β), then per-layer group shrink."""
    with torch.no_grad():
        for m in maps:
            u, b = m.omega - 1.0, m.beta.clone()
            if l1 > 0:
                u = torch.sign(u) * torch.clamp(u.abs() - lr * l1, min=0.0)
                b = torch.sign(b) * torch.clamp(b.abs() - lr * l1, min=0.0)
            if group_l1 > 0:
                norm = torch.sqrt(u.pow(2).sum() + b.pow(2).sum())
                tau = lr * group_l1 * math.sqrt(u.numel() + b.numel())
                factor = torch.clamp(1.0 - tau / norm, min=0.0) if norm > 0 else norm * 0
                u, b = u * factor, b * factor
            m.omega.copy_(1.0 + u)
            m.beta.copy_(b)
