"""Collect pooled denoiser activations while a diffusers pipeline runs on prompts.

For each prompt, each hook site and each denoising step, the site's activation is mean-pooled
over spatial positions (or image tokens) into one vector of the site's width. Only the rows that
belong to the prompt are kept: with classifier-free guidance the pipeline batches
``[unconditional, conditional]`` and by default the conditional half is collected (the
unconditional half is the same empty/negative prompt for every image and carries no concept).
The VAE decoder is skipped (``output_type="latent"``).

The result keeps one (n_prompts, d) matrix per (site, step) plus each step's *noise level*
ν ∈ [0, 1] (the denoiser's timestep over the scheduler's training steps; 1 = pure noise), so the
fit can group steps into timestep buckets afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..sites import Site
from .sites import NORMALISED_TIMESTEP, denoiser_of, with_layout

Rows = Literal["cond", "uncond", "all"]


@dataclass
class Collected:
    """Pooled activations: ``acts[site][step]`` is (n_prompts, d) float32 (rows = prompts)."""

    sites: list[Site]
    levels: list[float]
    acts: dict[str, list[Tensor]] = field(default_factory=dict)

    def bucketed(self, edges: Sequence[float]) -> dict[str, list[Tensor]]:
        """Per site, per bucket: the mean over the bucket's steps → (n_prompts, d)."""
        groups = [bucket_of(level, edges) for level in self.levels]
        out: dict[str, list[Tensor]] = {}
        for name, per_step in self.acts.items():
            out[name] = []
            for b in range(len(edges) - 1):
                steps = [per_step[i] for i, g in enumerate(groups) if g == b]
                if not steps:
                    raise ValueError(
                        f"timestep bucket {b} ({edges[b]:.3f}–{edges[b + 1]:.3f}) got no "
                        f"denoising step: use more steps or fewer buckets"
                    )
                out[name].append(torch.stack(steps).mean(0))
        return out


def bucket_of(level: float, edges: Sequence[float]) -> int:
    """Index of the bucket [edges[b], edges[b+1]) holding ``level`` (the last one is closed)."""
    for b in range(len(edges) - 1):
        if level < edges[b + 1]:
            return b
    return len(edges) - 2


def bucket_edges(levels: Sequence[float], n_buckets: int) -> list[float]:
    """Split the distinct observed noise levels into ``n_buckets`` contiguous groups.

    Edges lie midway between groups; the outer edges are 0 and 1 (plus a margin for schedules
    that start above 1), so every bucket holds at least one fitted step and generation with any
    number of steps maps each step to the bucket of the nearest fitted levels.
    """
    distinct = sorted({round(float(v), 6) for v in levels})
    if n_buckets < 1:
        raise ValueError("timestep_buckets must be at least 1")
    if n_buckets > len(distinct):
        raise ValueError(
            f"{n_buckets} timestep buckets need at least as many distinct denoising steps; the "
            f"fit ran {len(distinct)}: raise num_inference_steps"
        )
    top = max(1.0, distinct[-1]) + 1e-3
    if n_buckets == 1:
        return [0.0, top]
    size = len(distinct) / n_buckets
    edges = [0.0]
    for b in range(1, n_buckets):
        i = round(b * size)
        edges.append((distinct[i - 1] + distinct[i]) / 2)
    edges.append(top)
    return edges


def timestep_scale(pipe: Any, denoiser: nn.Module) -> float:
    """Factor turning the denoiser's ``timestep`` argument into a noise level in [0, 1]."""
    if type(denoiser).__name__ in NORMALISED_TIMESTEP:
        return 1.0
    scheduler = getattr(pipe, "scheduler", None)
    n = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return 1.0 / float(n or 1000)


def read_timestep(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


def cfg_active(pipe: Any, batch: int) -> bool:
    """Whether the current denoiser call carries a [uncond, cond] classifier-free guidance batch."""
    flag = getattr(pipe, "do_classifier_free_guidance", False)
    try:
        flag = bool(flag)
    except Exception:  # noqa: BLE001 - a property that cannot be read before __call__
        flag = False
    return flag and batch % 2 == 0


def pick(output: Any, site: Site) -> Tensor:
    """The steered tensor of a module output (the tuple element the site names)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        if site.tuple_index is not None:
            return output[site.tuple_index]
        for x in output:
            if isinstance(x, Tensor):
                return x
    sample = getattr(output, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(f"site {site.name!r}: cannot read a tensor from a {type(output).__name__}")


def pool_positions(x: Tensor, site: Site) -> Tensor:
    """(batch, d) float32: the mean over spatial positions / tokens of a site's activation."""
    if x.ndim == 4:
        return x.float().mean(dim=(2, 3)) if site.channel_dim == 1 else x.float().mean(dim=(1, 2))
    if x.ndim == 3:
        return x.float().mean(dim=1)
    raise ValueError(f"site {site.name!r}: cannot pool an activation of shape {tuple(x.shape)}")


def collect_diffusion_activations(
    pipe: Any,
    prompts: Sequence[str],
    sites: Sequence[Site],
    *,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    rows: Rows = "cond",
    negative_prompt: str | None = None,
    same_noise: bool = False,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> Collected:
    """Run ``pipe`` on ``prompts`` (few steps, latents only) and pool each site per step.

    Prompt i uses a generator seeded with ``seed + i`` (``seed`` for all with ``same_noise``:
    then the sets differ only by their prompts), so collections are reproducible.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to collect activations from")
    denoiser = denoiser_of(pipe)
    scale = timestep_scale(pipe, denoiser)
    sites = list(sites)
    per_site: dict[str, list[list[Tensor]]] = {s.name: [] for s in sites}
    observed_ndim: dict[str, int] = {}
    state: dict[str, Any] = {"step": -1, "levels": [], "batch_levels": []}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["step"] += 1
        t = read_timestep(args, kwargs)
        state["batch_levels"].append(float("nan") if t is None else t * scale)

    def make_hook(site: Site):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = pick(output, site)
            observed_ndim[site.name] = x.ndim
            laid = with_layout(site, x.ndim)
            pooled = pool_positions(x.detach(), laid)
            b = pooled.shape[0]
            if cfg_active(pipe, b) and rows != "all":
                pooled = pooled[b // 2:] if rows == "cond" else pooled[: b // 2]
            steps = per_site[site.name]
            while len(steps) <= state["step"]:
                steps.append([])
            steps[state["step"]].append(pooled.cpu())

        return hook

    call_kwargs: dict[str, Any] = dict(pipeline_kwargs or {})
    call_kwargs.update(num_inference_steps=num_inference_steps, output_type="latent")
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    if height is not None:
        call_kwargs["height"] = height
    if width is not None:
        call_kwargs["width"] = width

    handles = [denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    device = _device_of(pipe, denoiser)
    levels: list[float] | None = None
    try:
        for site in sites:
            handles.append(denoiser.get_submodule(site.module).register_forward_hook(make_hook(site)))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            state["step"] = -1
            state["batch_levels"] = []
            gens = [
                torch.Generator(device=device).manual_seed(seed if same_noise else seed + start + i)
                for i in range(len(chunk))
            ]
            kw = dict(call_kwargs)
            if negative_prompt is not None:
                kw["negative_prompt"] = [negative_prompt] * len(chunk)
            with torch.no_grad():
                pipe(prompt=chunk, generator=gens, **kw)
            if levels is None:
                levels = list(state["batch_levels"])
            elif len(levels) != len(state["batch_levels"]):
                raise RuntimeError("the pipeline ran a different number of steps between batches")
    finally:
        for h in handles:
            h.remove()

    out_sites = [with_layout(s, observed_ndim[s.name]) if s.name in observed_ndim else s for s in sites]
    missing = [s.name for s in sites if s.name not in observed_ndim]
    if missing:
        raise RuntimeError(f"sites never ran during the pipeline call: {', '.join(missing)}")
    acts = {name: [torch.cat(chunks) for chunks in steps] for name, steps in per_site.items()}
    return Collected(sites=out_sites, levels=list(levels or []), acts=acts)


def _device_of(pipe: Any, denoiser: nn.Module) -> torch.device:
    device = getattr(pipe, "device", None)
    if isinstance(device, torch.device):
        return device if device.type != "meta" else torch.device("cpu")
    for p in denoiser.parameters():
        return p.device
    return torch.device("cpu")
