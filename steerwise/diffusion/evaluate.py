"""Evaluate a diffusion steering the way the DSAS paper does (docs/algorithms.md §4).

For concept prompts (e.g. bananas) and non-concept prompts, over a strength sweep λ, and for two
variants of the same recipe — its maps ungated at full scale on every block (plain CAA) and the
recipe as fitted (CAA + DSAS) — generate images from the same seeds and measure, per group:

* ``clip_score``: 100 · max(cos(CLIP image, CLIP prompt), 0) (needs a local CLIP model);
* ``clip_similarity``: cosine of CLIP image embeddings, steered vs unsteered image;
* ``pixel_similarity``: 1 − mean |steered − unsteered| / 255 (no model needed);
* ``sharpness_ratio``: variance of the Laplacian, steered / unsteered (< 1 = blurrier).

Expected with a "blurry" target: plain CAA lowers sharpness and similarity for both groups;
CAA + DSAS mostly for the concept group. ``sweep_grid`` draws the paper's Figure 4 layout (rows =
prompts, columns = λ, one panel per variant).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..recipe import Recipe
from .generate import CFGMode, generate_images, without_gates


class CLIPScorer:
    """CLIP text–image and image–image similarities from a local CLIP checkpoint directory."""

    def __init__(self, path: str, device: str | None = None) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        for key in ("image_embeds", "text_embeds", "pooler_output"):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError(f"cannot read CLIP features from a {type(out).__name__}")

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Any]) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        feats = self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        inputs = inputs.to(self.device)
        feats = self._features(self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def clip_score(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        sims = (self.image_embeds(images) * self.text_embeds(texts)).sum(-1)
        return (100.0 * sims.clamp(min=0)).numpy()

    def image_similarity(self, a: Sequence[Any], b: Sequence[Any]) -> np.ndarray:
        return (self.image_embeds(a) * self.image_embeds(b)).sum(-1).numpy()


def _array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)


def pixel_similarity(a: Any, b: Any) -> float:
    """1 − mean absolute pixel difference / 255 (1 = identical)."""
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    return float(1.0 - np.abs(x - y).mean() / 255.0)


def sharpness(image: Any) -> float:
    """Variance of the Laplacian of the grey image (a standard blur measure; lower = blurrier)."""
    grey = torch.from_numpy(_array(image).mean(-1)).float()[None, None]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    lap = torch.nn.functional.conv2d(grey, kernel)
    return float(lap.var())


@dataclass
class SweepResult:
    """Per-image metrics (``rows``), group means (``summary``) and the images of the sweep."""

    prompts: list[str]
    groups: list[str]
    strengths: list[float]
    variants: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, dict[float, list[Any]]] = field(default_factory=dict)
    baseline: list[Any] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """Means per (variant, strength, group) of every metric."""
        keys: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
        for r in self.rows:
            keys.setdefault((r["variant"], r["strength"], r["group"]), []).append(r)
        out = []
        for (variant, strength, group), rows in keys.items():
            entry: dict[str, Any] = {"variant": variant, "strength": strength, "group": group,
                                     "n": len(rows)}
            for metric in ("clip_score", "clip_similarity", "pixel_similarity", "sharpness_ratio"):
                vals = [r[metric] for r in rows if r.get(metric) is not None]
                if vals:
                    entry[metric] = float(np.mean(vals))
            out.append(entry)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "groups": self.groups, "strengths": self.strengths,
                "variants": self.variants, "summary": self.summary(), "rows": self.rows}


def sweep(
    pipe: Any,
    recipe: Recipe,
    concept_prompts: Sequence[str],
    other_prompts: Sequence[str],
    strengths: Sequence[float],
    *,
    scorer: CLIPScorer | None = None,
    seed: int = 0,
    cfg: CFGMode = "both",
    variants: Sequence[str] = ("ungated", "gated"),
    progress: Any = None,
    **pipeline_kwargs: Any,
) -> SweepResult:
    """Generate and score the sweep; ``variants``: ``ungated`` (maps only) and/or ``gated``."""
    prompts = list(concept_prompts) + list(other_prompts)
    groups = ["concept"] * len(concept_prompts) + ["other"] * len(other_prompts)
    if not concept_prompts or not other_prompts:
        raise ValueError("give both concept and non-concept prompts")
    recipes: dict[str, Recipe] = {}
    for v in variants:
        if v == "ungated":
            recipes[recipe.method] = without_gates(recipe)
        elif v == "gated":
            if recipe.gate == "none":
                continue
            recipes[f"{recipe.method}+{recipe.gate}"] = recipe
        else:
            raise ValueError(f"unknown variant {v!r}: use 'ungated' and/or 'gated'")
    result = SweepResult(prompts, groups, [float(s) for s in strengths], list(recipes))
    base = generate_images(pipe, prompts, None, seed=seed, **pipeline_kwargs).images
    result.baseline = base
    base_sharp = [sharpness(im) for im in base]
    base_clip = scorer.clip_score(base, prompts) if scorer else None
    for name, r in recipes.items():
        result.images[name] = {}
        for lam in result.strengths:
            if progress is not None:
                progress(f"{name} λ={lam:g}")
            images = generate_images(pipe, prompts, r, lam, seed=seed, cfg=cfg, **pipeline_kwargs).images
            result.images[name][lam] = images
            clip_s = scorer.clip_score(images, prompts) if scorer else None
            clip_sim = scorer.image_similarity(images, base) if scorer else None
            for i, (prompt, group) in enumerate(zip(prompts, groups)):
                result.rows.append({
                    "variant": name, "strength": lam, "group": group, "prompt": prompt,
                    "pixel_similarity": pixel_similarity(images[i], base[i]),
                    "sharpness_ratio": sharpness(images[i]) / max(base_sharp[i], 1e-12),
                    "clip_score": None if clip_s is None else float(clip_s[i]),
                    "clip_score_unsteered": None if base_clip is None else float(base_clip[i]),
                    "clip_similarity": None if clip_sim is None else float(clip_sim[i]),
                })
    return result


def sweep_grid(result: SweepResult, *, tile: int = 128):
    """Figure-4 style grid: one panel per variant; rows = prompts, columns = λ."""
    from PIL import Image, ImageDraw

    label_w, head_h, gap = 8 * 28, 22, 12
    n_rows, n_cols = len(result.prompts), len(result.strengths)
    panel_w = n_cols * tile
    width = label_w + len(result.variants) * (panel_w + gap)
    height = 2 * head_h + n_rows * tile
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, group) in enumerate(zip(result.prompts, result.groups)):
        short = prompt if len(prompt) <= 26 else prompt[:23] + "..."
        text = ("* " if group == "concept" else "  ") + short
        draw.text((4, 2 * head_h + r * tile + tile // 2 - 6), text, fill="black")
    for v, name in enumerate(result.variants):
        x0 = label_w + v * (panel_w + gap)
        draw.text((x0 + 4, 4), name.upper(), fill="black")
        for c, lam in enumerate(result.strengths):
            draw.text((x0 + c * tile + 4, head_h + 4), f"lambda={lam:g}", fill="black")
            for r, image in enumerate(result.images[name][lam]):
                grid.paste(image.convert("RGB").resize((tile, tile)), (x0 + c * tile, 2 * head_h + r * tile))
    return grid


def summary_table(result: SweepResult):
    """A rich table of the group means."""
    from rich.table import Table

    table = Table(title="diffusion steering sweep (means per group)")
    for col in ("variant", "λ", "group", "sharpness ratio", "pixel sim", "CLIP sim", "CLIP score"):
        table.add_column(col, justify="right" if col not in ("variant", "group") else "left")

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    for s in result.summary():
        table.add_row(s["variant"], f"{s['strength']:g}", s["group"], fmt(s.get("sharpness_ratio")),
                      fmt(s.get("pixel_similarity")), fmt(s.get("clip_similarity")),
                      fmt(s.get("clip_score")))
    return table


def save_sweep(result: SweepResult, directory: str | Path, *, tile: int = 128) -> dict[str, Path]:
    """Write ``results.json`` and ``grid.png`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "grid": out / "grid.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    sweep_grid(result, tile=tile).save(paths["grid"])
    return paths
