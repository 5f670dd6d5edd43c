"""Pareto-front plots: toxicity vs perplexity and toxicity vs MMLU, one colour per method,
dashed without DSAS and solid with it (other gates dotted); every evaluated point faint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .pareto import pareto_front

_LINESTYLES = {"none": "--", "dsas": "-", "dsas-adaptive": "-."}


def plot_fronts(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    max_ppl_factor: float | None = 2.5,
) -> Path:
    """Write a PNG with one panel per available utility (perplexity, MMLU)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    utilities = [u for u in ("ppl", "mmlu") if any(u in r for r in rows)]
    if not utilities:
        raise ValueError("no utility measure (ppl, mmlu) in the rows to plot")
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab10")
    colours = {m: cmap(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(utilities), figsize=(6.2 * len(utilities), 4.8), squeeze=False)
    for ax, util in zip(axes[0], utilities):
        higher = util == "mmlu"
        for m in methods:
            for g in sorted({r["gate"] for r in rows if r["method"] == m}):
                rs = [r for r in rows if r["method"] == m and r["gate"] == g and util in r]
                if not rs:
                    continue
                xs = [r[util] for r in rs]
                ys = [100 * r["toxicity"] for r in rs]
                ax.scatter(xs, ys, color=colours[m], alpha=0.25, s=14,
                           marker="o" if g != "none" else "x")
                idx = pareto_front([r["toxicity"] for r in rs], xs, minimize_y=not higher)
                idx = sorted(idx, key=lambda i: xs[i])
                label = m if g == "none" else f"{m} + {g.upper()}"
                ax.plot([xs[i] for i in idx], [ys[i] for i in idx], color=colours[m],
                        linestyle=_LINESTYLES.get(g, ":"), marker="o", ms=4, lw=1.8, label=label)
        base = [r for r in rows if r.get("strength") == 0.0 and util in r]
        if base:
            ax.scatter([base[0][util]], [100 * base[0]["toxicity"]], color="black", marker="*",
                       s=120, zorder=5, label="unsteered")
        if util == "ppl":
            label = "perplexity of the steered model (held-out text) ↓"
            if base and max_ppl_factor:
                hi = base[0][util] * max_ppl_factor
                if max(r[util] for r in rows if util in r) > hi:
                    lo = min(r[util] for r in rows if util in r)
                    ax.set_xlim(lo - 0.03 * (hi - lo), hi)
                    label += f"\n(axis cut at {max_ppl_factor:g}× the unsteered perplexity)"
            ax.set_xlabel(label)
        else:
            ax.set_xlabel("MMLU accuracy (log-likelihood) ↑")
        ax.set_ylabel("toxicity rate of continuations (%) ↓")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
               frameon=False)
    fig.suptitle(title or "Toxicity vs utility: dashed = without DSAS, solid = with DSAS")
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) // 6), 1, 0.95))
    p = Path(path)
    fig.savefig(p, dpi=130)
    plt.close(fig)
    return p
