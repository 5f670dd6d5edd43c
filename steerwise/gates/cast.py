"""CAST (conditional activation steering) as a gate, the baseline DSAS is compared against.

A *condition vector* c is fitted at one condition site from source (S) vs control (C)
mean-pooled activations: by default the first principal component of the pair-centred
activations (pairs (s_i, c_i); each pair minus its own mean, i.e. ±(s_i − c_i)/2), oriented
towards S [choice; ``vector="mean-diff"`` uses mean(S) − mean(C)]. For a prompt with mean
activation h̄ at the condition site, ``sim = cos(h̄, tanh(P_c h̄))`` with ``P_c = c cᵀ / cᵀc``;
the prompt is steered (gate 1) when sim passes a threshold — above or below it, both
threshold and side chosen by an F1 grid search on the fitting data.

Decisions are **per row**, taken on the prompt at prefill, and kept for every decode step of
that row. The decision lives in the hook handle's per-sequence state (``StepContext.state``), not
on the gate, so one recipe applied in two threads decides twice, independently; the handle
clears it at each prefill.

How the decision reaches every steered layer: the gate at the condition site is the
*condition* gate — it computes and stores the per-row decision; the gates of all other steered
sites are *followers* that read it. The handle links followers to their condition gate when it
is installed (``link``), so this works the same for a freshly fitted and a loaded recipe. Hooks
run in the model's forward order, so at prefill a follower at a layer *before* the condition
layer runs before any decision exists: it returns 0 — those layers leave the prompt tokens
unsteered (which also means the condition reads an activation those layers did not touch) —
and from the first generated token on every layer uses the row's decision. (Without a KV cache
every forward is a prefill, so the decision is retaken on the whole sequence at each step.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from ..activations import drop_first_token
from ..maps.base import as_float_rows
from ..options import Options, int_at_least, non_negative_int, option
from ..sites import site_width
from ..steering import SiteSteering
from .base import Gate, GateFit, GateFitter, StepContext, register_gate, register_gate_fitter

ROLES = ("condition", "follow")
COMPARATORS = ("greater", "smaller")


@dataclass
class CASTOptions(Options):
    """``condition_layer``: the layer of the condition site (default: best held-out F1 among
    the steered sites); ``vector``: ``"pca"`` (pair-centred PCA, default) or ``"mean-diff"``;
    ``comparator``: ``"auto"`` (by F1), ``"greater"`` or ``"smaller"``."""

    condition_layer: int | None = option(
        None, "CAST condition layer (default: best held-out F1)", flag="--cast-layer",
        type=non_negative_int)
    vector: Literal["pca", "mean-diff"] = option("pca", "CAST condition vector", cli=False,
                                                 choices=("pca", "mean-diff"))
    comparator: Literal["auto", "greater", "smaller"] = option(
        "auto", "CAST threshold side (auto: by F1)", cli=False,
        choices=("auto", *COMPARATORS))
    cv_folds: int = option(5, "folds of the held-out F1", flag="--cv-folds",
                           type=int_at_least(2))
    seed: int = option(0, "seed of the folds and the PCA", flag="--seed")


# ---- the statistic ----------------------------------------------------------------------------
def cast_similarity(h: Tensor, vector: Tensor) -> Tensor:
    """``cos(h, tanh(P_c h))`` for rows ``h`` (..., d) and condition vector ``c`` (d,)."""
    c = vector / vector.norm().clamp_min(1e-12)
    proj = torch.tanh((h @ c).unsqueeze(-1) * c)
    num = (h * proj).sum(-1)
    den = h.norm(dim=-1) * proj.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def condition_vector(
    source: np.ndarray, control: np.ndarray, how: str = "pca", seed: int = 0
) -> np.ndarray:
    """The condition direction from S vs C rows, oriented so that S projects higher."""
    if how == "mean-diff":
        v = source.mean(0) - control.mean(0)
    elif how == "pca":
        n = min(len(source), len(control))
        rng = np.random.default_rng(seed)
        s = source[rng.permutation(len(source))[:n]]
        c = control[rng.permutation(len(control))[:n]]
        centre = (s + c) / 2.0
        rows = np.concatenate([s - centre, c - centre])
        v = PCA(n_components=1, random_state=seed).fit(rows).components_[0]
    else:
        raise ValueError(f"unknown CAST vector {how!r}; choose 'pca' or 'mean-diff'")
    if (source @ v).mean() < (control @ v).mean():
        v = -v
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _sims(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    return cast_similarity(torch.from_numpy(x), torch.from_numpy(v)).numpy()


def best_threshold(
    sims: np.ndarray, labels: np.ndarray, comparator: str = "auto"
) -> tuple[float, str, float]:
    """(threshold, comparator, F1) maximising F1 over a grid of all midpoints of the sims."""
    u = np.unique(sims)
    grid = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1e-6]])
    sides = COMPARATORS if comparator == "auto" else (comparator,)
    pos = labels == 1
    best = (-1.0, 0.0, "greater")
    for side in sides:
        pred = sims[None, :] > grid[:, None] if side == "greater" else sims[None, :] < grid[:, None]
        tp = (pred & pos).sum(1)
        fp = (pred & ~pos).sum(1)
        fn = (~pred & pos).sum(1)
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        i = int(np.argmax(f1))
        if f1[i] > best[0]:
            best = (float(f1[i]), float(grid[i]), side)
    return best[1], best[2], best[0]


def _decide(sims: np.ndarray, threshold: float, comparator: str) -> np.ndarray:
    return sims > threshold if comparator == "greater" else sims < threshold


@dataclass
class CASTSiteFit:
    vector: np.ndarray
    threshold: float
    comparator: str
    f1: float          # held-out (k-fold) F1 of the decision S vs C
    accuracy: float    # held-out accuracy


def fit_condition(
    source: Tensor, control: Tensor, options: CASTOptions | None = None
) -> CASTSiteFit:
    """Condition vector and threshold at one site, with held-out F1/accuracy by k-fold CV."""
    opts = options or CASTOptions()
    s = as_float_rows(source, "source activations").double().numpy()
    c = as_float_rows(control, "control activations").double().numpy()
    if s.shape[1] != c.shape[1]:
        raise ValueError(f"source and control widths differ: {s.shape[1]} vs {c.shape[1]}")
    x = np.concatenate([s, c])
    y = np.concatenate([np.ones(len(s), dtype=int), np.zeros(len(c), dtype=int)])
    k = min(opts.cv_folds, len(s), len(c))
    if k < 2:
        raise ValueError("CAST needs at least 2 source and 2 control examples")
    f1s, accs = [], []
    for train, test in StratifiedKFold(k, shuffle=True, random_state=opts.seed).split(x, y):
        xs, xc = x[train][y[train] == 1], x[train][y[train] == 0]
        v = condition_vector(xs, xc, opts.vector, opts.seed)
        thr, side, _ = best_threshold(_sims(x[train], v), y[train], opts.comparator)
        pred = _decide(_sims(x[test], v), thr, side)
        truth = y[test] == 1
        tp = int((pred & truth).sum())
        denom = 2 * tp + int((pred & ~truth).sum()) + int((~pred & truth).sum())
        f1s.append(2 * tp / denom if denom else 0.0)
        accs.append(float((pred == truth).mean()))
    v = condition_vector(s, c, opts.vector, opts.seed)
    thr, side, _ = best_threshold(_sims(x, v), y, opts.comparator)
    return CASTSiteFit(v, thr, side, float(np.mean(f1s)), float(np.mean(accs)))


def choose_condition_site(
    fits: dict[str, CASTSiteFit], layers: dict[str, int], condition_layer: int | None
) -> str:
    """The condition site: the one at ``condition_layer``, else the best held-out F1
    (ties: accuracy, then the earlier layer)."""
    if condition_layer is not None:
        at = [n for n in fits if layers[n] == condition_layer]
        if not at:
            raise ValueError(f"no fitted site at condition layer {condition_layer}")
        return at[0]
    return max(fits, key=lambda n: (fits[n].f1, fits[n].accuracy, -layers[n]))


# ---- the gate ---------------------------------------------------------------------------------
@register_gate
class CASTGate(Gate):
    """``role="condition"``: holds ``vector`` and decides per row at prefill;
    ``role="follow"``: returns the decision of the condition gate of the same ``group``."""

    kind = "cast"

    def __init__(
        self,
        role: str,
        *,
        vector: Tensor | None = None,
        threshold: float = 0.0,
        comparator: str = "greater",
        group: str = "cast",
        condition_site: str = "",
        sink_free: bool = False,
    ) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown CAST role {role!r}; choose from {ROLES}")
        if comparator not in COMPARATORS:
            raise ValueError(f"unknown comparator {comparator!r}; choose from {COMPARATORS}")
        if role == "condition" and vector is None:
            raise ValueError("a CAST condition gate needs its condition vector")
        self.role = role
        self.threshold = float(threshold)
        self.comparator = comparator
        self.group = group
        self.condition_site = condition_site
        # the prompt mean leaves each row's first real token (the attention sink) out, as the
        # text means the condition was fitted on do (fits with sink-free statistics; absent in
        # older recipes, which keep their meaning)
        self.sink_free = bool(sink_free)
        if vector is not None:
            self.register_buffer("vector", vector.detach().float().reshape(-1).clone())
        self._leader: list[CASTGate] = []  # a list, so the leader is not a registered submodule

    def link(self, entries: Sequence[Any]) -> None:
        """Find this follower's condition gate among the steering's entries (handle install)."""
        if self.role == "condition":
            return
        leaders = [e.gate for e in entries if isinstance(e.gate, CASTGate)
                   and e.gate.role == "condition" and e.gate.group == self.group]
        if len(leaders) != 1:
            raise ValueError(
                f"CAST gate group {self.group!r} needs exactly one condition gate among the "
                f"steered sites (found {len(leaders)}); the condition site was "
                f"{self.condition_site!r}"
            )
        self._leader = [leaders[0]]

    def decide(self, t: Tensor, ctx: StepContext) -> Tensor:
        """Per-row decision (batch,) from the mean prompt activation (padding masked out; the
        first real token too when ``sink_free``, unless it is the prompt's only token)."""
        x = t.flatten(1, -2) if t.ndim > 2 else t.unsqueeze(1)
        mask = ctx.attention_mask
        m = (mask.to(x.device, x.dtype) if mask is not None and mask.shape == x.shape[:2]
             else torch.ones(x.shape[:2], device=x.device, dtype=x.dtype))
        if self.sink_free and ctx.is_prefill:
            kept = drop_first_token(m)
            m = torch.where(kept.sum(1, keepdim=True) > 0, kept, m)
        m = m.unsqueeze(-1)
        h = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        sims = cast_similarity(h, self.vector)
        hit = sims > self.threshold if self.comparator == "greater" else sims < self.threshold
        return hit.to(t.dtype)

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor:
        if self.role == "condition":
            decision = ctx.state.get(id(self))
            if ctx.is_prefill or decision is None:
                decision = ctx.state[id(self)] = self.decide(t, ctx).detach()
        else:
            if not self._leader:
                raise RuntimeError("CAST follower gate used before link(): apply it via a recipe")
            decision = ctx.state.get(id(self._leader[0]))
            if decision is None:  # before the condition layer at prefill
                return torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
        if decision.shape[0] != t.shape[0]:
            raise RuntimeError(
                f"CAST decided for a batch of {decision.shape[0]} rows but sees {t.shape[0]}: "
                f"start a new sequence (prefill) when the batch changes"
            )
        shape = (t.shape[0],) + (1,) * (t.ndim - 2)
        return decision.to(t.device, t.dtype).view(shape).expand(t.shape[:-1])

    def config(self) -> dict[str, Any]:
        return {
            "role": self.role, "threshold": self.threshold, "comparator": self.comparator,
            "group": self.group, "condition_site": self.condition_site,
            "sink_free": self.sink_free,
        }

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> CASTGate:
        role = config.get("role", "follow")
        return cls(
            role,
            vector=torch.zeros(dim) if role == "condition" else None,
            threshold=float(config.get("threshold", 0.0)),
            comparator=config.get("comparator", "greater"),
            group=config.get("group", "cast"),
            condition_site=config.get("condition_site", ""),
            sink_free=bool(config.get("sink_free", False)),
        )


@register_gate_fitter
class CASTFitter(GateFitter):
    """CAST: one condition site (best held-out F1, or ``cast.condition_layer``) decides per row;
    every other steered site follows. A condition layer that is not steered is collected too and
    carried by an identity map."""

    kind = "cast"
    Options = CASTOptions
    options_field = "cast"

    def cv_folds(self, opts) -> int:
        return opts.cast.cv_folds

    def extra_sites(self, model, sites, opts):
        from ..sites import resolve_sites

        layer = opts.cast.condition_layer
        if layer is None:
            return []
        if opts.site.startswith(("re:", "re-in:")):
            raise ValueError("a CAST condition layer needs a named site kind, not a regex site")
        if layer in [s.layer for s in sites]:
            return []
        return resolve_sites(model, opts.site, [layer])

    def fit(self, sites, acts_s, acts_c, opts) -> GateFit:
        fits = {s.name: fit_condition(acts_s[s.name]["mean"], acts_c[s.name]["mean"], opts.cast)
                for s in sites}
        cond = choose_condition_site(fits, {s.name: s.layer for s in sites},
                                     opts.cast.condition_layer)
        best = fits[cond]
        gates: dict[str, Gate] = {}
        diag: dict[str, dict[str, Any]] = {}
        for s in sites:
            diag[s.name] = {"gate_accuracy": fits[s.name].accuracy, "cast_f1": fits[s.name].f1}
            if s.name == cond:
                gates[s.name] = CASTGate(
                    "condition", vector=torch.from_numpy(best.vector).float(),
                    threshold=best.threshold, comparator=best.comparator, condition_site=cond,
                    sink_free=bool(getattr(opts, "sink_free", True)),
                )
                diag[s.name]["cast_condition"] = True
            else:
                gates[s.name] = CASTGate("follow", condition_site=cond)
        return GateFit(gates, {s.name: 1.0 for s in sites}, diag)

    def finish(self, entries, fitted, acts_s, acts_c, ctx):
        def is_condition(e) -> bool:
            return isinstance(e.gate, CASTGate) and e.gate.role == "condition"

        if not any(is_condition(e) for e in entries):  # carried by an identity map
            site = ctx.extra_sites[0]
            ident = ctx.map_cls.empty(site_width(ctx.model, site), entries[0].map.config())
            entries.append(SiteSteering(site, ident, fitted.gates[site.name], 1.0,
                                        {**fitted.diagnostics.get(site.name, {}),
                                         "condition_only": True}))
            entries.sort(key=lambda e: e.site.layer)
        ctx.fit_info["cast"] = {
            "condition_site": next(e.site.name for e in entries if is_condition(e))}
        return entries
