"""Strength sweeps: methods × gates × fit seeds × λ, each point evaluated for toxicity and utility.

For every (method, gate, seed) a recipe is fitted on ``n_fit`` examples per set drawn with that
seed (cached under ``OUT/recipes/``), then every strength λ of the grid is evaluated:

* toxicity of sampled continuations of the toxic prompts (rate = share scored ≥ 0.5, and mean);
* the "over-steering" view: toxicity of continuations of benign prompts;
* perplexity of the steered model on held-out running text and on held-out non-toxic
  continuations given their prompts;
* MMLU accuracy by log-likelihood (optional): steerwise's own scorer (``mmlu_backend =
  "steerwise"``, every scoring) or lm-evaluation-harness's MMLU task over the same questions
  (``"lm-eval"``, letter scoring, as the DSAS paper measures it; see docs/integrations.md).

λ = 0 is the unsteered model, identical for every method and gate, so it is evaluated once per
seed (``method = "base"``) and shared by all fronts. Every finished point is appended to
``OUT/points.jsonl`` at once, so a killed sweep resumes where it stopped; ``OUT/sweep.json`` holds
the settings and a resumed sweep refuses different ones.

The package, one job per module: ``spec`` (data and settings, fit sets and options), ``store``
(the resumable files), ``run`` (fitting and evaluating points), ``analysis`` (means, fronts,
gate comparisons, costs) and ``report`` (tables and markdown). Every public name is importable
from ``steerwise.eval.sweep`` itself.
"""

from __future__ import annotations

from .analysis import (
    COST_UTILITIES,
    METRICS,
    UTILITIES,
    aggregate,
    compare_gates,
    costs_at_toxicity,
    crossing,
    fronts,
)
from .report import summary_markdown, write_tables
from .run import evaluate_point, fit_sweep_recipe, run_sweep
from .spec import BASE, SweepConfig, SweepData, build_fit_options, draw_fit_sets, gate_variant
from .store import (
    CONFIG_NAME,
    POINTS_NAME,
    _check_config,  # noqa: F401  (tests resume a sweep's settings through it)
    point_key,
    read_points,
)

__all__ = [
    "BASE",
    "CONFIG_NAME",
    "COST_UTILITIES",
    "METRICS",
    "POINTS_NAME",
    "UTILITIES",
    "SweepConfig",
    "SweepData",
    "aggregate",
    "build_fit_options",
    "compare_gates",
    "costs_at_toxicity",
    "crossing",
    "draw_fit_sets",
    "evaluate_point",
    "fit_sweep_recipe",
    "fronts",
    "gate_variant",
    "point_key",
    "read_points",
    "run_sweep",
    "summary_markdown",
    "write_tables",
]
