"""Steered image generation: a recipe applied inside ``pipeline(...)``.

``DiffusionSteering`` (a context manager, made by ``steer(pipe, recipe, strength)``) installs the
engine's ``SteeringHandle`` on the pipeline's denoiser — per spatial position / image token and
per block, ``t' = t + λ · a_l · h_l(t) · δ_l(t)`` — plus one pre-hook on the denoiser that reads
each call's timestep, so recipes with several timestep buckets switch maps and gates as the
noise level falls.

Classifier-free guidance: pipelines batch ``[unconditional, conditional]`` rows through the
denoiser. ``cfg="both"`` (default) steers every row, each gated by its *own* activation (the
per-row behaviour of DSAS: the unconditional rows are steered exactly where their features look
like the concept). ``cfg="cond"`` steers only the conditional half, leaving the unconditional
prediction untouched; the guidance step then pushes *away* from the unsteered prediction, which
amplifies the steering by the guidance scale. When a call carries no CFG batch (guidance 1,
guidance-distilled models such as FLUX.1-dev) every row is conditional.

Gate maps: ``gate_maps=True`` records ``a_l · h_l`` per block and step (for the steered rows;
0 where nothing is steered); ``DiffusionSteering.gate_maps()`` returns them per block as
(n_images, h, w) averaged over the steps, for overlays (``steerwise.diffusion.overlay``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..gates.base import Gate, StepContext
from ..hooks import SiteSteering, SteeringHandle
from ..recipe import Recipe, RecipeMismatchError
from .collect import bucket_of, cfg_active, read_timestep, timestep_scale
from .sites import denoiser_of

CFGMode = Literal["both", "cond"]


@dataclass
class _CallState:
    """What the denoiser pre-hook learnt about the current call (owned by one steering)."""

    level: float | None = None
    batch: int = 0
    cfg: bool = False
    aspect: float = 1.0  # latent height / width
    step: int = -1


class _RuntimeGate(Gate):
    """Wraps a recipe gate for one generation: CFG row selection, width check, gate-map record."""

    kind = "runtime"

    def __init__(
        self, inner: Gate, owner: DiffusionSteering, name: str, dim: int, bucket: int, scale: float
    ) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale
        self._owner = [owner]  # a list: keep the owner out of nn.Module's child registry
        self.site_name = name
        self.dim = dim
        self.bucket = bucket

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:
        owner = self._owner[0]
        if t.shape[-1] != self.dim:
            raise RecipeMismatchError(
                f"site {self.site_name!r} has width {t.shape[-1]} in this denoiser but "
                f"{self.dim} in the recipe: the recipe was fitted for another model"
            )
        state = owner.state
        gate = self.inner(t, ctx)
        rows = owner.row_mask(t.shape[0], t.device)
        if rows is not None:
            base = torch.ones(t.shape[:-1], device=t.device) if gate is None else gate
            gate = base * rows.view(-1, *([1] * (t.ndim - 2)))
        if owner.record and owner.active_bucket() == self.bucket:
            shown = torch.ones(t.shape[:-1], device=t.device) if gate is None else gate
            owner.record_map(self.site_name, (shown * self.scale).detach(), state)
        return gate

    def reset(self) -> None:
        self.inner.reset()


@dataclass
class GateMaps:
    """Per block: (n_images, h, w) gate maps ``a_l · h_l`` averaged over the denoising steps.

    ``steps`` says how many denoiser calls each block's map averages (with timestep buckets, a
    bucket's entries are active only for the steps of their noise levels).
    """

    maps: dict[str, Tensor] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def combined(self, sites: Sequence[str] | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """The mean over blocks (all, or ``sites``), each resized to ``size`` (h, w) first."""
        names = list(sites) if sites is not None else list(self.maps)
        if not names:
            raise ValueError("no gate maps recorded (was anything steered?)")
        if size is None:
            size = max((tuple(self.maps[n].shape[-2:]) for n in names), key=lambda s: s[0] * s[1])
        resized = [
            torch.nn.functional.interpolate(self.maps[n][:, None].float(), size=size, mode="bilinear",
                                            align_corners=False)[:, 0]
            for n in names
        ]
        return torch.stack(resized).mean(0)


class DiffusionSteering:
    """A recipe installed on a pipeline's denoiser; a context manager (hooks removed on exit)."""

    def __init__(
        self,
        pipe: Any,
        recipe: Recipe,
        strength: float | None = None,
        *,
        cfg: CFGMode = "both",
        gate_maps: bool = False,
    ) -> None:
        if cfg not in ("both", "cond"):
            raise ValueError(f"cfg must be 'both' or 'cond', got {cfg!r}")
        self.pipe = pipe
        self.recipe = recipe
        self.denoiser: nn.Module = denoiser_of(pipe)
        recipe.check_model(self.denoiser)
        self.strength = recipe.default_strength if strength is None else float(strength)
        self.cfg = cfg
        self.record = gate_maps
        self.state = _CallState()
        self._scale = timestep_scale(pipe, self.denoiser)
        info = recipe.fit_info.get("diffusion", {})
        self.edges: list[float] = list(info.get("timestep_buckets", [0.0, math.inf]))
        buckets = list(info.get("entry_buckets", [0] * len(recipe.entries)))
        if len(buckets) != len(recipe.entries):
            raise ValueError("recipe fit_info.diffusion.entry_buckets does not match its entries")
        self._records: dict[str, list[tuple[int, Tensor, bool, float]]] = {}
        self._handles: list[SteeringHandle] = []
        self._pre = self.denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        try:
            for b in sorted(set(buckets)):
                entries = [
                    SiteSteering(e.site, e.map, _RuntimeGate(e.gate, self, e.site.name, e.dim, b, e.scale),
                                 e.scale, e.diagnostics)
                    for e, eb in zip(recipe.entries, buckets) if eb == b
                ]
                self._handles.append(
                    SteeringHandle(self.denoiser, entries, 0.0, trace=gate_maps)
                )
            self._buckets = sorted(set(buckets))
        except BaseException:
            self.remove()
            raise

    # ---- per-call state ----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = read_timestep(args, kwargs)
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        batch = int(sample.shape[0]) if isinstance(sample, Tensor) else 0
        aspect = self.state.aspect
        if isinstance(sample, Tensor) and sample.ndim == 4:
            aspect = sample.shape[-2] / sample.shape[-1]
        self.state = _CallState(
            level=None if t is None else t * self._scale, batch=batch,
            cfg=cfg_active(self.pipe, batch), aspect=aspect, step=self.state.step + 1,
        )
        active = self.active_bucket()
        for b, handle in zip(self._buckets, self._handles):
            handle.strength = self.strength if b == active else 0.0

    def active_bucket(self) -> int:
        if len(self.edges) <= 2 or self.state.level is None:
            return self._buckets[0] if self._buckets else 0
        return bucket_of(self.state.level, self.edges)

    def row_mask(self, batch: int, device: torch.device) -> Tensor | None:
        """1 for rows to steer, 0 for others; ``None`` when every row is steered."""
        if self.cfg == "both" or not self.state.cfg or batch % 2:
            return None
        mask = torch.ones(batch, device=device)
        mask[: batch // 2] = 0.0
        return mask

    def record_map(self, name: str, gate: Tensor, state: _CallState) -> None:
        self._records.setdefault(name, []).append((state.step, gate.float().cpu(), state.cfg, state.aspect))

    # ---- life cycle ---------------------------------------------------------------------------
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._pre is not None:
            self._pre.remove()
            self._pre = None

    def __enter__(self) -> DiffusionSteering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---- results ------------------------------------------------------------------------------
    def gate_maps(self, rows: Literal["cond", "uncond"] = "cond") -> GateMaps:
        """Per block, (n_images, h, w): the mean over steps of the recorded gate values.

        With a CFG batch ``rows`` picks the half the maps describe (the conditional one by
        default; it is the image's own prompt). Token activations are laid out on the latent
        grid using the latent aspect ratio.
        """
        out, steps = {}, {}
        for name, recs in self._records.items():
            steps[name] = len(recs)
            per_step = []
            for _, gate, cfg, aspect in recs:
                if cfg:
                    half = gate.shape[0] // 2
                    gate = gate[half:] if rows == "cond" else gate[:half]
                per_step.append(_as_grid(gate, aspect))
            out[name] = torch.stack(per_step).mean(0)
        return GateMaps(out, steps)


def _as_grid(gate: Tensor, aspect: float) -> Tensor:
    """(batch, h, w) from a (batch, h, w) or (batch, tokens) gate; tokens laid on an h×w grid."""
    if gate.ndim == 3:
        return gate
    n = gate.shape[1]
    h = max(1, round(math.sqrt(n * aspect)))
    while n % h:
        h -= 1
    return gate.reshape(gate.shape[0], h, n // h)


def steer(
    pipe: Any, recipe: Recipe, strength: float | None = None, *, cfg: CFGMode = "both",
    gate_maps: bool = False,
) -> DiffusionSteering:
    """Install ``recipe`` on ``pipe``; use as ``with steer(pipe, recipe, 4.0): pipe(prompt)``."""
    return DiffusionSteering(pipe, recipe, strength, cfg=cfg, gate_maps=gate_maps)


@dataclass
class ImageGeneration:
    """Images from ``generate_images`` and, when asked for, the gate maps per block."""

    prompts: list[str]
    images: list[Any]
    gate_maps: GateMaps | None = None


def generate_images(
    pipe: Any,
    prompts: Sequence[str] | str,
    recipe: Recipe | None = None,
    strength: float | None = None,
    *,
    seed: int = 0,
    cfg: CFGMode = "both",
    return_gate_maps: bool = False,
    **pipeline_kwargs: Any,
) -> ImageGeneration:
    """Run ``pipe`` on ``prompts`` (steered when a recipe is given) with per-prompt seeds.

    Prompt i uses a generator seeded with ``seed + i``, so the same prompt and seed give the
    same starting noise steered or not: steered and unsteered images are comparable pixel by
    pixel, and strength 0 reproduces the unsteered images bit for bit.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if cfg == "cond" and float(pipeline_kwargs.get("true_cfg_scale", 1.0)) > 1.0:
        raise ValueError("cfg='cond' cannot tell the separate true-CFG passes apart; use cfg='both'")
    denoiser = denoiser_of(pipe)
    device = next(denoiser.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(prompts))]
    if recipe is None:
        with torch.no_grad():
            out = pipe(prompt=prompts, generator=gens, **pipeline_kwargs)
        return ImageGeneration(prompts, list(out.images))
    with steer(pipe, recipe, strength, cfg=cfg, gate_maps=return_gate_maps) as handle:
        if pipeline_kwargs.get("height") and pipeline_kwargs.get("width"):  # token grids (FLUX)
            handle.state.aspect = pipeline_kwargs["height"] / pipeline_kwargs["width"]
        with torch.no_grad():
            out = pipe(prompt=prompts, generator=gens, **pipeline_kwargs)
    maps = handle.gate_maps() if return_gate_maps else None
    return ImageGeneration(prompts, list(out.images), maps)


def without_gates(recipe: Recipe) -> Recipe:
    """The same maps, ungated and at full scale on every block: plain CAA (the paper's baseline)."""
    from ..gates.base import NoGate

    entries = [SiteSteering(e.site, e.map, NoGate(), 1.0, dict(e.diagnostics)) for e in recipe.entries]
    return Recipe(model=recipe.model, entries=entries, method=recipe.method, gate="none",
                  default_strength=recipe.default_strength, fit_info=dict(recipe.fit_info))
