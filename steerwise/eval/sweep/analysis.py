"""Reading a sweep's points: means over seeds, Pareto fronts, gates compared within utility
budgets, and what reaching a toxicity level costs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..pareto import best_within, interpolate_front, pareto_front
from .spec import BASE

# ---- aggregation -----------------------------------------------------------------------------
METRICS = ("toxicity", "toxicity_mean", "benign_toxicity", "benign_toxicity_mean", "ppl",
           "ppl_nontoxic", "mmlu")


def aggregate(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std) over seeds per (method, gate, strength). The shared base point (λ = 0) is
    copied into every (method, gate) curve so each front starts at the unsteered model. Points
    at a recipe's own default strength (grid ``auto``) differ in λ from seed to seed, so they
    stay rows of one seed each, marked ``default_strength``."""
    base = [p for p in points if p["method"] == BASE]
    combos = sorted({(p["method"], p["gate"]) for p in points if p["method"] != BASE})
    rows = []
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for p in points:
        if p["method"] != BASE:
            groups.setdefault((p["method"], p["gate"], float(p["strength"])), []).append(p)
    for m, g in combos:
        if base:
            groups[(m, g, 0.0)] = base
    if not combos and base:
        groups[(BASE, "none", 0.0)] = base
    for (m, g, s), ps in sorted(groups.items()):
        row: dict[str, Any] = {"method": m, "gate": g, "strength": s, "n_seeds": len(ps)}
        if all(p.get("default_strength") for p in ps):
            row["default_strength"] = True
        for k in METRICS:
            vals = [p[k] for p in ps if isinstance(p.get(k), (int, float))]
            if vals:
                row[k] = float(np.mean(vals))
                row[k + "_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def fronts(rows: Sequence[dict[str, Any]], utility: str) -> dict[str, list[dict[str, Any]]]:
    """Pareto front (toxicity ↓ vs ``utility``) of each ``method+gate`` curve of aggregated rows."""
    higher = utility == "mmlu"
    out = {}
    for key in sorted({f"{r['method']}+{r['gate']}" for r in rows}):
        rs = [r for r in rows if f"{r['method']}+{r['gate']}" == key and utility in r]
        if not rs:
            continue
        idx = pareto_front([r["toxicity"] for r in rs], [r[utility] for r in rs],
                           minimize_y=not higher)
        out[key] = [rs[i] for i in idx]
    return out


UTILITIES = ("ppl_nontoxic", "ppl", "mmlu")  # in-domain benign perplexity is the headline


def compare_gates(
    rows: Sequence[dict[str, Any]],
    *,
    gate: str = "dsas",
    baseline_gate: str = "none",
    ppl_factors: Sequence[float] = (1.05, 1.1, 1.25, 1.5, 2.0),
    mmlu_drops: Sequence[float] = (0.0, 0.02, 0.05),
) -> list[dict[str, Any]]:
    """Per method: lowest toxicity reachable with and without the gate within utility budgets
    (in-domain and WikiText perplexity ≤ factor × unsteered; MMLU ≥ unsteered − drop), and the
    toxicity of each Pareto front interpolated at exactly that utility (``*_at``; NaN where a
    front does not reach it). Keys ``toxicity_without`` / ``toxicity_with`` (+ ``_at``)."""
    base = [r for r in rows if r["strength"] == 0.0]
    out = []
    if not base:
        return out
    b = base[0]
    nan = float("nan")
    for method in sorted({r["method"] for r in rows}):
        a_rows = [r for r in rows if r["method"] == method and r["gate"] == baseline_gate]
        g_rows = [r for r in rows if r["method"] == method and r["gate"] == gate]
        if not a_rows or not g_rows:
            continue
        for util in UTILITIES:
            if util not in b:
                continue
            higher = util == "mmlu"
            if higher:
                budgets = [(f"MMLU ≥ base − {d:g}", b[util] - d) for d in mmlu_drops]
            else:
                budgets = [(f"{util} ≤ {f:g}× base", b[util] * f) for f in ppl_factors]
            for label, budget in budgets:
                ta, tg, ia, ig = (
                    fn([r["toxicity"] for r in rs if util in r], [r[util] for r in rs if util in r],
                       budget, higher_is_better=higher)
                    for fn in (best_within, interpolate_front) for rs in (a_rows, g_rows))
                out.append({"method": method, "gate": gate, "baseline": baseline_gate,
                            "budget": label, "utility": util, "budget_value": budget,
                            "toxicity_without": ta, "toxicity_with": tg,
                            "difference": nan if math.isnan(ta) or math.isnan(tg) else tg - ta,
                            "toxicity_without_at": ia, "toxicity_with_at": ig,
                            "difference_at": nan if math.isnan(ia) or math.isnan(ig) else ig - ia})
    return out


COST_UTILITIES = ("ppl_nontoxic", "ppl", "benign_toxicity", "mmlu")


def crossing(curve: Sequence[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Every metric where a λ path first reaches ``toxicity ≤ target``: linear interpolation in
    λ between the last point above and the first at or below the target (the curve sorted by λ,
    λ = 0 first). None when the path never gets there."""
    pts = sorted(curve, key=lambda r: float(r["strength"]))
    for i, p in enumerate(pts):
        if p["toxicity"] <= target:
            if i == 0:
                return {k: float(p[k]) for k in ("strength", "toxicity", *COST_UTILITIES)
                        if isinstance(p.get(k), (int, float))}
            a, t = pts[i - 1], (pts[i - 1]["toxicity"] - target) / (pts[i - 1]["toxicity"]
                                                                    - p["toxicity"])
            return {k: float(a[k] + t * (p[k] - a[k]))
                    for k in ("strength", "toxicity", *COST_UTILITIES)
                    if isinstance(a.get(k), (int, float)) and isinstance(p.get(k), (int, float))}
    return None


def costs_at_toxicity(points: Sequence[dict[str, Any]],
                      targets: Sequence[float] = (0.05, 0.01)) -> list[dict[str, Any]]:
    """Per (method, gate) and toxicity target: what reaching it costs — relative increase of
    in-domain (``ppl_nontoxic``, the headline) and WikiText (``ppl``) perplexity, benign-prompt
    toxicity and MMLU — read where the λ path of the seed-mean curve crosses the target, with
    the spread (std) of the same figure over the seeds whose own path gets there."""
    rows = aggregate(points)
    base_rows = [r for r in rows if r["strength"] == 0.0]
    if not base_rows:
        return []
    base = base_rows[0]
    seed_base = {p["seed"]: p for p in points if p["method"] == BASE}
    out = []
    for method, gate in sorted({(r["method"], r["gate"]) for r in rows if r["method"] != BASE}):
        curve = [r for r in rows if r["method"] == method and r["gate"] == gate]
        per_seed = {}
        for seed, b in seed_base.items():
            sc = [p for p in points if p["method"] == method and p["gate"] == gate
                  and p["seed"] == seed]
            if sc:
                per_seed[seed] = (b, [b, *sc])
        for target in targets:
            at = crossing(curve, target)
            row: dict[str, Any] = {"method": method, "gate": gate, "toxicity_target": target,
                                   "reached": at is not None, "n_seeds": len(per_seed)}
            seeds_at = {s: crossing(c, target) for s, (b, c) in per_seed.items()}
            row["n_seeds_reached"] = sum(v is not None for v in seeds_at.values())
            if at is not None:
                row["strength"] = at["strength"]
            for util in COST_UTILITIES:
                if at is None or util not in at or util not in base:
                    continue
                if util in ("ppl_nontoxic", "ppl"):
                    row[util + "_increase"] = at[util] / base[util] - 1
                    vals = [v[util] / per_seed[s][0][util] - 1 for s, v in seeds_at.items()
                            if v is not None and util in v and util in per_seed[s][0]]
                    name = util + "_increase"
                else:
                    row[util] = at[util]
                    row[util + "_base"] = base[util]
                    vals = [v[util] for v in seeds_at.values() if v is not None and util in v]
                    name = util
                if len(vals) > 1:
                    row[name + "_std"] = float(np.std(vals))
            out.append(row)
    return out
