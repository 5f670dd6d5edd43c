"""Toxicity at equal in-domain perplexity, per seed and over seeds, from a sweep's points.

    python benchmarks/real_fronts.py benchmarks/results/real-caa [--gates dsas,skip]
        [--budgets 1.05,1.1,1.2] [--seeds 0,1,2] [--method caa]
        [--out benchmarks/results/real-caa/fronts.json]

For each gate against no gate (same method): the Pareto front of toxicity vs in-domain perplexity
(``ppl_nontoxic``) read at ``budget × unsteered`` (``steerwise.eval.sweep.compare_gates``). The
seed-mean front uses only the λ values every seed has (a λ measured on one seed would otherwise
enter the mean as if it were one); each seed's own front uses the same λ values. Where a front
ends below the budget, its last point within it is taken. ``--seeds`` keeps those seeds only (a
screen run on one seed), ``--method`` one method's points (and the unsteered ones). Prints a
table and writes JSON. Points at a recipe's own default strength (a sweep's grid ``auto``) are
listed per seed with the ungated front (and each ``--gates`` front) read at their perplexity: is
the default strength on the front, and within which budget?
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.eval.pareto import interpolate_front
from steerwise.eval.sweep.analysis import aggregate, compare_gates
from steerwise.eval.sweep.spec import BASE


def common_points(points: list[dict]) -> list[dict]:
    """Base points and the (method, gate, λ) every seed has."""
    seeds = {p["seed"] for p in points}
    have: dict[tuple, set] = {}
    for p in points:
        have.setdefault((p["method"], p["gate"], p["strength"]), set()).add(p["seed"])
    return [p for p in points if p["method"] == BASE
            or have[(p["method"], p["gate"], p["strength"])] == seeds]


def reading(points: list[dict], gates: list[str], budgets: list[float],
            baseline: str = "none") -> dict[str, dict]:
    """{f"{gate}@{budget}": toxicity} plus the ungated "none@{budget}" (the ``baseline`` gate's
    front), for one set of points."""
    rows = aggregate(points)
    base = next(r["ppl_nontoxic"] for r in rows if r["strength"] == 0.0)
    out: dict[str, float] = {}
    for gate in gates:
        for c in compare_gates(rows, gate=gate, baseline_gate=baseline, ppl_factors=budgets):
            if c["utility"] != "ppl_nontoxic":
                continue
            budget = c["budget_value"] / base
            for name, at, best in ((gate, "toxicity_with_at", "toxicity_with"),
                                   ("none", "toxicity_without_at", "toxicity_without")):
                v = c[at] if not math.isnan(c[at]) else c[best]
                out[f"{name}@{budget:.3g}"] = v
    return out


def at_defaults(points: list[dict], gates: list[str], baseline: str = "none") -> list[dict]:
    """Each default-strength point with its in-domain perplexity change and the toxicity of the
    ungated front and of each gate's front of its seed at that perplexity (NaN: off the front's
    range)."""
    out = []
    for p in sorted((p for p in points if p.get("default_strength")),
                    key=lambda p: (p["gate"], p["seed"])):
        mine = [q for q in points if q["seed"] == p["seed"] and not q.get("default_strength")]
        base = next(q for q in mine if q["method"] == BASE)
        row = {"gate": p["gate"], "seed": p["seed"], "strength": p["strength"],
               "toxicity": p["toxicity"], "unsteered_toxicity": base["toxicity"],
               "ppl_change": p["ppl_nontoxic"] / base["ppl_nontoxic"] - 1}
        for g in ["none", *gates]:
            curve = [q for q in mine
                     if q["method"] == BASE or q["gate"] == (baseline if g == "none" else g)]
            row[f"{g}_front"] = interpolate_front([q["toxicity"] for q in curve],
                                                  [q["ppl_nontoxic"] for q in curve],
                                                  p["ppl_nontoxic"], higher_is_better=False)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a sweep's output directory (with points.jsonl)")
    ap.add_argument("--gates", default="dsas,skip", help="gates to read against no gate")
    ap.add_argument("--budgets", default="1.05,1.1,1.2",
                    help="in-domain perplexity budgets, × unsteered")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds to keep (default: all)")
    ap.add_argument("--method", default="caa", help="the method whose fronts are read")
    ap.add_argument("--baseline", default="none",
                    help="the ungated curve's gate name (e.g. a 'none' variant; default: none)")
    ap.add_argument("--out", default=None, help="JSON to write (default: SWEEP/fronts.json)")
    args = ap.parse_args(argv)
    sweep = Path(args.sweep)
    points = [json.loads(line) for line in (sweep / "points.jsonl").open()]
    points = [p for p in points if p["method"] in (BASE, args.method)]
    if args.seeds:
        keep = {int(x) for x in args.seeds.split(",")}
        points = [p for p in points if p["seed"] in keep]
    gates, budgets = args.gates.split(","), [float(b) for b in args.budgets.split(",")]
    common = common_points(points)
    seeds = sorted({p["seed"] for p in points})
    result = {"mean": reading(common, gates, budgets, args.baseline),
              "seeds": {s: reading([p for p in common if p["seed"] == s], gates, budgets,
                                   args.baseline)
                        for s in seeds}}
    print(f"toxicity % at equal in-domain perplexity ({sweep}; seed mean, seeds {seeds} in "
          f"brackets)")
    print("| in-domain ppl ≤ | " + " | ".join(["none", *gates]) + " |")
    print("|---" * (len(gates) + 2) + "|")
    for b in budgets:
        cells = []
        for g in ["none", *gates]:
            key = f"{g}@{b:.3g}"
            per = " / ".join(f"{100 * result['seeds'][s][key]:.0f}" for s in seeds)
            cells.append(f"{100 * result['mean'][key]:.1f} % ({per})")
        print(f"| {b:g}× | " + " | ".join(cells) + " |")
    defaults = at_defaults(points, gates, args.baseline)
    if defaults:
        result["defaults"] = defaults
        print("\nat the recipe's default strength (grid 'auto'), and the fronts read at its "
              "in-domain perplexity")
        print("| gate | seed | λ | toxicity (unsteered) | in-domain ppl Δ | "
              + " | ".join(f"{g} front" for g in ["none", *gates]) + " |")
        print("|---" * (len(gates) + 6) + "|")
        for r in defaults:
            fronts = " | ".join("–" if math.isnan(r[f"{g}_front"]) else
                                f"{100 * r[f'{g}_front']:.1f} %" for g in ["none", *gates])
            print(f"| {r['gate']} | {r['seed']} | {r['strength']:g} | "
                  f"{100 * r['toxicity']:.0f} % ({100 * r['unsteered_toxicity']:.0f} %) | "
                  f"{100 * r['ppl_change']:+.1f} % | {fronts} |")
    out = Path(args.out) if args.out else sweep / "fronts.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
