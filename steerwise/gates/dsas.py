"""Offline DSAS gates: PCA + logistic regression (source vs control), folded into one dot product.

Fitting follows docs/algorithms.md §2: per site, mean-pooled activations of the source set (label 1)
and the control set (label 0) → PCA with r components (default 5) → logistic regression;
held-out accuracy by stratified k-fold cross-validation; then the pipeline is folded into
``h(t) = sigmoid(ŵ·t + b̂)`` with ``ŵ = Pᵀw`` (``/σ`` per component when whitening) and
``b̂ = b − ŵ·μ``. At inference a gate costs one dot product per token.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits
from torch import Tensor

from ..kernel import LinearGate
from ..maps.base import as_float_rows
from .base import Gate, GateFit, GateFitter, StepContext, register_gate, register_gate_fitter


@dataclass
class DSASOptions:
    """Options of the offline DSAS fit (defaults from the DSAS paper; docs/algorithms.md).

    ``below_threshold``: what to do with a layer whose gate accuracy is under ``threshold``:
    ``"skip"`` (do not steer it, default) or ``"constant"`` (steer it with constant strength).
    ``adaptive``: adaptive accuracy scaling, ``a_l = clip((acc − 0.5)/0.5, 0, 1)``, replaces the
    threshold.
    """

    n_components: int = 5
    cv_folds: int = 5
    threshold: float = 0.75
    below_threshold: Literal["skip", "constant"] = "skip"
    adaptive: bool = False
    whiten: bool = False
    C: float = 1.0
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_two_class(ns: int, nc: int, cv_folds: int) -> None:
    """Raise a clear error when either class is too small for the gate's cross-validation."""
    need = max(2, cv_folds)
    if min(ns, nc) < need:
        raise ValueError(
            f"too little data for a gate: {ns} source and {nc} control examples; each class needs "
            f"at least {need} for {cv_folds}-fold cross-validation (give more texts or lower "
            f"cv_folds)"
        )


@register_gate
class DSASGate(Gate):
    """``h(t) = sigmoid(w·t + b)``; ``constant=True`` turns it into a constant 1."""

    kind = "dsas"

    def __init__(self, weight: Tensor, bias: Tensor, *, constant: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().reshape(()).clone())
        self.constant = constant

    def logits(self, t: Tensor) -> Tensor:
        return t @ self.weight + self.bias

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:
        if self.constant:
            return None
        return torch.matmul(t, self.weight).add_(self.bias).sigmoid_()

    def linear_form(self) -> LinearGate:
        if self.constant:
            return LinearGate("one")
        return LinearGate("sigmoid", self.weight, self.bias)

    def config(self) -> dict[str, Any]:
        return {"constant": self.constant}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> DSASGate:
        return cls(torch.zeros(dim), torch.zeros(()), constant=bool(config.get("constant", False)))

    @classmethod
    def fit(
        cls, source: Tensor, control: Tensor, options: DSASOptions | None = None
    ) -> tuple[DSASGate, float]:
        """Fit on pooled activations; returns the folded gate and its CV accuracy."""
        opts = options or DSASOptions()
        s = as_float_rows(source, "source activations").double().numpy()
        c = as_float_rows(control, "control activations").double().numpy()
        if s.shape[1] != c.shape[1]:
            raise ValueError(f"source and control widths differ: {s.shape[1]} vs {c.shape[1]}")
        check_two_class(len(s), len(c), opts.cv_folds)
        x = np.concatenate([s, c])
        y = np.concatenate([np.ones(len(s)), np.zeros(len(c))])
        r = min(opts.n_components, x.shape[1], x.shape[0] - 1)
        if r < opts.n_components:
            warnings.warn(f"PCA rank lowered from {opts.n_components} to {r} (data too small)")

        def pipeline():
            return make_pipeline(
                PCA(n_components=r, whiten=opts.whiten, random_state=opts.seed),
                LogisticRegression(C=opts.C, max_iter=2000),
            )

        folds = StratifiedKFold(n_splits=opts.cv_folds, shuffle=True, random_state=opts.seed)
        # tiny problems: BLAS threads only add contention (seconds on a busy 2-core machine)
        with threadpool_limits(limits=1, user_api="blas"):
            acc = float(cross_val_score(pipeline(), x, y, cv=folds, scoring="accuracy").mean())
            pipe = pipeline().fit(x, y)
        pca, lr = pipe[0], pipe[1]
        w = lr.coef_[0]
        if opts.whiten:
            w = w / np.sqrt(pca.explained_variance_)
        w_hat = pca.components_.T @ w
        b_hat = float(lr.intercept_[0] - w_hat @ pca.mean_)
        gate = cls(torch.from_numpy(w_hat).float(), torch.tensor(b_hat, dtype=torch.float32))
        return gate, acc


def layer_scale(accuracy: float, options: DSASOptions) -> tuple[float, bool]:
    """(a_l, constant) for a layer of gate accuracy ``accuracy`` under ``options``.

    Adaptive scaling: ``a_l = clip((acc − 0.5)/0.5, 0, 1)``, gate kept. Otherwise layers at or
    above τ get a_l = 1; below τ either a_l = 0 (skip) or a constant strength (gate off).
    """
    if options.adaptive:
        return float(np.clip((accuracy - 0.5) / 0.5, 0.0, 1.0)), False
    if accuracy >= options.threshold:
        return 1.0, False
    if options.below_threshold == "skip":
        return 0.0, False
    return 1.0, True


def fit_dsas_gates(sites, acts_s, acts_c, options: DSASOptions) -> tuple[dict[str, DSASGate],
                                                                         dict[str, float]]:
    """One folded DSAS gate per site (S vs C, mean-pooled) and its held-out accuracy."""
    gates, accs = {}, {}
    for s in sites:
        gates[s.name], accs[s.name] = DSASGate.fit(acts_s[s.name]["mean"], acts_c[s.name]["mean"],
                                                   options)
    return gates, accs


@register_gate_fitter
class DSASFitter(GateFitter):
    """Offline DSAS: gates fitted per site; layer scale by threshold τ (or adaptive)."""

    kind = "dsas"
    adaptive = False

    def options(self, opts) -> DSASOptions:
        return DSASOptions(**{**asdict(opts.dsas), "adaptive": True}) if self.adaptive else opts.dsas

    def fit(self, sites, acts_s, acts_c, opts) -> GateFit:
        dsas = self.options(opts)
        gates, accs = fit_dsas_gates(sites, acts_s, acts_c, dsas)
        scales = {}
        for name, gate in gates.items():
            scales[name], gate.constant = layer_scale(accs[name], dsas)
        return GateFit(dict(gates), scales, {n: {"gate_accuracy": a} for n, a in accs.items()})

    def warnings(self, entries, opts) -> list[str]:
        accs = [e.diagnostics["gate_accuracy"] for e in entries if "gate_accuracy" in e.diagnostics]
        out = []
        if accs and max(accs) < 0.6:
            out.append(
                f"all gate accuracies are near chance (max {max(accs):.2f}): DSAS cannot tell "
                f"source from control here and degrades to uniform ~half-strength steering"
            )
        if accs and all(e.scale == 0.0 for e in entries):
            out.append(f"no layer reached gate accuracy τ={opts.dsas.threshold}: nothing will be "
                       f"steered")
        return out


@register_gate_fitter
class AdaptiveDSASFitter(DSASFitter):
    """DSAS with adaptive accuracy scaling ``a_l = clip((acc − 0.5)/0.5, 0, 1)``."""

    kind = "dsas-adaptive"
    adaptive = True
