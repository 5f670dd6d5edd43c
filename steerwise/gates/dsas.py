"""Offline DSAS gates: PCA + logistic regression (source vs control), folded into one dot product.

Fitting follows docs/algorithms.md §2: per site, mean-pooled activations of the source set (label 1)
and the control set (label 0) → PCA with r components (default 5) → logistic regression;
held-out accuracy by stratified k-fold cross-validation; then the pipeline is folded into
``h(t) = sigmoid(ŵ·t + b̂)`` with ``ŵ = Pᵀw`` (``/σ`` per component when whitening) and
``b̂ = b − ŵ·μ``. At inference a gate costs one dot product per token.

Variants measured in docs/dsas-measured.md (each an option of ``DSASOptions``):

* ``train_on="tokens"``: fit on the activation of every token (as the gate is applied) instead of
  on text means; cross-validation folds then keep the tokens of one text together.
* ``negatives="control+target"``: the contrastive gate, source vs control ∪ target, so that the
  domain of the source (e.g. tweets) cannot separate the classes on its own.
* ``apply_on="prefix-mean"``: at run time the gate reads the mean activation of the sequence so
  far instead of the current token's — trained on text means, applied on (causal) text means.
* ``calibrate=q`` (default 0.9; ``None`` or ``"off"``: the paper's gate as fitted): after the
  fit, a temperature and a bias set so that a share ``q`` of the negative tokens gets a gate below
  ``calibrate_eps`` and the median source token a gate of ``1 − calibrate_eps`` (bias only when
  the medians are not separated). ``steerwise.fit`` computes the per-token logits in a second
  pass over the texts. The default since the Gemma 3 270M fronts: at equal in-domain perplexity
  it left 0.41× the ungated map's toxicity at +5 % and 0.27× at +10 % (3 seeds), where the
  uncalibrated gate left 0.62× and 0.39× (docs/dsas-measured.md, "Gate designs").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits
from torch import Tensor

from ..activations import TOKEN_TEXT, drop_first_token
from ..kernel import LinearGate
from ..maps.base import as_float_rows
from ..options import (
    OFF,
    Options,
    int_at_least,
    non_negative_int,
    open_unit_interval,
    option,
    positive_int,
    share_or_off,
    unit_interval,
)
from .base import Gate, GateFit, GateFitter, StepContext, register_gate, register_gate_fitter

APPLY_ON = ("tokens", "prefix-mean")


@dataclass
class DSASOptions(Options):
    """Options of the offline DSAS fit (defaults from the DSAS paper; docs/algorithms.md).

    ``below_threshold``: what to do with a layer whose gate accuracy is under ``threshold``:
    ``"skip"`` (do not steer it, default) or ``"constant"`` (steer it with constant strength).
    ``adaptive``: adaptive accuracy scaling, ``a_l = clip((acc − 0.5)/0.5, 0, 1)``, replaces the
    threshold.
    """

    n_components: int = option(5, "PCA rank r of DSAS gates", type=positive_int)
    cv_folds: int = option(5, "cross-validation folds of the gate accuracy",
                           type=int_at_least(2))
    threshold: float = option(0.75, "gate accuracy threshold τ", type=unit_interval)
    below_threshold: Literal["skip", "constant"] = option(
        "skip", "sites below τ: not steered, or steered at constant strength",
        choices=("skip", "constant"))
    adaptive: bool = option(False, "adaptive accuracy scaling (the dsas-adaptive gate)",
                            cli=False)
    whiten: bool = option(False, "divide the PCA components by their standard deviation")
    C: float = option(1.0, "inverse L2 strength of the gate's logistic regression", cli=False)
    seed: int = option(0, "seed of every random step", flag="--seed", type=non_negative_int)
    train_on: Literal["means", "tokens"] = option(
        "means", "DSAS gates learn from text means (the paper) or from every token, as they "
                 "are applied (docs/dsas-measured.md)", flag="--gate-train-on",
        choices=("means", "tokens"))
    negatives: Literal["control", "control+target"] = option(
        "control", "what a DSAS gate learns to keep shut: the control texts, or control and "
                   "target texts (the contrastive gate)", flag="--gate-negatives",
        choices=("control", "control+target"))
    calibrate: float | None = option(
        0.9, "rescale each DSAS gate so that a share Q of the negative tokens gets a gate below "
             "--gate-calibrate-eps and the median source token 1 − ε; 'off': the paper's gate as "
             "fitted (at +5 %% perplexity on Gemma 3 270M, 0.9 left 4.8 %% toxicity, the "
             "uncalibrated gate 7.2 %%: docs/dsas-measured.md)", flag="--gate-calibrate",
        type=share_or_off, metavar="Q|off")
    calibrate_eps: float = option(0.1, "ε of --gate-calibrate", flag="--gate-calibrate-eps",
                                  type=open_unit_interval)
    apply_on: Literal["tokens", "prefix-mean"] = option(
        "tokens", "DSAS gates read each token's activation, or the mean of the sequence so far",
        cli=False, choices=APPLY_ON)

    def __post_init__(self) -> None:
        if self.train_on not in ("means", "tokens"):
            raise ValueError(f"DSAS train_on must be 'means' or 'tokens' (got {self.train_on!r})")
        if self.negatives not in ("control", "control+target"):
            raise ValueError(f"DSAS negatives must be 'control' or 'control+target' "
                             f"(got {self.negatives!r})")
        if isinstance(self.calibrate, str) and self.calibrate.strip().lower() in OFF:
            self.calibrate = None
        if self.calibrate is not None and (isinstance(self.calibrate, (bool, str))
                                           or not 0.0 < self.calibrate < 1.0):
            raise ValueError(f"DSAS calibrate is a share in (0, 1), or None / 'off' for the "
                             f"uncalibrated gate (got {self.calibrate!r})")
        if not 0.0 < self.calibrate_eps < 0.5:
            raise ValueError(f"DSAS calibrate_eps must be in (0, 0.5) (got {self.calibrate_eps})")
        if self.apply_on not in APPLY_ON:
            raise ValueError(f"DSAS apply_on must be one of {APPLY_ON} (got {self.apply_on!r})")
        if self.n_components < 1:
            raise ValueError(f"DSAS n_components must be ≥ 1 (got {self.n_components})")

    @property
    def needs_tokens(self) -> bool:
        """Whether the fit needs every token's activation (token training)."""
        return self.train_on == "tokens"



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
    """``h(t) = sigmoid(w·t + b)``; ``constant=True`` turns it into a constant 1.

    ``apply_on="prefix-mean"``: the gate reads the mean of the activations of the sequence so
    far (every real token up to and including this one) instead of this token's alone — the
    statistic the gate was trained on (text means), applied causally. It keeps the running sum of
    ``w·t`` and the token count per row (per-sequence state, cleared at every prefill), so it is
    an external gate for the kernel; the server and steerwise.vllm refuse it like CAST.
    ``sink_free`` (set by fits with sink-free statistics, the default since they exist; absent
    in older recipes, which keep their meaning): the prefix mean leaves each row's first real
    token (the attention sink) out, as the text means the gate was trained on do."""

    kind = "dsas"

    def __init__(self, weight: Tensor, bias: Tensor, *, constant: bool = False,
                 apply_on: str = "tokens", sink_free: bool = False) -> None:
        super().__init__()
        if apply_on not in APPLY_ON:
            raise ValueError(f"DSAS apply_on must be one of {APPLY_ON} (got {apply_on!r})")
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().reshape(()).clone())
        self.constant = constant
        self.apply_on = apply_on
        self.sink_free = bool(sink_free)

    def logits(self, t: Tensor) -> Tensor:
        return t @ self.weight + self.bias

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:
        if self.constant:
            return None
        z = torch.matmul(t, self.weight)
        if self.apply_on == "prefix-mean":
            return (self._prefix_mean(z, ctx) + self.bias).sigmoid()
        return z.add_(self.bias).sigmoid_()

    def _prefix_mean(self, z: Tensor, ctx: StepContext) -> Tensor:
        """Causal mean over each row's real tokens of ``z`` (batch, new tokens), continuing the
        sums kept in ``ctx.state`` from earlier calls of the same sequence."""
        if z.ndim != 2:
            raise ValueError(f"a prefix-mean DSAS gate needs (batch, tokens, d) activations, got "
                             f"{tuple(z.shape)} for the gate's dot products")
        mask = ctx.attention_mask
        m = (mask.to(z.device, z.dtype) if mask is not None and mask.shape == z.shape
             else torch.ones_like(z))
        state = None if ctx.is_prefill else ctx.state.get(id(self))
        if self.sink_free and ctx.is_prefill:  # the sequence starts here: its sink stays out
            m = drop_first_token(m)
        sums = torch.cumsum(z * m, dim=-1)
        counts = torch.cumsum(m, dim=-1)
        if state is not None:
            if state[0].shape[0] != z.shape[0]:
                raise RuntimeError(f"a prefix-mean DSAS gate saw {state[0].shape[0]} rows, now "
                                   f"{z.shape[0]}: start a new sequence when the batch changes")
            sums = sums + state[0].unsqueeze(-1)
            counts = counts + state[1].unsqueeze(-1)
        ctx.state[id(self)] = (sums[:, -1].detach(), counts[:, -1].detach())
        return sums / counts.clamp_min(1.0)

    def linear_form(self) -> LinearGate:
        if self.constant:
            return LinearGate("one")
        if self.apply_on == "prefix-mean":
            return LinearGate("external")
        return LinearGate("sigmoid", self.weight, self.bias)

    def config(self) -> dict[str, Any]:
        # sink_free matters to prefix-mean gates only; kept for every gate so configs share keys
        return {"constant": self.constant, "apply_on": self.apply_on, "sink_free": self.sink_free}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> DSASGate:
        return cls(torch.zeros(dim), torch.zeros(()), constant=bool(config.get("constant", False)),
                   apply_on=config.get("apply_on", "tokens"),
                   sink_free=bool(config.get("sink_free", False)))

    @classmethod
    def fit(
        cls, source: Tensor, control: Tensor, options: DSASOptions | None = None, *,
        groups: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[DSASGate, float]:
        """Fit on activations (one row per text, or per token); returns the folded gate and its
        cross-validated accuracy. ``groups``: the text index of each source and control row
        (token training), so that no text has tokens on both sides of a fold."""
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
        # unequal classes (tokens, contrastive negatives): weigh them equally
        balanced = "balanced" if opts.train_on == "tokens" or opts.negatives != "control" else None

        def pipeline():
            return make_pipeline(
                PCA(n_components=r, whiten=opts.whiten, random_state=opts.seed),
                LogisticRegression(C=opts.C, max_iter=2000, class_weight=balanced),
            )

        cv_kw: dict[str, Any] = {}
        if groups is None:
            folds: Any = StratifiedKFold(n_splits=opts.cv_folds, shuffle=True,
                                         random_state=opts.seed)
        else:
            folds = StratifiedGroupKFold(n_splits=opts.cv_folds, shuffle=True,
                                         random_state=opts.seed)
            # source and control texts are numbered apart, so a group is one text
            gs, gc = (g.reshape(-1).long().numpy() for g in groups)
            cv_kw["groups"] = np.concatenate([gs, gc + int(gs.max()) + 1])
        scoring = "balanced_accuracy" if balanced else "accuracy"
        # tiny problems: BLAS threads only add contention (seconds on a busy 2-core machine)
        with threadpool_limits(limits=1, user_api="blas"):
            acc = float(cross_val_score(pipeline(), x, y, cv=folds, scoring=scoring,
                                        **cv_kw).mean())
            pipe = pipeline().fit(x, y)
        pca, lr = pipe[0], pipe[1]
        w = lr.coef_[0]
        if opts.whiten:
            w = w / np.sqrt(pca.explained_variance_)
        w_hat = pca.components_.T @ w
        b_hat = float(lr.intercept_[0] - w_hat @ pca.mean_)
        gate = cls(torch.from_numpy(w_hat).float(), torch.tensor(b_hat, dtype=torch.float32))
        return gate, acc


def calibrate_gate(gate: DSASGate, source_logits: Tensor, negative_logits: Tensor, share: float,
                   eps: float) -> dict[str, float]:
    """Rescale the gate's logit ``z → a·z + c`` so that (at least) a share ``share`` of the
    negative tokens gets a gate of at most ``eps`` and the median source token ``1 − eps`` (a
    temperature and a bias); when the source median is not above that negative quantile, only
    the bias moves (a = 1). Takes the gate's logits of the source and negative tokens; returns
    (a, c) and the shares reached on those tokens (more than ``share`` when tokens tie at the
    quantile, e.g. identical first tokens)."""
    zs, zn = source_logits.double().flatten(), negative_logits.double().flatten()
    if zs.numel() == 0 or zn.numel() == 0:
        raise ValueError("gate calibration needs the logits of some source and negative tokens")
    lo, hi = math.log(eps / (1 - eps)), math.log((1 - eps) / eps)
    q_neg = float(torch.quantile(zn, share, interpolation="higher"))
    med_s = float(zs.median())
    a = (hi - lo) / (med_s - q_neg) if med_s > q_neg else 1.0
    c = lo - a * q_neg
    with torch.no_grad():
        gate.weight.mul_(a)
        gate.bias.mul_(a).add_(c)
    neg_below = float(((a * zn + c) <= lo + 1e-4).double().mean())
    src_open = float(torch.sigmoid(a * zs + c).mean())
    return {"calibration_scale": a, "calibration_shift": c, "negatives_below_eps": neg_below,
            "source_mean_gate": src_open}


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
                                                                         dict[str, dict]]:
    """One folded DSAS gate per site (S vs negatives: text means or tokens) and its diagnostics
    (held-out accuracy under ``gate_accuracy``). ``acts_c`` holds the negatives (control, or
    control ∪ target: ``steerwise.fit``, which also calibrates the gates afterwards)."""
    gates, diags = {}, {}
    for s in sites:
        a_s, a_c = acts_s[s.name], acts_c[s.name]
        if options.train_on == "tokens":
            gate, acc = DSASGate.fit(a_s["tokens"], a_c["tokens"], options,
                                     groups=(a_s[TOKEN_TEXT], a_c[TOKEN_TEXT]))
        else:
            gate, acc = DSASGate.fit(a_s["mean"], a_c["mean"], options)
        diags[s.name] = {"gate_accuracy": acc}
        gates[s.name] = gate
    return gates, diags


@register_gate_fitter
class DSASFitter(GateFitter):
    """Offline DSAS: gates fitted per site; layer scale by threshold τ (or adaptive)."""

    kind = "dsas"
    Options = DSASOptions
    options_field = "dsas"
    adaptive = False

    def options(self, opts) -> DSASOptions:
        dsas = super().options(opts)
        return DSASOptions(**{**asdict(dsas), "adaptive": True}) if self.adaptive else dsas

    def cv_folds(self, opts) -> int:
        return opts.dsas.cv_folds

    def poolings(self, opts) -> set[str]:
        return {"tokens"} if opts.dsas.needs_tokens else set()

    def calibrate(self, ctx, fitted: GateFit) -> None:
        """``dsas.calibrate``: a second pass over the source and negative texts keeps each
        gate's logit per token (not the activations: memory O(tokens · sites)), then rescales
        the gate (``calibrate_gate``); the shares reached go to the diagnostics."""
        dsas = ctx.options.dsas
        if dsas.calibrate is None:
            return
        gates = {s.name: fitted.gates[s.name] for s in ctx.sites
                 if isinstance(fitted.gates.get(s.name), DSASGate)
                 and not fitted.gates[s.name].constant}
        negatives = ctx.negative_texts()
        if not gates or not negatives:
            return
        project = {name: g.weight.detach().reshape(-1, 1) for name, g in gates.items()}
        chosen = [s for s in ctx.sites if s.name in gates]
        z_s = ctx.collect(chosen, ctx.source, "calibration: source", pooling=("tokens",),
                          project=project)
        z_n = ctx.collect(chosen, negatives, "calibration: negatives", pooling=("tokens",),
                          project=project)
        for name, gate in gates.items():
            bias = gate.bias.detach()
            fitted.diagnostics.setdefault(name, {}).update(calibrate_gate(
                gate, z_s[name]["tokens"].flatten() + bias, z_n[name]["tokens"].flatten() + bias,
                dsas.calibrate, dsas.calibrate_eps))

    def fit(self, sites, acts_s, acts_c, opts) -> GateFit:
        dsas = self.options(opts)
        gates, diags = fit_dsas_gates(sites, acts_s, acts_c, dsas)
        scales = {}
        for name, gate in gates.items():
            scales[name], gate.constant = layer_scale(diags[name]["gate_accuracy"], dsas)
            gate.apply_on = dsas.apply_on
            gate.sink_free = bool(getattr(opts, "sink_free", True))
        return GateFit(dict(gates), scales, diags)

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
