"""Running a sweep: fit (or load) each (method, gate, seed) recipe, evaluate every strength of its
grid, append each point as it finishes."""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ...recipe import Recipe
from ...strength import AUTO
from ..generation import evaluate_toxicity, score_continuations, truncate_left
from ..mmlu import evaluate_mmlu, model_choice_scorer, token_counter
from ..perplexity import conditional_perplexity, corpus_perplexity
from ..toxicity import ToxicityScorer
from .engines import SampleRequest, VllmSampler, request_seed
from .spec import BASE, SweepConfig, SweepData, build_fit_options, draw_fit_sets, gate_variant
from .store import (
    _append_point,
    _check_config,
    _drop_partial_line,
    append_samples,
    point_key,
    read_points,
    read_samples,
)

Point = tuple[str, str, int, float]  # (method, gate, seed, strength)


def evaluate_point(
    model: nn.Module,
    tokenizer,
    data: SweepData,
    scorer: ToxicityScorer,
    config: SweepConfig,
    recipe: Recipe | None,
    strength: float,
    seed: int,
    samples: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """All metrics of one (recipe, strength) under one generation seed. ``samples``: the
    continuations of the toxic and benign prompts (``{"toxic": [...], "benign": [...]}``) when
    another engine sampled them; None samples them here with the HF model."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if samples is not None:
        tox = score_continuations(data.toxic_prompts, [samples["toxic"]], scorer)
    else:
        tox = evaluate_toxicity(model, tokenizer, data.toxic_prompts, scorer, recipe, strength,
                                config.generation, seeds=[seed])
    out.update(toxicity=tox.rate, toxicity_mean=tox.mean, n_toxic_prompts=tox.n,
               examples=tox.examples)
    if data.benign_prompts:
        if samples is not None:
            ben = score_continuations(data.benign_prompts, [samples["benign"]], scorer,
                                      n_examples=0)
        else:
            ben = evaluate_toxicity(model, tokenizer, data.benign_prompts, scorer, recipe,
                                    strength, config.generation, seeds=[seed], n_examples=0)
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
        from ...harness import mmlu_accuracy

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
    sampler: VllmSampler | None = None,
    points_per_batch: int = 16,
) -> list[dict[str, Any]]:
    """Run (or resume) a sweep; returns every point (old and new). ``fit_fn`` / ``eval_fn``
    replace fitting / evaluation (tests).

    With a ``sampler`` (``config.engine == "vllm"``) every recipe is fitted first, then the
    continuations of ``points_per_batch`` points at a time are sampled as one batch of the
    engine and kept in ``OUT/samples.jsonl`` (so an interrupted sweep does not sample them
    again); scoring, perplexity and MMLU then run on the HF model point by point."""
    from ...fit import fit as default_fit

    fit_fn = fit_fn or default_fit
    eval_fn = eval_fn or evaluate_point
    out = Path(out_dir)
    if (sampler is None) != (config.engine == "hf"):
        raise ValueError(f"config.engine is {config.engine!r} but "
                         f"{'no' if sampler is None else 'a'} sampler was given")
    out.mkdir(parents=True, exist_ok=True)
    for m in config.methods:
        if m not in config.strengths or not config.strengths[m]:
            raise ValueError(f"no strength grid for method {m!r}")
    for g in config.gates:  # an unknown pool fails before any work
        variant = gate_variant(g, config)
        for kind in ("source", "target", "control"):
            data.pool(kind, variant[kind])
    _check_config(out, config.to_json(), data.sizes())
    _drop_partial_line(out)
    done = {point_key(p["method"], p["gate"], p["seed"], p["strength"]) for p in read_points(out)}

    recipes: dict[tuple[str, str, int], Recipe | None] = {}
    failures: dict[str, str] = {}

    def recipe_of(method: str, gate: str, seed: int) -> Recipe | None:
        key = (method, gate, seed)
        if key not in recipes:
            recipes[key] = _fit_or_load(model, tokenizer, data, config, out, method, gate, seed,
                                        fit_fn, failures, log)
        return recipes[key]

    todo: list[Point] = []
    at_default: set[str] = set()  # keys of the points at a recipe's default strength ("auto")
    for seed in config.seeds:
        todo.append((BASE, "none", seed, 0.0))
        for m in config.methods:
            for g in config.gates:
                for s in config.strengths.get(f"{m}+{g}", config.strengths[m]):
                    if s == AUTO:  # the recipe's default strength: known once it is fitted
                        recipe = recipe_of(m, g, seed)
                        if recipe is None:
                            continue
                        s = recipe.default_strength
                        at_default.add(point_key(m, g, seed, float(s)))
                        log(f"[{m}+{g} seed {seed}] default strength (auto): λ = {s:g}")
                    if s != 0 and (m, g, seed, float(s)) not in todo:
                        todo.append((m, g, seed, float(s)))
    remaining = [t for t in todo if point_key(*t) not in done]
    if len(remaining) < len(todo):
        log(f"resuming: {len(todo) - len(remaining)} of {len(todo)} points already in {out}")

    samples: dict[str, dict[str, Any]] = {}
    if sampler is not None and remaining:
        samples = _sample_with_engine(sampler, tokenizer, data, config, out, remaining,
                                      recipe_of, points_per_batch, progress, log)
    bar = tqdm(total=len(remaining), desc="sweep", disable=not progress, unit="pt")
    for method, gate, seed, strength in remaining:
        bar.set_postfix_str(f"{method}+{gate} s{seed} λ={strength:g}")
        recipe = None if method == BASE else recipe_of(method, gate, seed)
        if method != BASE and recipe is None:
            bar.update(1)
            continue
        extra: dict[str, Any] = {}
        if sampler is not None:
            got = samples[point_key(method, gate, seed, strength)]
            extra = {"engine": got["engine"], "sample_seconds": got["seconds"]}
            metrics = eval_fn(model, tokenizer, data, scorer, config, recipe, strength, seed,
                              samples=got)
            metrics["seconds"] = metrics["seconds"] + got["seconds"]
        else:
            metrics = eval_fn(model, tokenizer, data, scorer, config, recipe, strength, seed)
        point = {"method": method, "gate": gate, "seed": seed, "strength": strength, **metrics,
                 **extra}
        if point_key(method, gate, seed, strength) in at_default:
            point["default_strength"] = True
        _append_point(out, point)
        bar.update(1)
    bar.close()
    if failures:
        (out / "failures.json").write_text(json.dumps(failures, indent=2) + "\n")
        log(f"{len(failures)} fits failed: see {out / 'failures.json'}")
    return read_points(out)


def _recipe_dir(out: Path, method: str, gate: str, seed: int) -> Path:
    return out / "recipes" / f"{method}__{gate}__seed{seed}"


def _sample_with_engine(sampler: VllmSampler, tokenizer, data: SweepData, config: SweepConfig,
                        out: Path, remaining: list[Point],
                        recipe_of: Callable[[str, str, int], Recipe | None],
                        points_per_batch: int, progress: bool, log: Callable[[str], None]
                        ) -> dict[str, dict[str, Any]]:
    """The continuations of every remaining point ({point key: {"toxic", "benign", "engine",
    "seconds"}}), sampled by ``sampler`` where ``OUT/samples.jsonl`` does not hold them yet."""
    samples = read_samples(out)
    need: list[Point] = []
    engine_recipes: dict[str, Path] = {}
    for t in tqdm(remaining, desc="fit", disable=not progress, leave=False, unit="pt"):
        method, gate, seed, _ = t
        if method != BASE:
            if recipe_of(method, gate, seed) is None:
                continue  # a failed fit: the point is skipped, as on the HF path
            rdir = _recipe_dir(out, method, gate, seed)
            engine_recipes[rdir.name] = rdir
        if point_key(*t) not in samples:
            need.append(t)
    if not need:
        return samples
    if len(need) < len(remaining):
        log(f"{len(remaining) - len(need)} points have their continuations in "
            f"{out / 'samples.jsonl'} already")
    prompts = truncate_left(tokenizer, list(data.toxic_prompts) + list(data.benign_prompts),
                            config.generation.max_prompt_tokens)
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    t0 = time.perf_counter()
    sampler.open(engine_recipes, max_model_len=longest + config.generation.max_new_tokens)
    log(f"vLLM engine started with {len(engine_recipes)} recipes in "
        f"{time.perf_counter() - t0:.0f} s; sampling {len(need)} points, {len(prompts)} prompts "
        f"each, {points_per_batch} points a batch")
    n_toxic = len(data.toxic_prompts)
    try:
        for start in tqdm(range(0, len(need), points_per_batch), desc="sample (vllm)",
                          disable=not progress, unit="batch"):
            chunk = need[start:start + points_per_batch]
            requests = [
                SampleRequest(p, None if method == BASE else _recipe_dir(out, method, gate,
                                                                        seed).name,
                              strength, request_seed(seed, i))
                for method, gate, seed, strength in chunk for i, p in enumerate(prompts)
            ]
            t1 = time.perf_counter()
            texts = sampler.sample(requests, config.generation)
            share = (time.perf_counter() - t1) / len(chunk)
            rows = []
            for k, t in enumerate(chunk):
                mine = texts[k * len(prompts):(k + 1) * len(prompts)]
                row = {"key": point_key(*t), "engine": "vllm", "seconds": share,
                       "toxic": mine[:n_toxic], "benign": mine[n_toxic:]}
                samples[row["key"]] = row
                rows.append(row)
            append_samples(out, rows)
    finally:
        sampler.close()
    return samples


def fit_sweep_recipe(model, tokenizer, data: SweepData, config: SweepConfig, method: str,
                     gate: str, seed: int, fit_fn: Callable[..., Recipe] | None = None
                     ) -> tuple[Recipe, list[warnings.WarningMessage]]:
    """The recipe of one (method, gate or gate variant, seed), fitted as a sweep fits it (fit
    sets drawn with ``seed`` from the variant's pools), and the warnings of the fit."""
    from ...fit import fit as default_fit

    variant = gate_variant(gate, config)
    source, target, control = draw_fit_sets(data, config.n_fit, seed, variant["control"],
                                            source=variant["source"], target=variant["target"])
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
    rdir = _recipe_dir(out, method, gate, seed)
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
