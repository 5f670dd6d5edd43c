"""Is a model measurably above chance on MMLU? (issue 21: the fronts report MMLU only if so.)

5-shot letter scoring (the DSAS paper's protocol, steerwise's scorer) on the first N questions of
K subjects spread over the alphabet (the sweep's ``testbed`` preset picks the same subjects), the
model unsteered and, with ``--recipe DIR --strength L``, steered. Prints a table with the accuracy,
its 95 % Wilson interval and the one-sided binomial p-value against chance (0.25), and writes JSON.

    python benchmarks/real_mmlu.py --model models/gemma3-270m/hf --data-dir ../shared/data \\
        --subjects 10 --per-subject 20 --out benchmarks/results/mmlu-gemma3-270m.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from scipy.stats import binomtest


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from steerwise import Recipe, load_model
    from steerwise.eval.mmlu import evaluate_mmlu, list_subjects, load_mmlu, model_choice_scorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--per-subject", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--recipe", action="append", default=[],
                    help="NAME=DIR@STRENGTH: a steered row as well (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    mdir = Path(args.data_dir) / "mmlu"
    if not mdir.is_dir():
        print(f"error: no MMLU directory at {mdir}", file=sys.stderr)
        return 2
    subjects = list_subjects(mdir, "test")
    subjects = subjects[:: max(1, len(subjects) // args.subjects)][:args.subjects]
    questions = load_mmlu(mdir, "test", subjects, args.per_subject)
    shots = load_mmlu(mdir, "dev", subjects)
    model, tok = load_model(args.model)
    rows: list[tuple[str, Recipe | None, float | None]] = [("unsteered", None, None)]
    for spec in args.recipe:
        name, _, rest = spec.partition("=")
        path, _, strength = rest.rpartition("@")
        rows.append((name, Recipe.from_pretrained(path), float(strength)))

    results = []
    for name, recipe, strength in rows:
        t0 = time.perf_counter()
        scorer = model_choice_scorer(model, tok, recipe, strength, batch_size=args.batch_size,
                                     progress=True)
        res = evaluate_mmlu(questions, scorer, shots=shots, k=args.shots, scoring="letter")
        k = round(res.accuracy * res.n)
        lo, hi = wilson(k, res.n)
        p = binomtest(k, res.n, 0.25, alternative="greater").pvalue
        results.append({"row": name, "strength": strength, "accuracy": res.accuracy, "n": res.n,
                        "correct": k, "wilson95": [lo, hi], "p_above_chance": p,
                        "per_subject": res.per_subject,
                        "seconds": time.perf_counter() - t0})

    table = Table(title=f"MMLU, {args.shots}-shot letter scoring, {len(subjects)} subjects × "
                        f"≤ {args.per_subject} questions (chance 25 %)")
    for col in ("row", "λ", "accuracy", "95 % interval", "p (> chance)", "seconds"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        table.add_row(r["row"], "" if r["strength"] is None else f"{r['strength']:g}",
                      f"{r['accuracy']:.1%} ({r['correct']}/{r['n']})",
                      f"{r['wilson95'][0]:.1%}–{r['wilson95'][1]:.1%}",
                      f"{r['p_above_chance']:.2g}", f"{r['seconds']:.0f}")
    Console().print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "subjects": subjects,
                                        "shots": args.shots, "per_subject": args.per_subject,
                                        "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
