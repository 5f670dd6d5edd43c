"""Fit a steering from example texts: activations → maps (how) and gates (when) → Recipe.

Sets (docs/algorithms.md notation): ``source`` S = behaviour to remove or the context to act in,
``target`` T = the behaviour to move towards, ``control`` C = neutral text steering must leave
alone. Maps are fitted S → T; DSAS gates S (label 1) vs C (label 0). When no target set is
given, the control set serves as the target (the usual toxicity set-up: toxic → neutral).

Every map combines with every gate. ``fit`` is a short pipeline: collect pooled activations,
fit the maps (each map class owns its ``fit``), fit the gates (each gate kind owns a
``GateFitter``, ``steerwise.gates.base``), train end to end when the map (LinEAS) or the gate
(E2E-DSAS) is learned through the frozen model (``steerwise.maps.lineas.train_end_to_end``),
let the gate kind finish (CAST's condition site), and diagnose. Each site's diagnostics report the gate's held-out
accuracy (S vs C) and a probe's held-out accuracy (S vs T), so a user sees where the signal is.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import TOKEN_TEXT, collect_activations
from .gates import GATE_FITTERS
from .gates.base import GateFit, GateFitter, Pooled
from .gates.cast import CASTOptions
from .gates.dsas import DSASGate, DSASOptions, calibrate_gate, check_two_class
from .hooks import SiteSteering
from .maps.base import MAP_REGISTRY, SteeringMap
from .maps.iti import num_attention_heads, probe_accuracy
from .maps.lineas import LinEASOptions, train_end_to_end
from .recipe import ModelIdentity, Recipe
from .sites import Site, resolve_sites, site_width

GATES = tuple(GATE_FITTERS)  # every registered gate kind: none, dsas, dsas-adaptive, cast, e2e


@dataclass
class FitOptions:
    """How to fit. ``map_options`` are passed to the map's ``fit`` (method-specific), e.g.
    ``top_k_heads`` (ITI per head), ``support`` / ``support_quantiles`` (AcT).
    ``lineas``: end-to-end training (LinEAS maps, E2E gates); ``cast``: the CAST gate;
    ``probe_accuracy``: report a probe's held-out S-vs-T accuracy per site; ``chat``: render
    every text with the tokenizer's chat template as a ``user`` or ``assistant`` message
    (``steerwise.chat``); ``sink_free``: keep each text's first real token, the attention
    sink, out of every statistic the fit computes (``steerwise.activations``; default)."""

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
    chat: str | None = None
    # leave each text's first real token (the attention sink) out of every fitted statistic;
    # False reproduces the statistics of recipes fitted before (for comparisons)
    sink_free: bool = True

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
    opts = _options(options, overrides)
    map_cls = MAP_REGISTRY[opts.method]
    gating = GATE_FITTERS[opts.gate]
    source, control, target = _check_sets(opts, gating, source, control, target)
    if opts.chat is not None:
        source, control, target = _render_chat(tokenizer, opts.chat, source, control, target)
    end_to_end = bool(getattr(map_cls, "end_to_end", False)) or gating.trains_end_to_end
    if end_to_end:
        opts.lineas.check()

    sites = resolve_sites(model, opts.site, opts.layers)
    extra_sites = gating.extra_sites(model, sites, opts)
    acts_s, acts_t, acts_c = _collect(model, tokenizer, opts, sites + extra_sites,
                                      source, target, control, progress)
    fit_info: dict[str, Any] = {
        "n_source": len(source),
        "n_target": len(target),
        "n_control": len(control) if control is not None else 0,
        "target_is_control": target is control,
        "options": opts.to_json(),
        "statistics": {"first_token": "excluded" if opts.sink_free else "included"},
    }
    maps = _fit_maps(model, opts, map_cls, sites, acts_s, acts_t, fit_info)
    fitted = gating.fit(sites + extra_sites, acts_s, gate_negatives(acts_c, acts_t, opts), opts)
    if opts.dsas.calibrate is not None and not gating.trains_end_to_end:
        negatives = control if opts.dsas.negatives == "control" or target is control else (
            (control or []) + target)
        _calibrate(model, tokenizer, opts, sites, fitted, source, negatives, progress)
    entries = [
        SiteSteering(site, m, fitted.gates[site.name], fitted.scales[site.name],
                     dict(fitted.diagnostics.get(site.name, {})))
        for site, m in zip(sites, maps)
    ]
    if end_to_end:
        fit_info["training"] = train_end_to_end(
            model, tokenizer, entries, source, {n: a["mean"] for n, a in acts_t.items()},
            control, opts.lineas, max_length=opts.max_length, progress=progress,
            sink_free=opts.sink_free,
        )
    entries = gating.finish(entries, fitted, acts_s, acts_c, {
        "model": model, "map_cls": map_cls, "extra_sites": extra_sites, "fit_info": fit_info})
    _diagnose(entries, opts, acts_s, acts_t)
    for msg in gating.warnings(entries, opts):
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


def _options(options: FitOptions | None, overrides: dict[str, Any]) -> FitOptions:
    opts = options or FitOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown fit option {key!r}")
        setattr(opts, key, value)
    if opts.method not in MAP_REGISTRY:
        raise ValueError(
            f"unknown method {opts.method!r}; known: {', '.join(sorted(MAP_REGISTRY))}"
        )
    if opts.gate not in GATE_FITTERS:
        raise ValueError(f"unknown gate {opts.gate!r}; known: {', '.join(GATE_FITTERS)}")
    return opts


def _check_sets(
    opts: FitOptions, gating: GateFitter, source: Sequence[str],
    control: Sequence[str] | None, target: Sequence[str] | None,
) -> tuple[list[str], list[str] | None, list[str]]:
    """The three sets, checked; the control set serves as target when no target is given."""
    s = _check_texts("source", source)
    c = _check_texts("control", control)
    t = _check_texts("target", target)
    if t is None:
        if c is None:
            raise ValueError("give a target set (or a control set, used as target when no target)")
        t = c
    if gating.needs_control:
        if c is None:
            raise ValueError(f"gate {opts.gate!r} needs a control set (texts not to steer)")
        check_two_class(len(s), len(c), gating.cv_folds(opts))  # type: ignore[arg-type]
    return s, c, t  # type: ignore[return-value]


def _render_chat(
    tokenizer, role: str, source: list[str], control: list[str] | None, target: list[str],
) -> tuple[list[str], list[str] | None, list[str]]:
    """The sets rendered with the chat template, each distinct list once (so a target that is
    the control set stays the same object)."""
    from .chat import format_chat

    rendered = {id(x): format_chat(tokenizer, x, role) for x in (source, control, target)
                if x is not None}
    return (rendered[id(source)], rendered[id(control)] if control is not None else None,
            rendered[id(target)])


def _collect(
    model: nn.Module, tokenizer, opts: FitOptions, sites: list[Site], source: list[str],
    target: list[str], control: list[str] | None, progress: bool,
) -> tuple[Pooled, Pooled, Pooled | None]:
    """Pooled activations of S, T and C at every site (each set collected once)."""
    poolings = {opts.pooling, "mean"} | ({"tokens"} if opts.dsas.needs_tokens else set())
    with _eval_mode(model):
        kw = dict(sites=sites, batch_size=opts.batch_size, max_length=opts.max_length,
                  progress=progress, pooling=sorted(poolings), sink_free=opts.sink_free)
        acts_s = collect_activations(model, tokenizer, source, desc="source", **kw)
        acts_t = collect_activations(model, tokenizer, target, **kw,
                                     desc="control" if target is control else "target")
        if target is control:
            acts_c = acts_t
        elif control is not None:
            acts_c = collect_activations(model, tokenizer, control, desc="control", **kw)
        else:
            acts_c = None
    return acts_s, acts_t, acts_c


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _calibrate(model: nn.Module, tokenizer, opts: FitOptions, sites: list[Site], fitted: GateFit,
               source: list[str], negatives: list[str] | None, progress: bool) -> None:
    """``dsas.calibrate``: a second pass over the source and negative texts keeps each DSAS
    gate's logit per token (not the activations: memory O(tokens · sites)), then rescales the
    gate (``steerwise.gates.dsas.calibrate_gate``); the shares reached go to the diagnostics."""
    gates = {s.name: fitted.gates[s.name] for s in sites
             if isinstance(fitted.gates.get(s.name), DSASGate) and not fitted.gates[s.name].constant}
    if not gates or not negatives:
        return
    project = {name: g.weight.detach().reshape(-1, 1) for name, g in gates.items()}
    chosen = [s for s in sites if s.name in gates]
    with _eval_mode(model):
        kw = dict(sites=chosen, batch_size=opts.batch_size, max_length=opts.max_length,
                  progress=progress, pooling=("tokens",), project=project,
                  sink_free=opts.sink_free)
        z_s = collect_activations(model, tokenizer, source, desc="calibration: source", **kw)
        z_n = collect_activations(model, tokenizer, negatives, desc="calibration: negatives",
                                  **kw)
    for name, gate in gates.items():
        bias = gate.bias.detach()
        fitted.diagnostics.setdefault(name, {}).update(calibrate_gate(
            gate, z_s[name]["tokens"].flatten() + bias, z_n[name]["tokens"].flatten() + bias,
            opts.dsas.calibrate, opts.dsas.calibrate_eps))  # type: ignore[arg-type]


def gate_negatives(acts_c: Pooled | None, acts_t: Pooled, opts: FitOptions) -> Pooled | None:
    """What a gate learns to keep shut: the control set, or control ∪ target
    (``dsas.negatives = "control+target"``, the contrastive gate; a target that is the control
    set is not counted twice). Token rows keep their text index, numbered apart per set."""
    if opts.dsas.negatives == "control" or acts_c is None or acts_c is acts_t:
        return acts_c
    out: Pooled = {}
    for name, pools in acts_c.items():
        joined = {k: torch.cat([v, acts_t[name][k]]) for k, v in pools.items() if k != TOKEN_TEXT}
        if TOKEN_TEXT in pools:
            offset = pools[TOKEN_TEXT].max() + 1
            joined[TOKEN_TEXT] = torch.cat([pools[TOKEN_TEXT], acts_t[name][TOKEN_TEXT] + offset])
        out[name] = joined
    return out


def _fit_maps(
    model: nn.Module, opts: FitOptions, map_cls: type[SteeringMap], sites: list[Site],
    acts_s: Pooled, acts_t: Pooled, fit_info: dict[str, Any],
) -> list[SteeringMap]:
    """One map per site: offline maps fitted S → T; end-to-end maps start at the identity."""
    kwargs = dict(opts.map_options)
    if opts.site == "heads" and "n_heads" in inspect.signature(map_cls.fit).parameters:
        kwargs.setdefault("n_heads", num_attention_heads(model))
    if getattr(map_cls, "end_to_end", False):
        return [map_cls.empty(site_width(model, s), dict(opts.map_options)) for s in sites]
    pool = opts.pooling
    maps = [map_cls.fit(acts_s[s.name][pool], acts_t[s.name][pool], **kwargs) for s in sites]
    finalize = getattr(map_cls, "finalize", None)
    if callable(finalize):
        summary = finalize(maps, **kwargs)
        if summary:
            fit_info["map"] = summary
    return maps


def _diagnose(entries: list[SiteSteering], opts: FitOptions, acts_s: Pooled,
              acts_t: Pooled) -> None:
    """Per site: probe accuracy (S vs T), active dims (LinEAS), activation and steering norms."""
    for e in entries:
        s_pool, s_map = acts_s[e.site.name]["mean"], acts_s[e.site.name][opts.pooling]
        if opts.probe_accuracy and "probe_accuracy" not in e.diagnostics:
            e.diagnostics["probe_accuracy"] = probe_accuracy(
                s_pool, acts_t[e.site.name]["mean"], cv_folds=opts.dsas.cv_folds,
                seed=opts.dsas.seed,
            )
        if hasattr(e.map, "active_dims"):
            e.diagnostics["active_dims"] = e.map.active_dims()
        with torch.no_grad():
            e.diagnostics["source_norm"] = float(s_map.norm(dim=1).mean())
            e.diagnostics["delta_norm"] = float(e.map.delta(s_map.mean(0)).norm())
