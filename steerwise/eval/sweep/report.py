"""A sweep's tables: points.csv, summary.csv, summary.json and summary.md."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .analysis import METRICS, UTILITIES, aggregate, compare_gates, costs_at_toxicity, fronts


def write_tables(points: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """points.csv (every point), summary.csv (means over seeds), summary.json (+ fronts and the
    gate comparison)."""
    import csv

    out = Path(out_dir)
    cols = ["method", "gate", "seed", "strength", *METRICS, "seconds"]
    with (out / "points.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for p in points:
            w.writerow({k: p.get(k, "") for k in cols})
    rows = aggregate(points)
    scols = ["method", "gate", "strength", "n_seeds"]
    for k in METRICS:
        scols += [k, k + "_std"]
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=scols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, ""))
                        for k in scols})
    gates = sorted({r["gate"] for r in rows if r["gate"] != "none"})
    summary = {
        "rows": rows,
        "fronts": {u: fronts(rows, u) for u in UTILITIES if any(u in r for r in rows)},
        "costs": costs_at_toxicity(points),
        "comparison": [c for g in gates for c in compare_gates(rows, gate=g)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    (out / "summary.md").write_text(summary_markdown(rows, summary["comparison"],
                                                     summary["costs"]))
    return {"points": out / "points.csv", "summary": out / "summary.csv",
            "json": out / "summary.json", "markdown": out / "summary.md"}


def _fmt(v: Any, pct: bool = False, std: Any = None) -> str:
    if not isinstance(v, float) or math.isnan(v):
        return "–"
    text = f"{100 * v:.1f}" if pct else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
    if isinstance(std, float) and std > 0:
        text += f" ± {100 * std:.1f}" if pct else f" ± {std:.2g}"
    return text


def summary_markdown(rows: Sequence[dict[str, Any]], comparison: Sequence[dict[str, Any]],
                     costs: Sequence[dict[str, Any]] = ()) -> str:
    """Markdown tables: the cost of reaching 5 % / 1 % toxicity per (method, gate), every
    (method, gate, λ) mean ± std over seeds, and each gate against no gate within budgets."""
    lines: list[str] = []
    if costs:
        lines += [
            "What reaching a toxicity level costs, read where each λ path crosses it (seed-mean "
            "curve; ± = std over the seeds whose own path crosses; – = never reached):", "",
            ("| method | gate | toxicity ≤ | λ | in-domain ppl Δ % | WikiText ppl Δ % | "
             "benign tox. % (base) | MMLU % | seeds reached |"), "|" + "---|" * 9]
        for c in costs:
            def rel(key: str, c: dict[str, Any] = c) -> str:
                v = c.get(key)
                if not isinstance(v, float):
                    return "–"
                sd = c.get(key + "_std")
                return f"{100 * v:+.1f}" + (f" ± {100 * sd:.1f}" if isinstance(sd, float) else "")

            benign = (f"{_fmt(c.get('benign_toxicity'), True, c.get('benign_toxicity_std'))} "
                      f"({_fmt(c.get('benign_toxicity_base'), True)})"
                      if "benign_toxicity" in c else "–")
            lines.append(
                f"| {c['method']} | {c['gate']} | {100 * c['toxicity_target']:g} % | "
                f"{_fmt(c.get('strength'))} | {rel('ppl_nontoxic_increase')} | "
                f"{rel('ppl_increase')} | {benign} | "
                f"{_fmt(c.get('mmlu'), True, c.get('mmlu_std'))} | "
                f"{c['n_seeds_reached']}/{c['n_seeds']} |")
        lines.append("")
    header = ("| method | gate | λ | toxicity % | tox. mean score | benign tox. % | ppl | "
              "ppl non-toxic | MMLU % | seeds |")
    lines += [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['gate']} | {r['strength']:g} | "
            f"{_fmt(r.get('toxicity'), True, r.get('toxicity_std'))} | "
            f"{_fmt(r.get('toxicity_mean'))} | "
            f"{_fmt(r.get('benign_toxicity'), True, r.get('benign_toxicity_std'))} | "
            f"{_fmt(r.get('ppl'), False, r.get('ppl_std'))} | "
            f"{_fmt(r.get('ppl_nontoxic'), False, r.get('ppl_nontoxic_std'))} | "
            f"{_fmt(r.get('mmlu'), True, r.get('mmlu_std'))} | {r['n_seeds']} |")
    lines += ["", "Lowest toxicity (%) reachable within a utility budget (means over seeds):", "",
              ("| method | gate | budget | without gate | with gate | Δ (points) | front at budget: "
               "without | with gate | Δ (points) |"), "|" + "---|" * 9]

    def delta(d: float) -> str:
        return "–" if math.isnan(d) else f"{100 * d:+.1f}"

    for c in comparison:
        lines.append(f"| {c['method']} | {c['gate']} | {c['budget']} | "
                     f"{_fmt(c['toxicity_without'], True)} | {_fmt(c['toxicity_with'], True)} | "
                     f"{delta(c['difference'])} | {_fmt(c['toxicity_without_at'], True)} | "
                     f"{_fmt(c['toxicity_with_at'], True)} | {delta(c['difference_at'])} |")
    return "\n".join(lines) + "\n"
