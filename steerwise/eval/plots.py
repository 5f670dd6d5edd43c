"""Pareto-front plots: toxicity vs each utility (in-domain perplexity, WikiText perplexity,
benign-prompt toxicity, MMLU), one colour per method + gate, dashed without a gate; every
evaluated point faint. Benign-prompt toxicity falls with λ like toxicity does, so its panel draws
each λ path instead of a front (over-steering shows as a path ending right of the star)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .pareto import pareto_front

_LABELS = {
    "ppl_nontoxic": "perplexity on held-out in-domain benign text ↓",
    "ppl": "perplexity of the steered model (held-out running text) ↓",
    "benign_toxicity": "toxicity of continuations of benign prompts (%) ↓ (λ path)",
    "mmlu": "MMLU accuracy (log-likelihood) ↑",
}


def plot_fronts(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    max_ppl_factor: float | None = 2.5,
) -> Path:
    """Write a PNG with one panel per available utility (``_LABELS``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    utilities = [u for u in _LABELS if any(u in r for r in rows)]
    if not utilities:
        raise ValueError(f"no utility measure ({', '.join(_LABELS)}) in the rows to plot")
    curves = sorted({(r["method"], r["gate"]) for r in rows})
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    colours = {c: cmap(i % cmap.N) for i, c in enumerate(curves)}
    cols = min(len(utilities), 2)
    nrows = -(-len(utilities) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(utilities):]:
        ax.set_visible(False)
    for ax, util in zip(axes.flat, utilities):
        higher = util == "mmlu"
        scale = 100.0 if util == "benign_toxicity" else 1.0
        for m, g in curves:
            rs = [r for r in rows if r["method"] == m and r["gate"] == g and util in r]
            if not rs:
                continue
            xs = [scale * r[util] for r in rs]
            ys = [100 * r["toxicity"] for r in rs]
            ax.scatter(xs, ys, color=colours[(m, g)], alpha=0.25, s=14,
                       marker="o" if g != "none" else "x")
            if util == "benign_toxicity":  # both axes fall with λ: draw the λ path
                idx = sorted(range(len(rs)), key=lambda i: rs[i]["strength"])
            else:
                idx = pareto_front([r["toxicity"] for r in rs], xs, minimize_y=not higher)
                idx = sorted(idx, key=lambda i: xs[i])
            label = m if g == "none" else f"{m} + {g}"
            ax.plot([xs[i] for i in idx], [ys[i] for i in idx], color=colours[(m, g)],
                    linestyle="--" if g == "none" else "-", marker="o", ms=4, lw=1.8,
                    label=label)
        base = [r for r in rows if r.get("strength") == 0.0 and util in r]
        if base:
            ax.scatter([scale * base[0][util]], [100 * base[0]["toxicity"]], color="black",
                       marker="*", s=120, zorder=5, label="unsteered")
        label = _LABELS[util]
        if util.startswith("ppl") and base and max_ppl_factor:
            hi = base[0][util] * max_ppl_factor
            if max(r[util] for r in rows if util in r) > hi:
                lo = min(r[util] for r in rows if util in r)
                ax.set_xlim(lo - 0.03 * (hi - lo), hi)
                label += f"\n(axis cut at {max_ppl_factor:g}× the unsteered perplexity)"
        ax.set_xlabel(label)
        ax.set_ylabel("toxicity rate of continuations (%) ↓")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title or "Toxicity vs utility: dashed = no gate, solid = gated")
    spare = list(axes.flat[len(utilities):])
    if spare:  # an empty panel holds the legend
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, labels, loc="center", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
                   frameon=False)
        legend_rows = -(-len(labels) // 4)
        fig.tight_layout(rect=(0, min(0.4, (0.035 * legend_rows + 0.02) * 2 / nrows), 1, 0.95))
    p = Path(path)
    fig.savefig(p, dpi=130)
    plt.close(fig)
    return p
