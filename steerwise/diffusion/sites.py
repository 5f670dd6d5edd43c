"""Where to steer a diffusion model: hook sites of its denoiser (UNet or DiT transformer).

The *model* a diffusion recipe belongs to is the pipeline's denoiser (``pipe.unet`` or
``pipe.transformer``); site names are module paths inside it. Named site kinds:

``attn`` (default)  UNet: every attention block (``Transformer2DModel``: ``down_blocks.i.attentions.j``,
                    ``mid_block.attentions.0``, ``up_blocks.i.attentions.j``), whose output is a
                    (batch, channels, h, w) feature map; DiT (SD3, Flux): every transformer block
                    (``transformer_blocks.i``, and Flux's ``single_transformer_blocks.i``), whose
                    image-token output is (batch, tokens, dim).
``block``           UNet: the ``BasicTransformerBlock`` inside each attention block (tokens =
                    spatial positions, (batch, h·w, channels)); DiT: same as ``attn``.
``resnet``          UNet only: every ``ResnetBlock2D`` (a (batch, channels, h, w) map).

``re:<regex>[:<tuple-index>]`` matches whole module names of the denoiser. The layout of known
block classes (which tuple element holds the image features, whether channels are on axis 1)
comes from ``BLOCK_LAYOUTS``; for other modules the activation collector reads it off the
tensors during fitting. Either way a gate's "token" is one spatial position / image token.

Blocks are numbered in forward order (down → mid → up for UNets) as the site's ``layer``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..recipe import ModelIdentity, register_identity_provider
from ..sites import Site, SiteError, parse_layers

DIFFUSION_SITE_KINDS = ("attn", "block", "resnet")

# Module class → (tuple index of the image features or None for a tensor/first tensor, channel_dim)
BLOCK_LAYOUTS: dict[str, tuple[int | None, int]] = {
    "Transformer2DModel": (0, 1),
    "SpatialTransformer": (0, 1),
    "ResnetBlock2D": (None, 1),
    "Downsample2D": (None, 1),
    "Upsample2D": (None, 1),
    "Conv2d": (None, 1),
    "GroupNorm": (None, 1),
    "CrossAttnDownBlock2D": (0, 1),
    "DownBlock2D": (0, 1),
    "UNetMidBlock2DCrossAttn": (None, 1),
    "UNetMidBlock2D": (None, 1),
    "CrossAttnUpBlock2D": (None, 1),
    "UpBlock2D": (None, 1),
    "BasicTransformerBlock": (None, -1),
    "JointTransformerBlock": (1, -1),
    "FluxTransformerBlock": (1, -1),
    "FluxSingleTransformerBlock": (1, -1),
}

# Denoisers whose pipelines pass the timestep already divided by the number of train steps.
NORMALISED_TIMESTEP = ("FluxTransformer2DModel",)


def denoiser_of(pipe: Any) -> nn.Module:
    """The denoiser of a diffusers pipeline (``unet`` or ``transformer``), or the module itself."""
    if isinstance(pipe, nn.Module) and not hasattr(pipe, "components"):
        return pipe
    for name in ("unet", "transformer", "prior", "decoder"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise SiteError(
        f"cannot find the denoiser of a {type(pipe).__name__}: expected a `unet` or `transformer` "
        f"component"
    )


def is_unet(denoiser: nn.Module) -> bool:
    return hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks")


def _forward_order(names: list[str]) -> list[str]:
    """Sort UNet module names down → mid → up (registration order puts mid last)."""
    def key(name: str) -> tuple[int, list[int]]:
        part = 0 if name.startswith("down_blocks") else 1 if name.startswith("mid_block") else 2
        nums = [int(n) for n in re.findall(r"\d+", name)]
        return part, nums

    return sorted(names, key=key)


def _modules_of_class(denoiser: nn.Module, classes: Sequence[str]) -> list[str]:
    return [
        n for n, m in denoiser.named_modules() if n and type(m).__name__ in classes
    ]


def _kind_modules(denoiser: nn.Module, kind: str) -> list[str]:
    if is_unet(denoiser):
        classes = {
            "attn": ("Transformer2DModel", "SpatialTransformer"),
            "block": ("BasicTransformerBlock",),
            "resnet": ("ResnetBlock2D",),
        }[kind]
        names = _modules_of_class(denoiser, classes)
        if kind == "attn":  # only the top-level attention blocks, not nested ones
            names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
        return _forward_order(names)
    if kind == "resnet":
        raise SiteError(f"site 'resnet' exists only on UNets, not on {type(denoiser).__name__}")
    names = []
    for list_name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        blocks = getattr(denoiser, list_name, None)
        if isinstance(blocks, nn.ModuleList):
            names += [f"{list_name}.{i}" for i in range(len(blocks))]
    return names


def _site_for(denoiser: nn.Module, name: str, layer: int, tuple_index: int | None = None) -> Site:
    cls = type(denoiser.get_submodule(name)).__name__
    known_index, channel_dim = BLOCK_LAYOUTS.get(cls, (None, -1))
    return Site(
        name=name, module=name, layer=layer, io="output",
        tuple_index=known_index if tuple_index is None else tuple_index,
        channel_dim=channel_dim,
    )


def resolve_diffusion_sites(
    pipe_or_denoiser: Any,
    site: str = "attn",
    layers: str | int | Sequence[int] | None = None,
) -> list[Site]:
    """Resolve a site kind (``attn``/``block``/``resnet``) or ``re:<regex>[:i]`` on a denoiser.

    ``layers`` selects among the resolved blocks in forward order (``"all"``, ``"2-5"``,
    ``"0,3,-1"``).
    """
    denoiser = denoiser_of(pipe_or_denoiser)
    tuple_index = None
    if site.startswith("re:"):
        body = site[3:]
        m = re.fullmatch(r"(.*):(\d+)", body)
        if m:
            body, tuple_index = m.group(1), int(m.group(2))
        try:
            pattern = re.compile(body)
        except re.error as exc:
            raise SiteError(f"bad module regex {body!r}: {exc}") from exc
        names = [n for n, _ in denoiser.named_modules() if n and pattern.fullmatch(n)]
        if is_unet(denoiser):
            names = _forward_order(names)
        if not names:
            examples = ", ".join(_kind_modules(denoiser, "attn")[:6])
            raise SiteError(
                f"regex {body!r} matches no module of this {type(denoiser).__name__}; its "
                f"attention blocks are named like: {examples} ..."
            )
    elif site in DIFFUSION_SITE_KINDS:
        names = _kind_modules(denoiser, site)
        if not names:
            raise SiteError(f"no {site!r} blocks found in a {type(denoiser).__name__}")
    elif site.startswith("re-in:"):
        raise SiteError("input sites ('re-in:') are not supported on diffusion denoisers")
    else:
        raise SiteError(
            f"unknown diffusion site {site!r} for a {type(denoiser).__name__}; valid choices: "
            f"{', '.join(DIFFUSION_SITE_KINDS)}, or 're:<module-regex>[:<tuple-index>]'"
        )
    chosen = parse_layers(layers, len(names))
    return [_site_for(denoiser, names[i], i, tuple_index) for i in chosen]


def with_layout(site: Site, ndim: int) -> Site:
    """The site with ``channel_dim`` set from an observed activation rank (4 → 1, 3 → -1)."""
    if ndim == 4:
        return site if site.channel_dim == 1 else replace(site, channel_dim=1)
    if ndim == 3:
        return site if site.channel_dim == -1 else replace(site, channel_dim=-1)
    raise SiteError(
        f"site {site.name!r}: expected a (batch, channels, h, w) or (batch, tokens, dim) "
        f"activation, got {ndim} dimensions"
    )


def diffusion_describe(denoiser: nn.Module) -> dict[str, str]:
    """Kind → first module name and count, for the CLI and error messages."""
    out = {}
    for kind in DIFFUSION_SITE_KINDS:
        try:
            names = _kind_modules(denoiser, kind)
            out[kind] = f"{len(names)} blocks, e.g. {names[0]}" if names else "none"
        except SiteError as exc:
            out[kind] = f"unavailable: {exc}"
    return out


def denoiser_width(denoiser: nn.Module) -> int:
    """The widest feature width of the denoiser (UNet: max block channels; DiT: inner dim)."""
    cfg = getattr(denoiser, "config", {})
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    channels = get("block_out_channels", None)
    if channels:
        return int(max(channels))
    heads, head_dim = get("num_attention_heads", None), get("attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    for key in ("inner_dim", "hidden_size"):
        if isinstance(get(key, None), int):
            return int(get(key))
    raise SiteError(f"cannot tell the width of a {type(denoiser).__name__}")


def _identity(model: nn.Module) -> ModelIdentity | None:
    """Recipe identity of a diffusers denoiser: class name, widest width, attention-block count."""
    if not type(model).__module__.startswith("diffusers."):
        return None
    cfg = getattr(model, "config", {})
    name = cfg.get("_name_or_path", "") if hasattr(cfg, "get") else ""
    return ModelIdentity(
        model_type=type(model).__name__,
        hidden_size=denoiser_width(model),
        num_layers=len(_kind_modules(model, "attn")),
        name_or_path=str(name or ""),
    )


register_identity_provider(_identity)
