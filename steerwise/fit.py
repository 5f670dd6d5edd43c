"""Fit a steering from example texts: activations → maps (how) and gates (when) → Recipe.

Sets (docs/algorithms.md notation): ``source`` S = behaviour to remove or the context to act in,
``target`` T = the behaviour to move towards, ``control`` C = neutral text steering must leave
alone. Maps are fitted S → T; DSAS gates S (label 1) vs C (label 0). When no target set is
given, the control set serves as the target (the usual toxicity set-up: toxic → neutral).

Every map combines with every gate. ``fit`` is a short pipeline that only calls what the base
classes declare (``SteeringMap``, ``GateFitter``): collect pooled activations, fit the maps
(each map class owns its ``fit`` and ``finalize``), fit the gates (each gate kind owns a
``GateFitter``) and let the kind calibrate them, train end to end when the map (LinEAS) or the
gate (E2E-DSAS) is learned through the frozen model (``train``: ``steerwise.training``), let the
gate kind finish (CAST's condition site), and diagnose. Each site's diagnostics report the
gate's held-out accuracy (S vs C) and a probe's held-out accuracy (S vs T), so a user sees
where the signal is.

Options: ``FitOptions`` and the option dataclasses it holds declare every option once (type,
default, help, CLI flag: ``steerwise.options``); ``map_options`` is a dict checked against the
map's ``Options`` (an unknown key names the closest known one).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .activations import TOKEN_TEXT, collect_activations
from .chat import CHAT_ROLES
from .gates import GATE_FITTERS, gate_kinds
from .gates.base import GateFitter, Pooled
from .gates.cast import CASTOptions
from .gates.dsas import DSASOptions, check_two_class
from .gates.e2e import E2EOptions
from .hooks import SiteSteering
from .maps.base import MAP_REGISTRY, SteeringMap
from .maps.iti import probe_accuracy
from .maps.lineas import LinEASOptions
from .options import (
    Options,
    check_keys,
    int_at_least,
    open_unit_interval,
    option,
    positive_float,
    positive_int,
    unknown_key_error,
)
from .positions import DEFAULT_FIRST_TOKEN, FIRST_TOKEN_CHOICES, check_first_token
from .recipe import ModelIdentity, Recipe
from .sites import Site, resolve_sites, site_width
from .strength import (
    AUTO,
    check_default_strength,
    check_search_options,
    median_token_norms,
    search_strength,
    split_held_out,
    strength_value,
)

GATES = gate_kinds()  # the gate kinds registered by steerwise itself: none first, then by name

# E2E options that lived in ``lineas`` before they moved to ``e2e`` (still read from dicts:
# sweep specs, ``FitOptions.updated``): old key → new key
LEGACY_LINEAS_KEYS = {"e2e_gate": "activation", "e2e_init": "init", "gamma": "gamma"}


@dataclass
class FitOptions(Options):
    """How to fit. ``map_options`` are the map's options (its ``Options`` dataclass, given as
    a dict), e.g. ``top_k_heads`` (ITI per head), ``support`` / ``support_quantiles`` (AcT).
    Each gate kind reads its own section: ``dsas`` (DSAS, and the start of E2E gates),
    ``cast``, ``e2e``; ``gate_options`` (a dict) holds the options of a kind without a section.
    ``lineas``: end-to-end training (LinEAS maps, E2E gates); ``probe_accuracy``: report a
    probe's held-out S-vs-T accuracy per site; ``chat``: render every text with the tokenizer's
    chat template as a ``user`` or ``assistant`` message (``steerwise.chat``); ``first_token``: the
    recipe's position policy, whether the first real token of each sequence is steered
    (``"steer"``) or left alone (``"skip"``) (``steerwise.positions``); ``sink_free``: keep each
    text's first real token, the attention sink, out of every statistic the fit computes
    (``steerwise.activations``; default); ``default_strength``: a number, or ``"auto"``: held out
    ``strength_holdout`` of the target and control texts (or read ``fit``'s ``strength_texts``)
    and store the largest λ whose perplexity on them stays within ``strength_budget`` of the
    unsteered one (``steerwise.strength``)."""

    method: str = option("caa", "how to steer: the map fitted per site (docs/methods.md)",
                         cli=False)
    gate: str = option("dsas", "when to steer: the per-token gate (none = uniform steering)",
                       cli=False)
    site: str = option("residual",
                       "residual | attn | mlp | heads | re:<module-regex>[:i] | re-in:<regex>")
    layers: str | int | Sequence[int] | None = option(
        None, "all (default), a range '2-5' or a list '1,3'")
    pooling: str = option("mean", "how a text's token activations become one example",
                          choices=("mean", "last"))
    batch_size: int = option(16, "texts per forward pass while collecting activations",
                             type=positive_int)
    max_length: int | None = option(None, "tokens per text at most (default: the model's)",
                                    cli=False)
    default_strength: float | str = option(
        "auto", "a number, or 'auto' (the largest λ whose perplexity on held-out target and "
        "control texts stays within --strength-budget of the unsteered one; docs/algorithms.md, "
        "'Default strength'): the default strength saved in the recipe",
        flag="--strength", type=strength_value, metavar="{NUMBER,auto}")
    strength_budget: float = option(
        0.05, "with --strength auto: the allowed relative rise of the held-out perplexity "
        "(0.05 = +5 %%)", type=positive_float)
    strength_holdout: float = option(
        0.25, "with --strength auto: the share of the target and of the control texts held out "
        "of the fit to choose the strength on", type=open_unit_interval)
    strength_max: float = option(64.0, "with --strength auto: the largest λ searched",
                                 type=positive_float)
    strength_evals: int = option(
        10, "with --strength auto: steered perplexity evaluations at most (besides the "
        "unsteered one)", type=int_at_least(2))
    dsas: DSASOptions = option(default_factory=DSASOptions, cli=False)
    map_options: dict[str, Any] = option(default_factory=dict, cli=False)
    lineas: LinEASOptions = option(default_factory=LinEASOptions, cli=False)
    cast: CASTOptions = option(default_factory=CASTOptions, cli=False)
    e2e: E2EOptions = option(default_factory=E2EOptions, cli=False)
    gate_options: dict[str, Any] = option(default_factory=dict, cli=False)
    probe_accuracy: bool = option(True, "report a probe's held-out S-vs-T accuracy per site",
                                  cli=False)
    chat: str | None = option(
        None, "render texts with the tokenizer's chat template as user / assistant messages "
              "(instruct models)", choices=CHAT_ROLES)
    first_token: str = option(
        DEFAULT_FIRST_TOKEN, "the recipe's position policy: steer the first real token of each "
        "sequence (the attention sink on many models) or leave it unsteered",
        choices=FIRST_TOKEN_CHOICES)
    sink_free: bool = option(
        True, "leave each text's first real token (the attention sink) out of every fitted "
        "statistic; --no-sink-free reproduces the statistics of recipes fitted before")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = self.layers if not isinstance(self.layers, Sequence) or isinstance(
            self.layers, str
        ) else list(self.layers)
        return out

    def updated(self, overrides: Mapping[str, Any], what: str = "fit option") -> FitOptions:
        """A copy with ``overrides`` set (``self`` is left as it is). A dict for a nested
        section (``dsas``, ``lineas``, ...) sets fields of it; the E2E keys that used to live in
        ``lineas`` (``e2e_gate``, ``e2e_init``, ``gamma``) go to ``e2e``; an unknown key raises
        ``ValueError`` naming the closest known one."""
        overrides = dict(overrides)
        lineas = overrides.get("lineas")
        if isinstance(lineas, Mapping) and any(k in LEGACY_LINEAS_KEYS for k in lineas):
            moved = {LEGACY_LINEAS_KEYS[k]: v for k, v in lineas.items() if k in LEGACY_LINEAS_KEYS}
            overrides["lineas"] = {k: v for k, v in lineas.items() if k not in LEGACY_LINEAS_KEYS}
            overrides["e2e"] = {**moved, **dict(overrides.get("e2e") or {})}
        check_keys(overrides, self.field_names(), what)
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            current = getattr(self, key)
            if isinstance(current, Options) and isinstance(value, Mapping):
                check_keys(value, current.field_names(), f"{what} {key}.")
                value = dataclasses.replace(current, **value)
            values[key] = copy.deepcopy(value)
        return dataclasses.replace(copy.deepcopy(self), **values)


@dataclass
class FitContext:
    """What a gate kind's (and an end-to-end map's) fit steps may use besides the activations:
    the model, the texts, the options, and ``collect`` (a further pass over some texts)."""

    model: nn.Module
    tokenizer: Any
    options: FitOptions
    sites: list[Site]
    extra_sites: list[Site]
    map_cls: type[SteeringMap]
    source: list[str]
    control: list[str] | None
    target: list[str]
    acts_t: Pooled
    fit_info: dict[str, Any]
    progress: bool = True

    def collect(self, sites: Sequence[Site], texts: Sequence[str], desc: str,
                **kwargs: Any) -> Pooled:
        """``collect_activations`` over ``texts`` at ``sites`` with the fit's batch size, length
        and statistics (``sink_free``), the model in eval mode (keyword arguments: ``pooling``,
        ``project``, ...)."""
        opts = self.options
        with _eval_mode(self.model):
            return collect_activations(self.model, self.tokenizer, list(texts), sites=list(sites),
                                       batch_size=opts.batch_size, max_length=opts.max_length,
                                       progress=self.progress, desc=desc,
                                       sink_free=opts.sink_free, **kwargs)

    def negative_texts(self) -> list[str] | None:
        """What the gates learned to keep shut, as texts (``dsas.negatives``)."""
        if self.options.dsas.negatives == "control" or self.target is self.control:
            return self.control
        return (self.control or []) + self.target

    def target_means(self) -> dict[str, torch.Tensor]:
        """The mean-pooled target activations per site (end-to-end training's target)."""
        return {n: a["mean"] for n, a in self.acts_t.items()}


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
    strength_texts: Sequence[str] | None = None,
    **overrides: Any,
) -> Recipe:
    """Fit a steering recipe. Keyword overrides set fields of ``FitOptions``.

    With ``default_strength="auto"`` the recipe's default strength is chosen on held-out benign
    texts: ``strength_texts`` when given, else a ``strength_holdout`` share of the target and of
    the control texts, drawn with ``dsas.seed`` and kept out of the fit (``steerwise.strength``).

    Example: ``fit(model, tok, toxic, neutral, method="caa", gate="dsas", layers="1-4")``.
    """
    opts = _options(options, overrides)
    map_cls = MAP_REGISTRY[opts.method]
    gating = GATE_FITTERS[opts.gate]
    map_opts = map_cls.options(opts.map_options)
    gating.options(opts)  # checked before any activation is collected
    source, control, target = _check_sets(opts, gating, source, control, target)
    held_out, held_out_from = None, None
    if opts.default_strength == AUTO:
        source, control, target, held_out, held_out_from = _hold_out(
            opts, gating, source, control, target, strength_texts)
    elif strength_texts is not None:
        raise ValueError("strength_texts are read only with default_strength='auto'")
    if opts.chat is not None:
        source, control, target = _render_chat(tokenizer, opts.chat, source, control, target)
        if held_out is not None:
            from .chat import format_chat

            held_out = format_chat(tokenizer, held_out, opts.chat)
    end_to_end = map_cls.end_to_end or gating.trains_end_to_end
    if end_to_end:
        opts.lineas.check()

    sites = resolve_sites(model, opts.site, opts.layers)
    extra_sites = gating.extra_sites(model, sites, opts)
    acts_s, acts_t, acts_c = _collect(model, tokenizer, opts, gating, sites + extra_sites,
                                      source, target, control, progress)
    fit_info: dict[str, Any] = {
        "n_source": len(source),
        "n_target": len(target),
        "n_control": len(control) if control is not None else 0,
        "target_is_control": target is control,
        "options": opts.to_json(),
        "statistics": {"first_token": "excluded" if opts.sink_free else "included"},
    }
    ctx = FitContext(model, tokenizer, opts, sites, extra_sites, map_cls, source, control, target,
                     acts_t, fit_info, progress)
    maps = _fit_maps(model, opts, map_cls, map_opts, sites, acts_s, acts_t, fit_info)
    fitted = gating.fit(sites + extra_sites, acts_s, gate_negatives(acts_c, acts_t, opts), opts)
    if not gating.trains_end_to_end:
        gating.calibrate(ctx, fitted)
    entries = [
        SiteSteering(site, m, fitted.gates[site.name], fitted.scales[site.name],
                     dict(fitted.diagnostics.get(site.name, {})))
        for site, m in zip(sites, maps)
    ]
    if end_to_end:
        trainer = gating if gating.trains_end_to_end else map_cls
        fit_info["training"] = trainer.train(ctx, entries)
    entries = gating.finish(entries, fitted, acts_s, acts_c, ctx)
    _diagnose(entries, opts, acts_s, acts_t)
    norms = median_token_norms(model, tokenizer, source, [e.site for e in entries],
                               batch_size=opts.batch_size, max_length=opts.max_length,
                               sink_free=opts.sink_free)
    for e in entries:
        e.diagnostics["token_norm_median"] = norms[e.site.name]
    for msg in gating.warnings(entries, opts):
        warnings.warn(msg)
        fit_info["warning"] = msg
    recipe = Recipe(
        model=ModelIdentity.of(model),
        entries=entries,
        method=opts.method,
        gate=opts.gate,
        default_strength=1.0 if held_out is not None else float(opts.default_strength),
        fit_info=fit_info,
        first_token=opts.first_token,
    )
    if held_out is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            search = search_strength(
                model, tokenizer, recipe, held_out, budget=opts.strength_budget,
                strength_max=opts.strength_max, evals=opts.strength_evals,
                batch_size=opts.batch_size, max_length=opts.max_length, progress=progress)
        for w in caught:
            warnings.warn(w.message)
            fit_info["warning"] = str(w.message)
        recipe.default_strength = search.strength
        fit_info["strength"] = {**search.to_json(), "held_out": held_out_from}
    return recipe


def _hold_out(
    opts: FitOptions, gating: GateFitter, source: list[str], control: list[str] | None,
    target: list[str], strength_texts: Sequence[str] | None,
) -> tuple[list[str], list[str] | None, list[str], list[str], str]:
    """The sets to fit on, the held-out texts the default strength is chosen on, and where
    these come from: ``strength_texts`` as given, else a ``strength_holdout`` share of the
    target and of the control texts (a target that is the control set is split once)."""
    if strength_texts is not None:
        given = _check_texts("strength_texts", strength_texts)
        return source, control, target, given, f"{len(given)} strength_texts"  # type: ignore
    share, seed = opts.strength_holdout, opts.dsas.seed
    target_is_control = target is control
    held: list[str] = []
    parts = []
    if not target_is_control:
        target, held_t = split_held_out(target, share, seed + 1, "target")
        held += held_t
        parts.append(f"{len(held_t)} target")
    if control is not None:
        control, held_c = split_held_out(control, share, seed, "control")
        held += held_c
        parts.append(f"{len(held_c)} control")
    if target_is_control:
        target = control  # type: ignore[assignment]
    try:
        source, control, target = _check_sets(opts, gating, source, control,
                                              None if target is control else target)
    except ValueError as exc:
        raise ValueError(f"{exc}; {' and '.join(parts)} texts were held out of it to choose the "
                         f"default strength (--strength auto, the default): give more texts, a "
                         f"smaller --strength-holdout, or a number for --strength") from None
    return source, control, target, held, (
        " and ".join(parts) + f" texts held out of the fit (strength_holdout {share:g}, "
        f"seed {seed})")


def _options(options: FitOptions | None, overrides: dict[str, Any]) -> FitOptions:
    """The options of one fit: a copy of ``options`` with ``overrides`` (the caller's object is
    never changed), the method and gate checked."""
    opts = options or FitOptions()
    for key in overrides:
        if key not in FitOptions.field_names():
            raise TypeError(str(unknown_key_error(key, FitOptions.field_names(), "fit option")))
    opts = opts.updated(overrides)
    if opts.method not in MAP_REGISTRY:
        raise ValueError(
            f"unknown method {opts.method!r}; known: {', '.join(sorted(MAP_REGISTRY))}"
        )
    if opts.gate not in GATE_FITTERS:
        raise ValueError(f"unknown gate {opts.gate!r}; known: {', '.join(GATE_FITTERS)}")
    check_first_token(opts.first_token)
    opts.default_strength = check_default_strength(opts.default_strength)
    check_search_options(opts.strength_budget, opts.strength_holdout, opts.strength_max,
                         opts.strength_evals)
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
    model: nn.Module, tokenizer, opts: FitOptions, gating: GateFitter, sites: list[Site],
    source: list[str], target: list[str], control: list[str] | None, progress: bool,
) -> tuple[Pooled, Pooled, Pooled | None]:
    """Pooled activations of S, T and C at every site (each set collected once)."""
    poolings = {opts.pooling, "mean"} | gating.poolings(opts)
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
    model: nn.Module, opts: FitOptions, map_cls: type[SteeringMap], map_opts: Any,
    sites: list[Site], acts_s: Pooled, acts_t: Pooled, fit_info: dict[str, Any],
) -> list[SteeringMap]:
    """One map per site: offline maps fitted S → T; end-to-end maps start at the identity."""
    if map_cls.end_to_end:
        return [map_cls.empty(site_width(model, s), dict(opts.map_options)) for s in sites]
    map_opts = map_cls.adapt_options(map_opts, model, opts.site)
    pool = opts.pooling
    maps = [map_cls.fit(acts_s[s.name][pool], acts_t[s.name][pool], map_opts) for s in sites]
    summary = map_cls.finalize(maps, map_opts)
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
        active = e.map.active_dims()
        if active is not None:
            e.diagnostics["active_dims"] = active
        with torch.no_grad():
            e.diagnostics["source_norm"] = float(s_map.norm(dim=1).mean())
            e.diagnostics["delta_norm"] = float(e.map.delta(s_map.mean(0)).norm())
