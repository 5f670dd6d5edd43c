"""Heat maps of learned interventions (matplotlib, Agg backend; PNG files).

One panel per site kind (attn, mlp, residual, ...), layers as rows and prompt positions as
columns, labelled with the tokens of a reference prompt:

* ActivScalar — the learned α (diverging colours, 0 = white = untouched);
* SteerVec    — the norm ‖v‖ of each learned vector;
* DynScalar   — α = w·h (+ b) as computed on one given prompt (it depends on the activations).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..sites import Site
from .data import answer_logits
from .recipe import ScaleRecipe


def _kind_and_layer(site: Site) -> tuple[str, int]:
    if site.layer >= 0 and "." in site.name:
        return site.name.rsplit(".", 1)[0], site.layer
    return "sites", site.layer


def scalar_grid(recipe: ScaleRecipe, values: Tensor) -> dict[str, tuple[list[int], Tensor]]:
    """Split (sites, positions) values into {kind: (layers, (layers, positions) values)}."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, site in enumerate(recipe.sites):
        kind, layer = _kind_and_layer(site)
        groups.setdefault(kind, []).append((layer, i))
    return {
        kind: ([layer for layer, _ in items], values[[i for _, i in items]])
        for kind, items in groups.items()
    }


@torch.no_grad()
def dynamic_scalars(
    model: nn.Module, tokenizer, recipe: ScaleRecipe, prompt: str
) -> tuple[Tensor, list[str]]:
    """(sites, tokens) α of a DynScalar (or any intervention) on ``prompt``, and its tokens.

    The scalars are read off the unsteered forward pass (β = 0): what α each activation of the
    prompt gets.
    """
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    t_ids = torch.tensor([ids])
    mask = torch.ones_like(t_ids)
    with recipe.apply(model, 0.0, trace=True) as handle:
        answer_logits(model, t_ids, mask)
        values = handle.scalar_map()[0]
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return values, tokens


def plot_scalars(
    recipe: ScaleRecipe,
    path: str | os.PathLike,
    *,
    values: Tensor | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write the heat map of ``recipe`` to ``path`` (PNG).

    ``values`` (sites, positions) defaults to α (ActivScalar) or ‖v‖ (SteerVec); a DynScalar needs
    them from :func:`dynamic_scalars`. ``tokens`` label the columns (default: the reference
    prompt saved at training time).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    iv = recipe.intervention
    signed = True
    if values is None:
        if iv.method == "activscalar":
            values = iv.alpha.detach().float().cpu()  # type: ignore[attr-defined]
        elif iv.method == "steervec":
            values = iv.vectors.detach().float().norm(dim=-1).cpu()  # type: ignore[attr-defined]
            signed = False
        else:
            raise ValueError(
                "a DynScalar's scalars depend on the prompt: compute them with "
                "dynamic_scalars(model, tokenizer, recipe, prompt) and pass values="
            )
    values = values.float().cpu()
    n_pos = values.shape[1]
    labels = list(tokens if tokens is not None else recipe.info.get("reference_tokens", []))
    labels = ([""] * max(0, n_pos - len(labels)) + labels)[-n_pos:] if labels else None
    grid = scalar_grid(recipe, values)
    vmax = float(values.abs().max()) or 1.0
    fig_w = max(6.0, 0.42 * n_pos * len(grid) + 2.5)
    n_layers = max(len(layers) for layers, _ in grid.values())
    fig, axes = plt.subplots(1, len(grid), figsize=(fig_w, 1.2 + 0.45 * n_layers + 1.2),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, (kind, (layers, vals)) in zip(axes[0], grid.items()):
        if signed:
            image = ax.imshow(vals.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        else:
            image = ax.imshow(vals.numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(kind)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_ylabel("layer")
        if labels:
            ax.set_xticks(range(n_pos), labels, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("position")
    label = {"activscalar": "α", "steervec": "‖v‖", "dynscalar": "α = w·h + b"}[iv.method]
    fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.9)
    fig.suptitle(title or f"{iv.method}: learned {label} per site, layer and position")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
