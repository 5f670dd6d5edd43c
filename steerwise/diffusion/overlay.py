"""Render gate maps on images: where the DSAS gate fired while the image was generated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .generate import GateMaps, ImageGeneration


def _rgb(image) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1] from a PIL image or an array."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr / 255.0 if arr.max() > 1.0 else arr


def gate_overlay(
    image, gate_map: Tensor, *, alpha: float = 0.6, cmap: str = "inferno", normalize: bool = False
):
    """The image with the gate map (h, w) upsampled and blended on it as a heat map.

    Where the gate is 0 the image shows through unchanged; where it is 1 the heat colour covers
    ``alpha`` of the pixel. ``normalize`` stretches the map to [0, 1] first (for faint gates).
    """
    from matplotlib import colormaps
    from PIL import Image

    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    g = torch.as_tensor(gate_map, dtype=torch.float32)
    if g.ndim != 2:
        raise ValueError(f"expected one (h, w) gate map, got shape {tuple(g.shape)}")
    g = torch.nn.functional.interpolate(g[None, None], size=(h, w), mode="bilinear",
                                        align_corners=False)[0, 0].clamp(0, 1).numpy()
    if normalize and g.max() > g.min():
        g = (g - g.min()) / (g.max() - g.min())
    heat = colormaps[cmap](g)[..., :3].astype(np.float32)
    weight = (alpha * g)[..., None]
    out = rgb * (1 - weight) + heat * weight
    return Image.fromarray((out.clip(0, 1) * 255).round().astype(np.uint8))


def save_images(
    generation: ImageGeneration,
    directory: str | Path,
    *,
    prefix: str = "image",
    overlay_sites: Sequence[str] | None = None,
    normalize: bool = False,
) -> list[Path]:
    """Write each image as PNG, and with gate maps also ``<prefix>-<i>-gate.png`` overlays.

    The overlay shows the mean over blocks (or ``overlay_sites``) of ``a_l · h_l``, averaged over
    the denoising steps; the maps themselves are tensors on ``generation.gate_maps``.
    """
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    combined = None
    if generation.gate_maps is not None and generation.gate_maps.maps:
        combined = generation.gate_maps.combined(overlay_sites)
    for i, image in enumerate(generation.images):
        path = out_dir / f"{prefix}-{i}.png"
        image.save(path)
        written.append(path)
        if combined is not None:
            over = gate_overlay(image, combined[i], normalize=normalize)
            gpath = out_dir / f"{prefix}-{i}-gate.png"
            over.save(gpath)
            written.append(gpath)
    return written


def per_block_strip(image, maps: GateMaps, index: int, *, tile: int = 96):
    """One image showing the overlay of every block's gate map side by side (block order)."""
    from PIL import Image

    tiles = [gate_overlay(image.resize((tile, tile)), m[index]) for m in maps.maps.values()]
    strip = Image.new("RGB", (tile * max(1, len(tiles)), tile), "white")
    for j, t in enumerate(tiles):
        strip.paste(t, (j * tile, 0))
    return strip
