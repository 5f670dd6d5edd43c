"""Activation Transport (AcT): per-dimension maps from sorted source/target samples.

In one dimension optimal transport between two empirical distributions of equal size pairs the
i-th smallest source value with the i-th smallest target value. Both maps below are fitted on
those sorted pairs, per dimension, from pooled activations (the larger set is subsampled to the
smaller one's size, with a seed).

* **Mean-AcT**: ``T(t; λ) = t + λ·(μ_T − μ_S)`` (the mean of sorted target − sorted source).
* **Linear-AcT**: ``T(t; λ) = (1 − λ)·t + λ·(ω⊙t + β)``; ω, β by per-dimension least squares of
  sorted target on sorted source. In the engine's gated form ``delta(t) = ω⊙t + β − t`` and λ is
  the strength — AcT's interpolation strength lives in [0, 1] (1 = full transport).

**Support restriction** [choice]: the map is applied only in dimensions where ``t`` lies inside
the source's support ``[q_lo, q_hi]`` (default the [min, max] of the source samples; quantiles
as an option); elsewhere ``delta`` is 0. On by default for Linear-AcT (an affine map fitted on
the source range should not extrapolate), off by default for Mean-AcT (a plain shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..kernel import AffineMap
from ..options import Options, option
from .base import SteeringMap, as_float_rows, register_map


def sorted_pairs(
    source: Tensor, target: Tensor, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension sorted source and target samples of equal count (float64 arrays)."""
    s = as_float_rows(source, "source activations").double().numpy()
    t = as_float_rows(target, "target activations").double().numpy()
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"source and target widths differ: {s.shape[1]} vs {t.shape[1]}")
    n = min(len(s), len(t))
    rng = np.random.default_rng(seed)
    if len(s) > n:
        s = s[rng.choice(len(s), n, replace=False)]
    if len(t) > n:
        t = t[rng.choice(len(t), n, replace=False)]
    return np.sort(s, axis=0), np.sort(t, axis=0)


def source_support(
    source: Tensor, quantiles: tuple[float, float] = (0.0, 1.0)
) -> tuple[Tensor, Tensor]:
    """Per-dimension [lo, hi] of the source samples (``(0, 1)`` = min and max)."""
    lo_q, hi_q = (float(q) for q in quantiles)
    if not 0.0 <= lo_q < hi_q <= 1.0:
        raise ValueError(f"support quantiles must satisfy 0 <= lo < hi <= 1 (got {quantiles})")
    s = as_float_rows(source, "source activations").double()
    lo = torch.quantile(s, lo_q, dim=0)
    hi = torch.quantile(s, hi_q, dim=0)
    return lo.float(), hi.float()


@dataclass
class ActOptions(Options):
    """Fit options of the AcT maps (Mean-AcT and Linear-AcT)."""

    support: bool | None = option(
        None, "AcT: apply only inside the source support (default: on for linear-act, off for "
              "mean-act)")
    support_quantiles: tuple[float, float] = option(
        (0.0, 1.0), "AcT: the support's [lo, hi] quantiles of the source samples", cli=False)
    seed: int = option(0, "seed of the subsampling to equal set sizes", flag="--seed")


class _SupportMixin(SteeringMap):
    """Shared handling of the optional source-support mask (buffers ``lo``/``hi``)."""

    support: bool

    def _bounds(self) -> tuple[Tensor | None, Tensor | None]:
        return (self.lo, self.hi) if self.support else (None, None)


@register_map
class MeanActMap(_SupportMixin):
    method = "mean-act"

    def __init__(
        self, shift: Tensor, lo: Tensor | None = None, hi: Tensor | None = None,
        *, support: bool = False,
    ) -> None:
        super().__init__()
        shift = shift.detach().float().reshape(-1)
        self.support = bool(support)
        self.register_buffer("shift", shift.clone())
        self.register_buffer(
            "lo", torch.full_like(shift, -torch.inf) if lo is None else lo.float().clone()
        )
        self.register_buffer(
            "hi", torch.full_like(shift, torch.inf) if hi is None else hi.float().clone()
        )

    def affine(self) -> AffineMap:
        lo, hi = self._bounds()
        return AffineMap(b=self.shift, lo=lo, hi=hi)

    def config(self) -> dict[str, Any]:
        return {"support": self.support}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> MeanActMap:
        return cls(torch.zeros(dim), support=bool(config.get("support", False)))

    Options = ActOptions

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, options: Any = None, **kwargs: Any
            ) -> MeanActMap:
        opts = cls.options(options, **kwargs)
        s_sorted, t_sorted = sorted_pairs(source, target, opts.seed)
        shift = torch.from_numpy((t_sorted - s_sorted).mean(0)).float()
        use_support = False if opts.support is None else bool(opts.support)
        lo, hi = source_support(source, opts.support_quantiles)
        return cls(shift, lo, hi, support=use_support)


@register_map
class LinearActMap(_SupportMixin):
    method = "linear-act"

    def __init__(
        self, omega: Tensor, beta: Tensor, lo: Tensor | None = None, hi: Tensor | None = None,
        *, support: bool = True,
    ) -> None:
        super().__init__()
        omega = omega.detach().float().reshape(-1)
        self.support = bool(support)
        self.register_buffer("omega", omega.clone())
        self.register_buffer("beta", beta.detach().float().reshape(-1).clone())
        self.register_buffer(
            "lo", torch.full_like(omega, -torch.inf) if lo is None else lo.float().clone()
        )
        self.register_buffer(
            "hi", torch.full_like(omega, torch.inf) if hi is None else hi.float().clone()
        )

    def affine(self) -> AffineMap:
        lo, hi = self._bounds()
        return AffineMap(b=self.beta, a=self.omega - 1.0, lo=lo, hi=hi)

    def config(self) -> dict[str, Any]:
        return {"support": self.support}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> LinearActMap:
        """The identity map (ω = 1, β = 0) until a state dict is loaded."""
        return cls(torch.ones(dim), torch.zeros(dim), support=bool(config.get("support", True)))

    Options = ActOptions

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, options: Any = None, **kwargs: Any
            ) -> LinearActMap:
        """Per-dimension least squares ``sorted_target ≈ ω·sorted_source + β``.

        A dimension where the source samples are constant gets ω = 1 and β = the mean shift.
        """
        opts = cls.options(options, **kwargs)
        s, t = sorted_pairs(source, target, opts.seed)
        if len(s) < 2:
            raise ValueError("Linear-AcT needs at least 2 source and 2 target examples")
        s_mean, t_mean = s.mean(0), t.mean(0)
        sc = s - s_mean
        var = (sc ** 2).sum(0)
        cov = (sc * (t - t_mean)).sum(0)
        flat = var <= 1e-12 * np.maximum(1.0, (s ** 2).sum(0))
        omega = np.where(flat, 1.0, cov / np.where(flat, 1.0, var))
        beta = t_mean - omega * s_mean
        use_support = True if opts.support is None else bool(opts.support)
        lo, hi = source_support(source, opts.support_quantiles)
        return cls(torch.from_numpy(omega), torch.from_numpy(beta), lo, hi, support=use_support)
