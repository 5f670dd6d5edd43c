"""Fit a steering from example texts: activations → maps (how) and gates (when) → Recipe.

Sets (docs/algorithms.md notation): ``source`` S = behaviour to remove or the context to act in,
``target`` T = the behaviour to move towards, ``control`` C = neutral text steering must leave
alone. Maps are fitted S → T; DSAS gates S (label 1) vs C (label 0). When no target set is
given, the control set serves as the target (the usual toxicity set-up: toxic → neutral).

Every map combines with every gate: offline maps are fitted per site from pooled activations;
end-to-end maps (LinEAS) and learned gates (E2E-DSAS) are then trained through the frozen model
(``steerwise.maps.lineas.train_end_to_end``). Each site's diagnostics report the gate's held-out
accuracy (S vs C) and a probe's held-out accuracy (S vs T), so a user sees where the signal is.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import collect_activations
from .gates.base import Gate, NoGate, StepContext
from .gates.cast import CASTGate, CASTOptions, choose_condition_site, fit_condition
from .gates.dsas import DSASGate, DSASOptions, check_two_class, layer_scale
from .gates.e2e import E2EGate
from .hooks import SiteSteering
from .maps.base import MAP_REGISTRY
from .maps.iti import num_attention_heads, probe_accuracy
from .maps.lineas import LinEASOptions, train_end_to_end
from .recipe import ModelIdentity, Recipe
from .sites import resolve_sites, site_width

GATES = ("none", "dsas", "dsas-adaptive", "cast", "e2e")


@dataclass
class FitOptions:
    """How to fit. ``map_options`` are passed to the map's ``fit`` (method-specific), e.g.
    ``top_k_heads`` (ITI per head), ``support`` / ``support_quantiles`` (AcT).
    ``lineas``: end-to-end training (LinEAS maps, E2E gates); ``cast``: the CAST gate;
    ``probe_accuracy``: report a probe's held-out S-vs-T accuracy per site."""

    method: str = "caa"
    gate: str = "dsas"
    site: str = "residual"
    layers: str | int | Sequence[int] | None = None
    pooling: str = "mean"
    batch_size: int = 16
    max_length: int | None = None
    default_strength: float = 1.0
    dsas: DSASOptions = field(default_factory=DSASOptions)
    map_options: dict[str, Any] = field(default_factory=dict)
    lineas: LinEASOptions = field(default_factory=LinEASOptions)
    cast: CASTOptions = field(default_factory=CASTOptions)
    probe_accuracy: bool = True

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = self.layers if not isinstance(self.layers, Sequence) or isinstance(
            self.layers, str
        ) else list(self.layers)
        return out


def _check_texts(name: str, texts: Sequence[str] | None) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of texts, not one string")
    texts = [t for t in texts]
    if not texts:
        raise ValueError(f"the {name} set is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{name} text #{i} is empty or not a string")
    return texts


def fit(
    model: nn.Module,
    tokenizer,
    source: Sequence[str],
    control: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    options: FitOptions | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> Recipe:
    """Fit a steering recipe. Keyword overrides set fields of ``FitOptions``.

    Example: ``fit(model, tok, toxic, neutral, method="caa", gate="dsas", layers="1-4")``.
    """
    opts = options or FitOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown fit option {key!r}")
        setattr(opts, key, value)
    if opts.method not in MAP_REGISTRY:
        raise ValueError(
            f"unknown method {opts.method!r}; known: {', '.join(sorted(MAP_REGISTRY))}"
        )
    if opts.gate not in GATES:
        raise ValueError(f"unknown gate {opts.gate!r}; known: {', '.join(GATES)}")
    source = _check_texts("source", source)
    control = _check_texts("control", control)
    target = _check_texts("target", target)
    if target is None:
        if control is None:
            raise ValueError("give a target set (or a control set, used as target when no target)")
        target = control
    if opts.gate != "none" and control is None:
        raise ValueError(f"gate {opts.gate!r} needs a control set (texts not to steer)")
    dsas_opts = opts.dsas
    if opts.gate == "dsas-adaptive":
        dsas_opts = DSASOptions(**{**asdict(opts.dsas), "adaptive": True})
    if opts.gate != "none":
        folds = opts.cast.cv_folds if opts.gate == "cast" else dsas_opts.cv_folds
        check_two_class(len(source), len(control or []), folds)
    map_cls = MAP_REGISTRY[opts.method]
    end_to_end = bool(getattr(map_cls, "end_to_end", False))
    if end_to_end or opts.gate == "e2e":
        opts.lineas.check()

    sites = resolve_sites(model, opts.site, opts.layers)
    # CAST may decide at a layer that is not steered: collect it too, steer it with an identity map
    extra_sites = []
    if opts.gate == "cast" and opts.cast.condition_layer is not None:
        if opts.site.startswith(("re:", "re-in:")):
            raise ValueError("a CAST condition layer needs a named site kind, not a regex site")
        if opts.cast.condition_layer not in [s.layer for s in sites]:
            extra_sites = resolve_sites(model, opts.site, [opts.cast.condition_layer])
    map_pool = opts.pooling
    poolings = sorted({map_pool, "mean"})
    model_was_training = model.training
    model.eval()
    try:
        kw = dict(sites=sites + extra_sites, batch_size=opts.batch_size, max_length=opts.max_length,
                  progress=progress, pooling=poolings)
        acts_s = collect_activations(model, tokenizer, source, desc="source", **kw)
        acts_t = (
            acts_s if target is source
            else collect_activations(model, tokenizer, target, desc="target", **kw)
        )
        if target is control:
            acts_c = acts_t
        elif control is not None:
            acts_c = collect_activations(model, tokenizer, control, desc="control", **kw)
        else:
            acts_c = None
    finally:
        model.train(model_was_training)

    fit_info: dict[str, Any] = {
        "n_source": len(source),
        "n_target": len(target),
        "n_control": len(control) if control is not None else 0,
        "target_is_control": target is control,
        "options": opts.to_json(),
    }

    # how: one map per site (offline maps fitted here; end-to-end maps start at identity)
    map_kwargs = dict(opts.map_options)
    if opts.site == "heads" and "n_heads" in inspect.signature(map_cls.fit).parameters:
        map_kwargs.setdefault("n_heads", num_attention_heads(model))
    maps = []
    for site in sites:
        if end_to_end:
            maps.append(map_cls.empty(site_width(model, site), dict(opts.map_options)))
        else:
            maps.append(map_cls.fit(acts_s[site.name][map_pool], acts_t[site.name][map_pool],
                                    **map_kwargs))
    finalize = getattr(map_cls, "finalize", None)
    if callable(finalize):
        summary = finalize(maps, **map_kwargs)
        if summary:
            fit_info["map"] = summary

    # when: one gate per site
    gates, scales, gate_diag = _fit_gates(opts, dsas_opts, sites + extra_sites, acts_s, acts_c)
    entries = []
    for site, steering_map in zip(sites, maps):
        diag: dict[str, Any] = dict(gate_diag.get(site.name, {}))
        if opts.probe_accuracy:
            diag["probe_accuracy"] = probe_accuracy(
                acts_s[site.name]["mean"], acts_t[site.name]["mean"],
                cv_folds=dsas_opts.cv_folds, seed=dsas_opts.seed,
            )
        entries.append(SiteSteering(site, steering_map, gates[site.name], scales[site.name], diag))

    # end to end: LinEAS maps and/or E2E gates, trained through the frozen model
    if end_to_end or opts.gate == "e2e":
        fit_info["training"] = train_end_to_end(
            model, tokenizer, entries, source, {n: a["mean"] for n, a in acts_t.items()},
            control, opts.lineas, max_length=opts.max_length, progress=progress,
        )
        for e in entries:
            if hasattr(e.map, "active_dims"):
                e.diagnostics["active_dims"] = e.map.active_dims()
            if isinstance(e.gate, E2EGate):
                s_pool, c_pool = acts_s[e.site.name]["mean"], acts_c[e.site.name]["mean"]
                with torch.no_grad():
                    e.diagnostics["gate_mean_source"] = float(e.gate(s_pool, StepContext()).mean())
                    e.diagnostics["gate_mean_control"] = float(e.gate(c_pool, StepContext()).mean())
    for e in entries:
        s_map = acts_s[e.site.name][map_pool]
        with torch.no_grad():
            e.diagnostics["source_norm"] = float(s_map.norm(dim=1).mean())
            e.diagnostics["delta_norm"] = float(e.map.delta(s_map.mean(0)).norm())

    if opts.gate == "cast":
        steered_condition = any(
            isinstance(e.gate, CASTGate) and e.gate.role == "condition" for e in entries
        )
        if not steered_condition:  # the condition site is not steered: an identity map carries it
            site = extra_sites[0]
            ident = map_cls.empty(site_width(model, site), maps[0].config())
            entries.append(SiteSteering(site, ident, gates[site.name], 1.0,
                                        {**gate_diag.get(site.name, {}), "condition_only": True}))
            entries.sort(key=lambda e: e.site.layer)
        fit_info["cast"] = {"condition_site": next(
            e.site.name for e in entries
            if isinstance(e.gate, CASTGate) and e.gate.role == "condition")}

    accs = [e.diagnostics["gate_accuracy"] for e in entries if "gate_accuracy" in e.diagnostics]
    if opts.gate in ("dsas", "dsas-adaptive") and accs and max(accs) < 0.6:
        msg = (
            f"all gate accuracies are near chance (max {max(accs):.2f}): DSAS cannot tell source "
            f"from control here and degrades to uniform ~half-strength steering"
        )
        warnings.warn(msg)
        fit_info["warning"] = msg
    if opts.gate in ("dsas", "dsas-adaptive") and accs and all(e.scale == 0.0 for e in entries):
        msg = f"no layer reached gate accuracy τ={dsas_opts.threshold}: nothing will be steered"
        warnings.warn(msg)
        fit_info["warning"] = msg
    return Recipe(
        model=ModelIdentity.of(model),
        entries=entries,
        method=opts.method,
        gate=opts.gate,
        default_strength=opts.default_strength,
        fit_info=fit_info,
    )


def _fit_gates(
    opts: FitOptions,
    dsas_opts: DSASOptions,
    sites: Sequence[Any],
    acts_s: dict[str, dict[str, Any]],
    acts_c: dict[str, dict[str, Any]] | None,
) -> tuple[dict[str, Gate], dict[str, float], dict[str, dict[str, Any]]]:
    """Gates, layer scales and gate diagnostics per site name (S vs C, mean-pooled)."""
    gates: dict[str, Gate] = {s.name: NoGate() for s in sites}
    scales = {s.name: 1.0 for s in sites}
    diag: dict[str, dict[str, Any]] = {s.name: {} for s in sites}
    if opts.gate == "none" or acts_c is None:
        return gates, scales, diag
    if opts.gate == "cast":
        fits = {s.name: fit_condition(acts_s[s.name]["mean"], acts_c[s.name]["mean"], opts.cast)
                for s in sites}
        cond = choose_condition_site(fits, {s.name: s.layer for s in sites},
                                     opts.cast.condition_layer)
        best = fits[cond]
        for s in sites:
            diag[s.name] = {"gate_accuracy": fits[s.name].accuracy, "cast_f1": fits[s.name].f1}
            if s.name == cond:
                gates[s.name] = CASTGate(
                    "condition", vector=torch.from_numpy(best.vector).float(),
                    threshold=best.threshold, comparator=best.comparator, condition_site=cond,
                )
                diag[s.name]["cast_condition"] = True
            else:
                gates[s.name] = CASTGate("follow", condition_site=cond)
        return gates, scales, diag
    for s in sites:
        dsas_gate, acc = DSASGate.fit(acts_s[s.name]["mean"], acts_c[s.name]["mean"], dsas_opts)
        diag[s.name]["gate_accuracy"] = acc
        if opts.gate == "e2e":  # learned gates, started from the offline DSAS fit (or zero)
            init = opts.lineas.e2e_init == "dsas"
            gates[s.name] = E2EGate.init(
                int(dsas_gate.weight.numel()), opts.lineas.e2e_gate,
                dsas_gate.weight if init else None, dsas_gate.bias if init else None,
            )
            continue
        scale, constant = layer_scale(acc, dsas_opts)
        dsas_gate.constant = constant
        gates[s.name], scales[s.name] = dsas_gate, scale
    return gates, scales, diag
