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
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..recipe import Recipe
from .generation import GenerationConfig, evaluate_toxicity
from .mmlu import MMLUQuestion, evaluate_mmlu, model_choice_scorer, token_counter
from .pareto import best_within, interpolate_front, pareto_front
from .perplexity import conditional_perplexity, corpus_perplexity
from .toxicity import ToxicityScorer

POINTS_NAME = "points.jsonl"
CONFIG_NAME = "sweep.json"
BASE = "base"
# settings a resumed sweep may change (they add points, they do not change existing ones)
_EXTENDABLE = ("methods", "gates", "strengths", "seeds", "gate_variants")


@dataclass
class SweepData:
    """Everything a sweep evaluates on and fits from. Fit sets are drawn from the pools."""

    toxic_prompts: list[str]
    source_pool: list[str]
    target_pool: list[str]
    control_pool: list[str]
    benign_prompts: list[str] = field(default_factory=list)
    ppl_texts: list[str] = field(default_factory=list)
    ppl_prompts: list[str] = field(default_factory=list)
    ppl_continuations: list[str] = field(default_factory=list)
    mmlu_questions: dict[str, list[MMLUQuestion]] | None = None
    mmlu_shots: dict[str, list[MMLUQuestion]] | None = None
    description: dict[str, Any] = field(default_factory=dict)
    control_pools: dict[str, list[str]] = field(default_factory=dict)  # other named controls

    def sizes(self) -> dict[str, int]:
        return {
            "toxic_prompts": len(self.toxic_prompts),
            "benign_prompts": len(self.benign_prompts),
            "source_pool": len(self.source_pool),
            "target_pool": len(self.target_pool),
            "control_pool": len(self.control_pool),
            "ppl_texts": len(self.ppl_texts),
            "ppl_continuations": len(self.ppl_continuations),
            "mmlu_questions": sum(len(v) for v in (self.mmlu_questions or {}).values()),
            **{f"control_pool:{k}": len(v) for k, v in sorted(self.control_pools.items())},
        }

    def control(self, name: str | None) -> list[str]:
        """The control pool ``name`` (None: the default one)."""
        if name is None:
            return self.control_pool
        if name not in self.control_pools:
            raise ValueError(f"unknown control pool {name!r}; this data has: "
                             f"{', '.join(sorted(self.control_pools)) or 'only the default'}")
        return self.control_pools[name]


@dataclass
class SweepConfig:
    """``gates``: gate kinds or names of ``gate_variants``; a variant is a gate kind with its own
    options: ``{"gate": kind, "control": pool name, "fit_options": {FitOptions overrides}}``
    (``steerwise.eval.cli.parse_gate_variant`` reads them from ``NAME=KIND,key=value,...``)."""

    methods: list[str]
    gates: list[str] = field(default_factory=lambda: ["none", "dsas"])
    gate_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per method, or per "method+gate" (gated curves often need larger λ than ungated ones)
    strengths: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    n_fit: int = 32
    site: str = "residual"
    layers: str | None = None
    fit_options: dict[str, Any] = field(default_factory=dict)  # FitOptions fields, nested dicts ok
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scorer: str = "profanity-check"
    ppl_window: int = 256
    ppl_max_tokens: int | None = None
    mmlu_k: int = 5
    mmlu_scoring: str = "letter"
    mmlu_backend: str = "steerwise"  # or "lm-eval" (letter scoring; needs steerwise[harness])
    mmlu_max_length: int | None = None
    batch_size: int = 16

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def point_key(method: str, gate: str, seed: int, strength: float) -> str:
    return f"{method}|{gate}|{seed}|{float(strength):.6g}"


def read_points(out_dir: str | Path) -> list[dict[str, Any]]:
    """Points already written (a truncated last line from a kill is ignored)."""
    path = Path(out_dir) / POINTS_NAME
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping a truncated line (an interrupted write)")
    return points


def _drop_partial_line(out_dir: Path) -> None:
    """Cut a last line left unfinished by a kill, so new points start on a fresh line."""
    path = out_dir / POINTS_NAME
    if not path.is_file():
        return
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        warnings.warn(f"{path}: dropping a truncated last line (an interrupted write)")
        path.write_bytes(raw[: raw.rfind(b"\n") + 1])


def _append_point(out_dir: Path, point: dict[str, Any]) -> None:
    with (out_dir / POINTS_NAME).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(point, allow_nan=True) + "\n")
        fh.flush()


def _check_config(out_dir: Path, config: dict[str, Any], data_sizes: dict[str, int]) -> None:
    path = out_dir / CONFIG_NAME
    current = {"config": config, "data": data_sizes}
    if path.is_file():
        old = json.loads(path.read_text())
        # settings added since the sweep was written take their defaults
        defaults = {f.name: f.default for f in dataclasses.fields(SweepConfig)
                    if f.default is not dataclasses.MISSING}
        old_config = {**{k: v for k, v in defaults.items() if k in config},
                      **old.get("config", {})}
        a = {k: v for k, v in old_config.items() if k not in _EXTENDABLE}
        b = {k: v for k, v in config.items() if k not in _EXTENDABLE}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if old.get("data") != data_sizes:
            diff.append("data sizes")
        old_variants = old_config.get("gate_variants") or {}
        diff += [f"gate variant {n!r}" for n, v in config.get("gate_variants", {}).items()
                 if n in old_variants and old_variants[n] != v]
        if diff:
            raise ValueError(
                f"{out_dir} holds a sweep with other settings ({', '.join(diff)}): resume it with "
                f"the same settings, or write to another directory"
            )
        merged = old_config
        for k in _EXTENDABLE:
            if isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **config[k]}
            else:
                merged[k] = list(dict.fromkeys(list(merged.get(k, [])) + list(config[k])))
        current = {"config": merged, "data": data_sizes}
    path.write_text(json.dumps(current, indent=2) + "\n")


def draw_fit_sets(data: SweepData, n: int, seed: int, control: str | None = None
                  ) -> tuple[list[str], list[str], list[str]]:
    """``n`` source, target and control texts drawn (without replacement) with ``seed``;
    ``control`` names a control pool of the data (None: the default one)."""
    rng = random.Random(seed)
    out = []
    for name, pool in (("source", data.source_pool), ("target", data.target_pool),
                       ("control", data.control(control))):
        if len(pool) < n:
            raise ValueError(f"the {name} pool has {len(pool)} texts, fewer than n_fit={n}")
        out.append(rng.sample(pool, n))
    return out[0], out[1], out[2]


def gate_variant(gate: str, config: SweepConfig) -> dict[str, Any]:
    """The variant named ``gate`` (a plain gate kind is a variant with no options)."""
    variant = config.gate_variants.get(gate, {"gate": gate})
    return {"gate": variant.get("gate", gate), "control": variant.get("control"),
            "fit_options": dict(variant.get("fit_options", {}))}


def build_fit_options(method: str, gate: str, config: SweepConfig):
    """``FitOptions`` for one (method, gate or gate variant) with the sweep's overrides (nested
    dicts set fields of nested option dataclasses; ``per_method`` holds per-method overrides;
    a variant's own options come last)."""
    from ..fit import FitOptions

    variant = gate_variant(gate, config)
    opts = FitOptions(method=method, gate=variant["gate"], site=config.site, layers=config.layers,
                      batch_size=config.batch_size)
    overrides = dict(config.fit_options)
    per_method = overrides.pop("per_method", {}).get(method, {})
    return opts.updated(_merge(_merge(overrides, per_method), variant["fit_options"]),
                        "fit option (in the sweep's fit_options)")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, nested dicts merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def evaluate_point(
    model: nn.Module,
    tokenizer,
    data: SweepData,
    scorer: ToxicityScorer,
    config: SweepConfig,
    recipe: Recipe | None,
    strength: float,
    seed: int,
) -> dict[str, Any]:
    """All metrics of one (recipe, strength) under one generation seed."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    tox = evaluate_toxicity(model, tokenizer, data.toxic_prompts, scorer, recipe, strength,
                            config.generation, seeds=[seed])
    out.update(toxicity=tox.rate, toxicity_mean=tox.mean, n_toxic_prompts=tox.n,
               examples=tox.examples)
    if data.benign_prompts:
        ben = evaluate_toxicity(model, tokenizer, data.benign_prompts, scorer, recipe, strength,
                                config.generation, seeds=[seed], n_examples=0)
        out.update(benign_toxicity=ben.rate, benign_toxicity_mean=ben.mean)
    if data.ppl_texts:
        ppl = corpus_perplexity(model, tokenizer, data.ppl_texts, recipe, strength,
                                window=config.ppl_window, max_tokens=config.ppl_max_tokens,
                                batch_size=config.batch_size)
        out.update(ppl=ppl.perplexity, ppl_tokens=ppl.n_tokens)
    if data.ppl_prompts:
        cp = conditional_perplexity(model, tokenizer, data.ppl_prompts, data.ppl_continuations,
                                    recipe, strength, max_length=config.ppl_window,
                                    batch_size=config.batch_size)
        out.update(ppl_nontoxic=cp.perplexity, ppl_nontoxic_tokens=cp.n_tokens)
    if data.mmlu_questions and config.mmlu_backend == "lm-eval":
        from ..harness import mmlu_accuracy

        acc, n, _ = mmlu_accuracy(model, tokenizer, recipe, strength, data.mmlu_questions,
                                  data.mmlu_shots, k=config.mmlu_k, batch_size=config.batch_size,
                                  max_length=config.mmlu_max_length)
        out.update(mmlu=acc, mmlu_n=n, mmlu_backend="lm-eval")
    elif data.mmlu_questions:
        scorer_fn = model_choice_scorer(model, tokenizer, recipe, strength,
                                        max_length=config.mmlu_max_length,
                                        batch_size=config.batch_size)
        res = evaluate_mmlu(data.mmlu_questions, scorer_fn, shots=data.mmlu_shots,
                            k=config.mmlu_k, scoring=config.mmlu_scoring,  # type: ignore[arg-type]
                            normalize=False, token_counts=token_counter(tokenizer))
        out.update(mmlu=res.accuracy, mmlu_n=res.n, mmlu_backend="steerwise")
    out["seconds"] = time.perf_counter() - t0
    return out


def run_sweep(
    model: nn.Module,
    tokenizer,
    data: SweepData,
    config: SweepConfig,
    out_dir: str | Path,
    *,
    scorer: ToxicityScorer,
    progress: bool = True,
    log: Callable[[str], None] = print,
    fit_fn: Callable[..., Recipe] | None = None,
    eval_fn: Callable[..., dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a sweep; returns every point (old and new). ``fit_fn`` / ``eval_fn``
    replace fitting / evaluation (tests)."""
    from ..fit import fit as default_fit

    fit_fn = fit_fn or default_fit
    eval_fn = eval_fn or evaluate_point
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in config.methods:
        if m not in config.strengths or not config.strengths[m]:
            raise ValueError(f"no strength grid for method {m!r}")
    for g in config.gates:
        data.control(gate_variant(g, config)["control"])  # an unknown pool fails before any work
    _check_config(out, config.to_json(), data.sizes())
    _drop_partial_line(out)
    done = {point_key(p["method"], p["gate"], p["seed"], p["strength"]) for p in read_points(out)}

    todo: list[tuple[str, str, int, float]] = []
    for seed in config.seeds:
        todo.append((BASE, "none", seed, 0.0))
        for m in config.methods:
            for g in config.gates:
                grid = config.strengths.get(f"{m}+{g}", config.strengths[m])
                todo += [(m, g, seed, float(s)) for s in grid if s != 0]
    remaining = [t for t in todo if point_key(*t) not in done]
    if len(remaining) < len(todo):
        log(f"resuming: {len(todo) - len(remaining)} of {len(todo)} points already in {out}")
    recipes: dict[tuple[str, str, int], Recipe | None] = {}
    failures: dict[str, str] = {}
    bar = tqdm(total=len(remaining), desc="sweep", disable=not progress, unit="pt")
    for method, gate, seed, strength in remaining:
        bar.set_postfix_str(f"{method}+{gate} s{seed} λ={strength:g}")
        recipe = None
        if method != BASE:
            key = (method, gate, seed)
            if key not in recipes:
                recipes[key] = _fit_or_load(model, tokenizer, data, config, out, method, gate, seed,
                                            fit_fn, failures, log)
            recipe = recipes[key]
            if recipe is None:
                bar.update(1)
                continue
        metrics = eval_fn(model, tokenizer, data, scorer, config, recipe, strength, seed)
        point = {"method": method, "gate": gate, "seed": seed, "strength": strength, **metrics}
        _append_point(out, point)
        bar.update(1)
    bar.close()
    if failures:
        (out / "failures.json").write_text(json.dumps(failures, indent=2) + "\n")
        log(f"{len(failures)} fits failed: see {out / 'failures.json'}")
    return read_points(out)


def fit_sweep_recipe(model, tokenizer, data: SweepData, config: SweepConfig, method: str,
                     gate: str, seed: int, fit_fn: Callable[..., Recipe] | None = None
                     ) -> tuple[Recipe, list[warnings.WarningMessage]]:
    """The recipe of one (method, gate or gate variant, seed), fitted as a sweep fits it (fit
    sets drawn with ``seed`` from the variant's control pool), and the warnings of the fit."""
    from ..fit import fit as default_fit

    source, target, control = draw_fit_sets(data, config.n_fit, seed,
                                            gate_variant(gate, config)["control"])
    opts = build_fit_options(method, gate, config)
    opts.dsas = dataclasses.replace(opts.dsas, seed=seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = (fit_fn or default_fit)(model, tokenizer, source, control, target, opts,
                                         progress=False)
    recipe.fit_info["sweep_seed"] = seed
    recipe.fit_info["fit_seconds"] = time.perf_counter() - t0
    return recipe, list(caught)


def _fit_or_load(model, tokenizer, data, config, out: Path, method, gate, seed, fit_fn, failures,
                 log) -> Recipe | None:
    rdir = out / "recipes" / f"{method}__{gate}__seed{seed}"
    if (rdir / "steerwise.json").is_file():
        return Recipe.from_pretrained(rdir)
    try:
        recipe, caught = fit_sweep_recipe(model, tokenizer, data, config, method, gate, seed,
                                          fit_fn)
        for w in caught:
            if "truncated" not in str(w.message):
                log(f"[{method}+{gate} seed {seed}] warning: {w.message}")
        recipe.save_pretrained(rdir)
        return recipe
    except Exception as exc:  # noqa: BLE001 - one broken combination must not end a long sweep
        failures[f"{method}+{gate} seed {seed}"] = "".join(
            traceback.format_exception_only(type(exc), exc)).strip()
        log(f"fit of {method}+{gate} (seed {seed}) failed: {exc}")
        return None


# ---- aggregation -----------------------------------------------------------------------------
METRICS = ("toxicity", "toxicity_mean", "benign_toxicity", "benign_toxicity_mean", "ppl",
           "ppl_nontoxic", "mmlu")


def aggregate(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std) over seeds per (method, gate, strength). The shared base point (λ = 0) is
    copied into every (method, gate) curve so each front starts at the unsteered model."""
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
