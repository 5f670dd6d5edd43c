"""Fit a diffusion steering from prompts: pooled denoiser activations → maps and gates → Recipe.

Three prompt sets, as in the DSAS paper's diffusion experiment (docs/algorithms.md §4):

* ``source`` S — prompts with the concept the steering should act on ("a photo of a banana");
* ``control`` C — prompts without it ("a photo of a car"): the gates learn S (1) vs C (0);
* ``target`` T — prompts in the style to steer toward ("a blurry photo of a banana").

The map (CAA by default: ``v = mean(T) − mean(S ∪ C)``) and the DSAS gate of each site and
timestep bucket are fitted with the same code as for language models (``MAP_REGISTRY[...].fit``,
``DSASGate.fit``, ``layer_scale``). **[choice]** ``map_from="source+control"`` (default) fits the
map from S ∪ C to T, so with T = the same subjects in the target style, the vector is the style
alone; ``map_from="source"`` is the language-model convention S → T.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..gates.base import Gate, NoGate
from ..gates.dsas import DSASGate, DSASOptions, check_two_class, layer_scale
from ..hooks import SiteSteering
from ..maps.base import MAP_REGISTRY
from ..recipe import ModelIdentity, Recipe
from ..sites import Site
from .collect import Rows, bucket_edges, collect_diffusion_activations
from .sites import denoiser_of, resolve_diffusion_sites

DIFFUSION_GATES = ("none", "dsas", "dsas-adaptive")


@dataclass
class DiffusionFitOptions:
    """How to fit a diffusion recipe (see the module docstring for the sets).

    ``num_inference_steps``: denoising steps per prompt during collection (few are enough);
    ``timestep_buckets``: fit one map and gate per group of noise levels (1 = one for all steps;
    recipes with more buckets must be applied through ``steerwise.diffusion``);
    ``rows``: which half of a classifier-free-guidance batch to collect (``"cond"``: the prompt's
    own rows; ``"all"``: both halves, as separate examples);
    ``same_noise``: start every prompt from the same noise (seed), so the sets differ only by
    their prompts; by default prompt i gets seed ``seed + i``.
    """

    method: str = "caa"
    gate: str = "dsas"
    site: str = "attn"
    layers: str | int | Sequence[int] | None = None
    map_from: Literal["source+control", "source"] = "source+control"
    num_inference_steps: int = 10
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    timestep_buckets: int = 1
    batch_size: int = 4
    seed: int = 0
    rows: Rows = "cond"
    negative_prompt: str | None = None
    same_noise: bool = False
    default_strength: float = 1.0
    # calibration (a second pass over token activations) has no diffusion counterpart
    dsas: DSASOptions = field(default_factory=lambda: DSASOptions(calibrate=None))
    map_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(self.layers, Sequence) and not isinstance(self.layers, str):
            out["layers"] = list(self.layers)
        return out


def _prompts(name: str, prompts: Sequence[str] | None) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of prompts, not one string")
    out = list(prompts)
    if not out:
        raise ValueError(f"the {name} prompt set is empty")
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name} prompt #{i} is empty or not a string")
    return out


def _check(opts: DiffusionFitOptions) -> DSASOptions:
    offline = sorted(  # maps fitted from pooled activations (not end to end through the model)
        k for k, v in MAP_REGISTRY.items() if not v.end_to_end
    )
    if opts.method not in offline:
        raise ValueError(
            f"method {opts.method!r} is unknown or trained end to end (not supported on diffusion "
            f"pipelines); use one of: {', '.join(offline)}"
        )
    MAP_REGISTRY[opts.method].options(opts.map_options)  # unknown keys: named before collecting
    if opts.gate not in DIFFUSION_GATES:
        raise ValueError(f"unknown gate {opts.gate!r}; known: {', '.join(DIFFUSION_GATES)}")
    if opts.map_from not in ("source+control", "source"):
        raise ValueError("map_from must be 'source+control' or 'source'")
    if opts.rows not in ("cond", "uncond", "all"):
        raise ValueError("rows must be 'cond', 'uncond' or 'all'")
    # gates of a pipeline are not calibrated: there is no token pass to calibrate them on
    dsas = {**asdict(opts.dsas), "calibrate": None}
    return DSASOptions(**{**dsas, "adaptive": True} if opts.gate == "dsas-adaptive" else dsas)


def fit_entry(
    site: Site,
    source: Tensor,
    target: Tensor,
    control: Tensor | None,
    options: DiffusionFitOptions,
) -> SiteSteering:
    """Map and gate of one site (one timestep bucket) from pooled (n, d) activations."""
    dsas_opts = _check(options)
    map_source = source
    if options.map_from == "source+control" and control is not None:
        map_source = torch.cat([source, control])
    steering_map = MAP_REGISTRY[options.method].fit(map_source, target, **options.map_options)
    diag: dict[str, Any] = {
        "source_norm": float(source.norm(dim=1).mean()),
        "delta_norm": float(steering_map.delta(map_source.mean(0)).norm()),
    }
    gate: Gate = NoGate()
    scale = 1.0
    if options.gate != "none":
        if control is None:
            raise ValueError(f"gate {options.gate!r} needs control prompts (without the concept)")
        gate, acc = DSASGate.fit(source, control, dsas_opts)
        scale, constant = layer_scale(acc, dsas_opts)
        gate.constant = constant
        diag["gate_accuracy"] = acc
    return SiteSteering(site, steering_map, gate, scale, diag)


def fit_from_activations(
    identity: ModelIdentity,
    sites: Sequence[Site],
    source: dict[str, list[Tensor]],
    target: dict[str, list[Tensor]],
    control: dict[str, list[Tensor]] | None,
    options: DiffusionFitOptions | None = None,
    *,
    edges: Sequence[float] | None = None,
    fit_info: dict[str, Any] | None = None,
) -> Recipe:
    """A diffusion recipe from pooled activations ``acts[site][bucket]`` of shape (n, d).

    One entry per (site, bucket); with several buckets entries are named ``<site>@t<b>`` and
    ``fit_info["diffusion"]["entry_buckets"]`` says which bucket each entry belongs to.
    """
    opts = options or DiffusionFitOptions()
    _check(opts)
    n_buckets = len(next(iter(source.values())))
    edges = list(edges) if edges is not None else bucket_edges([1.0], 1)
    if len(edges) != n_buckets + 1:
        raise ValueError(f"{n_buckets} buckets need {n_buckets + 1} edges, got {len(edges)}")
    entries, entry_buckets = [], []
    for site in sites:
        for b in range(n_buckets):
            named = site if n_buckets == 1 else Site(**{**site.to_json(), "name": f"{site.name}@t{b}"})
            c = control[site.name][b] if control is not None else None
            entry = fit_entry(named, source[site.name][b], target[site.name][b], c, opts)
            if n_buckets > 1:
                entry.diagnostics["timestep_bucket"] = [edges[b], edges[b + 1]]
            entries.append(entry)
            entry_buckets.append(b)
    info = dict(fit_info or {})
    diffusion = dict(info.get("diffusion", {}))
    diffusion.update(timestep_buckets=list(edges), entry_buckets=entry_buckets)
    info["diffusion"] = diffusion
    info["options"] = opts.to_json()
    accs = [e.diagnostics["gate_accuracy"] for e in entries if "gate_accuracy" in e.diagnostics]
    if accs and max(accs) < 0.6:
        msg = (f"all gate accuracies are near chance (max {max(accs):.2f}): DSAS cannot tell the "
               f"concept prompts from the control prompts and degrades to ~half-strength steering")
        warnings.warn(msg)
        info["warning"] = msg
    if accs and all(e.scale == 0.0 for e in entries):
        msg = f"no block reached gate accuracy τ={opts.dsas.threshold}: nothing will be steered"
        warnings.warn(msg)
        info["warning"] = msg
    return Recipe(
        model=identity, entries=entries, method=opts.method, gate=opts.gate,
        default_strength=opts.default_strength, fit_info=info,
    )


@contextmanager
def _progress_bar(denoiser: Any, calls: int, enabled: bool) -> Iterator[None]:
    """A progress bar over the denoiser's forward calls (one per denoising step and batch)."""
    bar = tqdm(total=calls, desc="collecting activations", unit="step", disable=not enabled,
               leave=False)

    def tick(*_: Any) -> None:
        bar.update(1)

    handle = denoiser.register_forward_pre_hook(tick)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def fit_diffusion(
    pipe: Any,
    source: Sequence[str],
    control: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    options: DiffusionFitOptions | None = None,
    *,
    progress: bool = False,
    **overrides: Any,
) -> Recipe:
    """Fit a steering recipe for ``pipe``'s denoiser from three prompt sets.

    Example: ``fit_diffusion(pipe, banana_prompts, other_prompts, blurry_prompts, layers="0-5")``.
    ``progress=True`` shows a bar over the denoising steps of the collection (the long part).
    """
    opts = options or DiffusionFitOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown diffusion fit option {key!r}")
        setattr(opts, key, value)
    dsas_opts = _check(opts)
    source = _prompts("source", source)
    control = _prompts("control", control)
    target = _prompts("target", target)
    if target is None:
        raise ValueError("give target prompts (the style to steer toward)")
    if opts.gate != "none":
        if control is None:
            raise ValueError(f"gate {opts.gate!r} needs control prompts (without the concept)")
        check_two_class(len(source), len(control), dsas_opts.cv_folds)
    denoiser = denoiser_of(pipe)
    sites = resolve_diffusion_sites(denoiser, opts.site, opts.layers)
    kw: dict[str, Any] = {
        "num_inference_steps": opts.num_inference_steps, "guidance_scale": opts.guidance_scale,
        "height": opts.height, "width": opts.width, "batch_size": opts.batch_size,
        "seed": opts.seed, "rows": opts.rows, "negative_prompt": opts.negative_prompt,
        "same_noise": opts.same_noise,
    }
    was_training = denoiser.training
    denoiser.eval()
    sets = [source, target] + ([control] if control else [])
    calls = opts.num_inference_steps * sum(-(-len(x) // opts.batch_size) for x in sets)
    try:
        with _progress_bar(denoiser, calls, progress):
            col_s = collect_diffusion_activations(pipe, source, sites, **kw)
            col_t = collect_diffusion_activations(pipe, target, sites, **kw)
            col_c = collect_diffusion_activations(pipe, control, sites, **kw) if control else None
    finally:
        denoiser.train(was_training)
    edges = bucket_edges(col_s.levels, opts.timestep_buckets)
    info = {
        "n_source": len(source), "n_target": len(target),
        "n_control": len(control) if control else 0,
        "diffusion": {
            "pipeline": type(pipe).__name__,
            "denoiser": type(denoiser).__name__,
            "noise_levels": [round(v, 6) for v in col_s.levels],
        },
    }
    return fit_from_activations(
        ModelIdentity.of(denoiser), col_s.sites, col_s.bucketed(edges), col_t.bucketed(edges),
        col_c.bucketed(edges) if col_c is not None else None, opts, edges=edges, fit_info=info,
    )
