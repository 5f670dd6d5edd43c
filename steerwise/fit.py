"""Fit a steering from example texts: activations → maps (how) and gates (when) → Recipe.

Sets (ALGORITHMS.md notation): ``source`` S = behaviour to remove or the context to act in,
``target`` T = the behaviour to move towards, ``control`` C = neutral text steering must leave
alone. Maps are fitted S → T; DSAS gates S (label 1) vs C (label 0). When no target set is
given, the control set serves as the target (the usual toxicity set-up: toxic → neutral).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .activations import collect_activations
from .gates.base import Gate, NoGate
from .gates.dsas import DSASGate, DSASOptions, check_two_class, layer_scale
from .hooks import SiteSteering
from .maps.base import MAP_REGISTRY
from .recipe import ModelIdentity, Recipe
from .sites import resolve_sites

GATES = ("none", "dsas", "dsas-adaptive")


@dataclass
class FitOptions:
    """How to fit. ``map_options`` are passed to the map's ``fit`` (method-specific)."""

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
        check_two_class(len(source), len(control or []), dsas_opts.cv_folds)

    sites = resolve_sites(model, opts.site, opts.layers)
    map_pool = opts.pooling
    poolings = sorted({map_pool, "mean"})
    model_was_training = model.training
    model.eval()
    try:
        kw = dict(sites=sites, batch_size=opts.batch_size, max_length=opts.max_length,
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

    map_cls = MAP_REGISTRY[opts.method]
    entries = []
    for site in sites:
        s_map, t_map = acts_s[site.name][map_pool], acts_t[site.name][map_pool]
        steering_map = map_cls.fit(s_map, t_map, **opts.map_options)
        diag: dict[str, Any] = {
            "source_norm": float(s_map.norm(dim=1).mean()),
            "delta_norm": float(steering_map.delta(s_map.mean(0)).norm()),
        }
        gate: Gate = NoGate()
        scale = 1.0
        if opts.gate != "none" and acts_c is not None:
            gate, acc = DSASGate.fit(acts_s[site.name]["mean"], acts_c[site.name]["mean"], dsas_opts)
            scale, constant = layer_scale(acc, dsas_opts)
            gate.constant = constant
            diag["gate_accuracy"] = acc
        entries.append(SiteSteering(site, steering_map, gate, scale, diag))

    accs = [e.diagnostics["gate_accuracy"] for e in entries if "gate_accuracy" in e.diagnostics]
    fit_info: dict[str, Any] = {
        "n_source": len(source),
        "n_target": len(target),
        "n_control": len(control) if control is not None else 0,
        "target_is_control": target is control,
        "options": opts.to_json(),
    }
    if accs and max(accs) < 0.6:
        msg = (
            f"all gate accuracies are near chance (max {max(accs):.2f}): DSAS cannot tell source "
            f"from control here and degrades to uniform ~half-strength steering"
        )
        warnings.warn(msg)
        fit_info["warning"] = msg
    if accs and all(e.scale == 0.0 for e in entries):
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

