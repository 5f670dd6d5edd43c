"""ITI-c: inference-time intervention along a logistic-probe direction.

``T(t; λ) = t + λ·σ·θ``: θ is the unit weight vector of a logistic-regression probe separating
source (label 0) from target (label 1) pooled activations, so it points towards the target;
σ is the standard deviation of the activations (source and target together) projected on θ.

Two modes:

* **per layer** (default, any site): one probe on the whole activation;
* **per head** (site ``heads``, the input of the attention output projection, width
  ``n_heads·head_dim``): one probe per head on that head's slice, each scored by its held-out
  (stratified k-fold) accuracy; only the top-K heads over *all* steered layers keep their
  direction (``ITIMap.select_top_k``), the delta is zero outside the selected heads.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from ..kernel import AffineMap
from ..options import Options, option, positive_int
from .base import SteeringMap, as_float_rows, register_map

DEFAULT_TOP_K_HEADS = 48  # the ITI paper's K for LLaMA-7B; clipped to the number of heads


def num_attention_heads(model: nn.Module) -> int:
    """Query heads of a transformers model (``num_attention_heads`` or GPT-2's ``n_head``)."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(text_cfg, key, None)
        if value:
            return int(value)
    raise ValueError(f"cannot tell the number of attention heads of a {type(model).__name__}")


def _folds(y: np.ndarray, cv_folds: int, seed: int) -> StratifiedKFold:
    smallest = int(min((y == 0).sum(), (y == 1).sum()))
    k = min(cv_folds, smallest)
    if k < 2:
        raise ValueError(
            f"too little data for a probe: each class needs at least 2 examples (got {smallest})"
        )
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)


def probe_accuracy(
    source: Tensor | np.ndarray, target: Tensor | np.ndarray, *, cv_folds: int = 5,
    seed: int = 0, C: float = 1.0,
) -> float:
    """Held-out accuracy of a standardised logistic probe source (0) vs target (1).

    This is the "is there a signal at this site?" number reported after every fit.
    """
    s, t = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    x = np.concatenate([s, t])
    y = np.concatenate([np.zeros(len(s)), np.ones(len(t))])
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    # many small fits: multi-threaded BLAS only adds overhead (5x slower on a busy machine)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return float(cross_val_score(pipe, x, y, cv=_folds(y, cv_folds, seed)).mean())


def _probe_direction(
    s: np.ndarray, t: np.ndarray, *, cv_folds: int, seed: int, C: float
) -> tuple[np.ndarray, float, float]:
    """(unit direction towards the target, projected std, held-out accuracy) of one probe."""
    x = np.concatenate([s, t])
    y = np.concatenate([np.zeros(len(s)), np.ones(len(t))])

    def probe() -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=2000)

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        acc = float(cross_val_score(probe(), x, y, cv=_folds(y, cv_folds, seed)).mean())
        w = probe().fit(x, y).coef_[0]
    norm = float(np.linalg.norm(w))
    if norm == 0.0 or not np.isfinite(norm):
        return np.zeros(x.shape[1]), 0.0, acc
    theta = w / norm
    sigma = float(np.std(x @ theta))
    return theta, sigma, acc


@dataclass
class ITIOptions(Options):
    """Fit options of ITI (per layer, or per head on ``heads`` sites)."""

    top_k_heads: int | None = option(
        DEFAULT_TOP_K_HEADS, "ITI on --site heads: steer the K heads of best probe accuracy "
                             "over all steered layers (None: every head)", type=positive_int)
    n_heads: int | None = option(
        None, "heads per site (default: the model's, on --site heads; else one probe per "
              "layer)", cli=False)
    cv_folds: int = option(5, "folds of each probe's held-out accuracy", cli=False)
    seed: int = option(0, "seed of the folds (the command line's --seed)", flag="--seed")
    C: float = option(1.0, "inverse L2 strength of the logistic probes", cli=False)


@register_map
class ITIMap(SteeringMap):
    """``delta = σ·θ`` per group (one group per layer, or one per head), zero on masked heads.

    Buffers: ``unit`` (d,) the unit direction(s), concatenated per head in head mode;
    ``sigma`` (G,) projected stds; ``mask`` (G,) 1 for a steered group; ``accuracy`` (G,) probe
    held-out accuracies (G = 1 per layer, G = n_heads per head).
    """

    method = "iti"
    Options = ITIOptions

    def __init__(
        self, unit: Tensor, sigma: Tensor, mask: Tensor | None = None,
        accuracy: Tensor | None = None,
    ) -> None:
        super().__init__()
        unit = unit.detach().float().reshape(-1)
        sigma = sigma.detach().float().reshape(-1)
        groups = sigma.numel()
        if groups == 0 or unit.numel() % groups:
            raise ValueError(f"width {unit.numel()} does not split into {groups} heads")
        self.register_buffer("unit", unit.clone())
        self.register_buffer("sigma", sigma.clone())
        self.register_buffer(
            "mask", torch.ones(groups) if mask is None else mask.detach().float().reshape(-1).clone()
        )
        self.register_buffer(
            "accuracy",
            torch.full((groups,), float("nan")) if accuracy is None
            else accuracy.detach().float().reshape(-1).clone(),
        )

    @property
    def n_groups(self) -> int:
        return int(self.sigma.numel())

    @property
    def per_head(self) -> bool:
        return self.n_groups > 1

    def affine(self) -> AffineMap:
        g = self.n_groups
        return AffineMap(b=(self.unit.view(g, -1) * (self.sigma * self.mask).unsqueeze(-1)).reshape(-1))

    def config(self) -> dict[str, Any]:
        return {"n_heads": self.n_groups if self.per_head else 0}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> ITIMap:
        groups = int(config.get("n_heads") or 0) or 1
        return cls(torch.zeros(dim), torch.zeros(groups), torch.zeros(groups))

    @classmethod
    def adapt_options(cls, options: ITIOptions, model: nn.Module, site: str) -> ITIOptions:
        """On ``heads`` sites, one probe per head: ``n_heads`` from the model unless given."""
        if site == "heads" and options.n_heads is None:
            return replace(options, n_heads=num_attention_heads(model))
        return options

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, options: Any = None, **kwargs: Any) -> ITIMap:
        """Probe(s) source vs target on pooled activations; ``n_heads`` > 1 → one per head."""
        opts = cls.options(options, **kwargs)
        n_heads, cv_folds, seed, C = opts.n_heads, opts.cv_folds, opts.seed, opts.C
        s = as_float_rows(source, "source activations").double().numpy()
        t = as_float_rows(target, "target activations").double().numpy()
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"source and target widths differ: {s.shape[1]} vs {t.shape[1]}")
        d = s.shape[1]
        groups = int(n_heads or 1)
        if d % groups:
            raise ValueError(f"site width {d} is not a multiple of n_heads={groups}")
        width = d // groups
        units, sigmas, accs = [], [], []
        for g in range(groups):
            sl = slice(g * width, (g + 1) * width)
            theta, sigma, acc = _probe_direction(s[:, sl], t[:, sl], cv_folds=cv_folds,
                                                 seed=seed, C=C)
            units.append(theta)
            sigmas.append(sigma)
            accs.append(acc)
        return cls(
            torch.from_numpy(np.concatenate(units)), torch.tensor(sigmas),
            torch.ones(groups), torch.tensor(accs),
        )

    @staticmethod
    def select_top_k(maps: Sequence[ITIMap], top_k_heads: int | None = DEFAULT_TOP_K_HEADS) -> int:
        """Keep the K heads of best probe accuracy over all ``maps`` (head mode); returns K used.

        Layer-mode maps are left alone. Ties break towards earlier layers, then lower heads.
        """
        heads = [(float(m.accuracy[h]), i, h)
                 for i, m in enumerate(maps) if m.per_head for h in range(m.n_groups)]
        if not heads:
            return 0
        k = len(heads) if top_k_heads is None else int(top_k_heads)
        if k < 1:
            raise ValueError(f"top_k_heads must be at least 1 (got {top_k_heads})")
        k = min(k, len(heads))
        chosen = sorted(heads, key=lambda h: (-h[0], h[1], h[2]))[:k]
        for m in maps:
            if m.per_head:
                m.mask.zero_()
        for _, i, h in chosen:
            maps[i].mask[h] = 1.0
        return k

    @classmethod
    def finalize(cls, maps: Sequence[SteeringMap], options: Any = None) -> dict[str, Any]:
        """Called by ``fit`` once every site is fitted: the global top-K head selection."""
        opts = cls.options(options)
        iti = [m for m in maps if isinstance(m, ITIMap)]
        k = cls.select_top_k(iti, opts.top_k_heads)
        if not k:
            return {}
        return {"top_k_heads": k, "heads_total": sum(m.n_groups for m in iti if m.per_head)}
