"""``steerwise sweep``: check DSAS's claim — a better toxicity/utility Pareto front for every base
method — on any causal LM, in one command.

Data come either from files (``--toxic-prompts``, ``--source``, ``--target``, ``--control``,
optional ``--benign-prompts``, ``--ppl-text``, ``--ppl-continuations``, ``--mmlu-dir``) or from
the ``--preset testbed`` layout of a data directory (see ``steerwise.eval.data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..strength import AUTO

console = Console()

# strength grids per method (λ = 0, the unsteered model, is always added)
DEFAULT_GRIDS: dict[str, list[float]] = {
    "caa": [0.5, 1, 2, 4, 8],
    "iti": [1, 2, 4, 8, 16],
    "mean-act": [0.2, 0.4, 0.6, 0.8, 1.0],
    "linear-act": [0.2, 0.4, 0.6, 0.8, 1.0],
    "lineas": [0.2, 0.4, 0.6, 0.8, 1.0],
}
FALLBACK_GRID = [0.5, 1, 2, 4, 8]
QUICK: dict[str, int] = {
    "n_toxic": 24, "n_benign": 12, "ppl_max_tokens": 2000, "n_ppl_continuations": 40,
    "mmlu_subjects": 4, "mmlu_per_subject": 10, "grid_points": 3, "lineas_steps": 100,
}


def _floats(text: str) -> list[float | str]:
    """Comma-separated strengths; ``auto`` stands for each recipe's default strength."""
    values: list[float | str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item.lower() == AUTO:
            values.append(AUTO)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--grid: expected comma-separated numbers or 'auto', got "
                             f"{text!r}") from None
    bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"--grid: strengths must be finite numbers, got {bad[0]} in {text!r}")
    return values


def parse_grids(specs: list[str] | None, methods: list[str],
                gates: list[str] | None = None) -> dict[str, list[float | str]]:
    """``--grid 0.5,1,2`` (all methods), ``--grid caa=0.5,1,2`` (one method) or
    ``--grid caa+none=0.1,0.2`` (one method with one gate), repeatable. ``auto`` in a grid is
    the default strength each recipe's fit chooses (``fit --strength auto``), evaluated as a
    point of its own."""
    grids: dict[str, list[float | str]] = {m: list(DEFAULT_GRIDS.get(m, FALLBACK_GRID))
                                           for m in methods}
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        if sep:
            method, plus, gate = name.partition("+")
            if method not in methods:
                raise ValueError(f"--grid names method {method!r}, which is not swept")
            if plus and gate not in (gates or []):
                raise ValueError(f"--grid names gate {gate!r}, which is not swept")
            grids[name] = _floats(values)
        else:
            for m in methods:
                grids[m] = _floats(name)
    for m, g in grids.items():
        numbers = [v for v in g if v != AUTO]
        if not g or any(v < 0 for v in numbers):  # type: ignore[operator]
            raise ValueError(f"strength grid of {m!r} must be non-negative numbers or 'auto': "
                             f"{g}")
        grids[m] = [*sorted({0.0, *numbers}), *([AUTO] if AUTO in g else [])]  # type: ignore
    return grids


def _value(text: str) -> Any:
    """A ``key=value`` value: JSON (numbers, true/false, null) or else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_gate_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME=KIND[,key=value,...]`` → (name, variant). Keys: ``control``, ``source``,
    ``target`` (a named pool of the data), ``section.field`` (a field of a nested fit option,
    e.g. ``e2e.activation=relu``),
    a ``DSASOptions`` field (e.g. ``train_on=tokens``), or another ``FitOptions`` field."""
    from ..fit import GATES, FitOptions
    from ..gates.dsas import DSASOptions

    name, sep, rest = spec.partition("=")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not sep or not name or not parts:
        raise ValueError(f"--gate-variant: expected NAME=KIND[,key=value,...], got {spec!r}")
    kind, settings = parts[0], parts[1:]
    if kind not in GATES:
        raise ValueError(f"--gate-variant {name}: unknown gate kind {kind!r}; known: "
                         f"{', '.join(GATES)}")
    variant: dict[str, Any] = {"gate": kind, "fit_options": {}}
    dsas_fields = {f.name for f in dataclasses.fields(DSASOptions)}
    fit_fields = {f.name for f in dataclasses.fields(FitOptions)}
    for item in settings:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--gate-variant {name}: expected key=value, got {item!r}")
        value, opts = _value(raw), variant["fit_options"]
        if key in ("control", "source", "target"):
            variant[key] = raw
        elif "." in key:
            section, field_ = key.split(".", 1)
            if section not in fit_fields:
                raise ValueError(f"--gate-variant {name}: unknown fit option {section!r}")
            opts.setdefault(section, {})[field_] = value
        elif key in dsas_fields:
            opts.setdefault("dsas", {})[key] = value
        elif key in fit_fields:
            opts[key] = value
        else:
            raise ValueError(f"--gate-variant {name}: unknown option {key!r} (a DSASOptions or "
                             f"FitOptions field, 'section.field', 'control', 'source' or "
                             f"'target')")
    return name, variant


def _cmd_sweep(args: argparse.Namespace) -> int:
    import torch

    from ..maps import MAP_REGISTRY
    from ..models import load_model
    from .generation import GenerationConfig
    from .mmlu import resolve_mmlu_backend
    from .plots import plot_fronts
    from .sweep import SweepConfig, aggregate, run_sweep, write_tables
    from .toxicity import load_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    methods = args.methods.split(",") if args.methods else sorted(MAP_REGISTRY)
    unknown = [m for m in methods if m not in MAP_REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(sorted(MAP_REGISTRY))}")
    from ..fit import GATES

    variants = dict(parse_gate_variant(v) for v in args.gate_variant or [])
    gates = args.gates.split(",")
    bad = [g for g in gates if g not in GATES and g not in variants]
    if bad:
        raise ValueError(f"unknown gates {bad}; known: {', '.join(GATES)} and the variants "
                         f"given with --gate-variant ({', '.join(variants) or 'none'})")
    grids = parse_grids(args.grid, methods, gates)
    if quick and not args.grid:
        grids = {m: [0.0] + [v for v in g if v][1::2][:QUICK["grid_points"]]
                 for m, g in grids.items()}
    seeds = args.seeds or ([0] if quick else [0, 1])

    data = _load_data(args, quick)
    fit_options: dict = {"pooling": args.pooling}
    steps = args.lineas_steps or (QUICK["lineas_steps"] if quick else None)
    if steps:
        fit_options["lineas"] = {"steps": steps}
    config = SweepConfig(
        methods=methods, gates=gates, gate_variants=variants, strengths=grids, seeds=seeds, n_fit=args.n_fit,
        site=args.site, layers=args.layers, fit_options=fit_options,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                                    temperature=args.temperature,
                                    repetition_penalty=args.repetition_penalty,
                                    batch_size=args.batch_size,
                                    max_prompt_tokens=args.max_prompt_tokens),
        scorer=args.scorer,
        ppl_window=args.ppl_window,
        ppl_max_tokens=args.ppl_max_tokens or (QUICK["ppl_max_tokens"] if quick else None),
        mmlu_k=args.mmlu_shots, mmlu_scoring=args.mmlu_scoring,
        mmlu_backend=resolve_mmlu_backend(args.mmlu_backend, args.mmlu_scoring),
        mmlu_max_length=args.mmlu_max_length, batch_size=args.batch_size, engine=args.engine,
    )
    out = Path(args.out)
    sampler = None
    if args.engine == "vllm":  # before any loading: a missing vLLM or a .gguf model fails now
        from .sweep.engines import VllmSampler

        sampler = VllmSampler(args.model, dtype=args.dtype)
    console.print(f"[bold]steerwise sweep[/]: methods {', '.join(methods)} × gates "
                  f"{', '.join(gates)} × seeds {seeds}; data {data.sizes()}")
    scorer = load_scorer(args.scorer, device=args.device)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file)
    t0 = time.perf_counter()
    points = run_sweep(model, tok, data, config, out, scorer=scorer, progress=not args.no_progress,
                       log=lambda s: console.print(s, markup=False), sampler=sampler,
                       points_per_batch=args.points_per_batch)
    files = write_tables(points, out)
    rows = aggregate(points)
    png = plot_fronts(rows, out / "pareto.png",
                      title=f"{Path(args.model).name}: toxicity vs utility "
                            f"(dashed = no gate, solid = gated)")
    (out / "data.json").write_text(json.dumps(data.description or data.sizes(), indent=2) + "\n")
    console.print(_costs_table(json.loads(files["json"].read_text())["costs"]))
    console.print(f"{len(points)} points in {time.perf_counter() - t0:.0f} s → "
                  f"{files['points']}, {files['summary']}, {files['json']}, {png}")
    return 0


def _costs_table(costs: list[dict]) -> Table:
    table = Table(title="what reaching a toxicity level costs (seed-mean λ path; ± std over seeds)")
    for col in ("method", "gate", "tox ≤", "λ", "in-domain ppl Δ", "WikiText ppl Δ",
                "benign tox", "seeds"):
        table.add_column(col, justify="left" if col in ("method", "gate") else "right")

    def rel(c: dict, key: str) -> str:
        v, sd = c.get(key), c.get(key + "_std")
        if v is None:
            return "-"
        return f"{100 * v:+.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")

    for c in costs:
        benign = c.get("benign_toxicity")
        table.add_row(c["method"], c["gate"], f"{100 * c['toxicity_target']:g}%",
                      "-" if c.get("strength") is None else f"{c['strength']:.3g}",
                      rel(c, "ppl_nontoxic_increase"), rel(c, "ppl_increase"),
                      "-" if benign is None else f"{100 * benign:.1f}%",
                      f"{c['n_seeds_reached']}/{c['n_seeds']}")
    return table


def _load_data(args: argparse.Namespace, quick: bool):
    from ..data import load_texts, read_text
    from .data import read_jsonl, testbed_data
    from .generation import load_prompts
    from .mmlu import list_subjects, load_mmlu
    from .sweep import SweepData

    n_toxic = args.n_toxic or (QUICK["n_toxic"] if quick else 100)
    n_benign = args.n_benign if args.n_benign is not None else (QUICK["n_benign"] if quick else 50)
    n_subj = args.mmlu_subjects if args.mmlu_subjects is not None else (
        QUICK["mmlu_subjects"] if quick else 10)
    per_subj = args.mmlu_per_subject or (QUICK["mmlu_per_subject"] if quick else 20)
    if args.preset == "testbed":
        if not args.data_dir:
            raise ValueError("--preset testbed needs --data-dir (the shared data directory)")
        return testbed_data(
            args.data_dir, n_toxic=n_toxic, n_benign=n_benign,
            n_ppl_continuations=args.n_ppl_continuations or (
                QUICK["n_ppl_continuations"] if quick else 200),
            mmlu_subjects=n_subj or None, mmlu_per_subject=per_subj, mmlu_dir=args.mmlu_dir,
            control=args.control_pool,
        )
    missing = [f for f in ("toxic_prompts", "source", "target", "control") if not getattr(args, f)]
    if missing:
        raise ValueError("without --preset, give " + ", ".join("--" + m.replace("_", "-")
                                                                for m in missing))
    ppl_prompts: list[str] = []
    ppl_conts: list[str] = []
    if args.ppl_continuations:
        rows = read_jsonl(args.ppl_continuations)
        ppl_prompts = [r["prompt"] for r in rows]
        ppl_conts = [r["continuation"] for r in rows]
    mmlu_q = mmlu_s = None
    if args.mmlu_dir and n_subj:
        subjects = list_subjects(args.mmlu_dir, "test")
        subjects = subjects[:: max(1, len(subjects) // n_subj)][:n_subj]
        mmlu_q = load_mmlu(args.mmlu_dir, "test", subjects, per_subj)
        mmlu_s = load_mmlu(args.mmlu_dir, "dev", subjects) if args.mmlu_shots else None
    return SweepData(
        toxic_prompts=load_prompts(args.toxic_prompts, limit=n_toxic),
        benign_prompts=load_prompts(args.benign_prompts, limit=n_benign) if args.benign_prompts
        else [],
        source_pool=load_texts(args.source),
        target_pool=load_texts(args.target),
        control_pool=load_texts(args.control),
        ppl_texts=[read_text(args.ppl_text)] if args.ppl_text else [],
        ppl_prompts=ppl_prompts,
        ppl_continuations=ppl_conts,
        mmlu_questions=mmlu_q,
        mmlu_shots=mmlu_s,
        description={"toxic_prompts": args.toxic_prompts, "benign_prompts": args.benign_prompts,
                     "source": args.source, "target": args.target, "control": args.control,
                     "ppl_text": args.ppl_text, "ppl_continuations": args.ppl_continuations,
                     "mmlu": args.mmlu_dir},
    )


def _seed_list(text: str) -> list[int]:
    from ..cli import non_negative_int

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}")
    try:
        return [non_negative_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0, got {text!r}") from None


def register(subparsers) -> None:
    from ..cli import (
        add_model_args,
        non_negative_int,
        open_unit_interval,
        positive_float,
        positive_int,
    )

    p = subparsers.add_parser(
        "sweep",
        help="sweep methods ± DSAS over strengths; toxicity vs utility Pareto fronts",
        description="Fit each method with and without DSAS on n-example sets (several seeds), "
                    "sweep the strength, evaluate toxicity (toxic and benign prompts), "
                    "perplexity and MMLU at every point; write points.jsonl/csv, summary.csv/"
                    "json and pareto.png. Re-running the same command resumes.",
    )
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes that finish in minutes on a CPU (smoke test)")
    p.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    p.add_argument("--gates", default="none,dsas",
                   help="comma-separated gates to compare: gate kinds or --gate-variant names")
    p.add_argument("--gate-variant", action="append", metavar="NAME=KIND[,key=value...]",
                   help="a named gate with its own options, e.g. 'tok=dsas,train_on=tokens,"
                        "control=mix' or 'relu=e2e,e2e.activation=relu' (repeatable; keys: "
                        "control, source or target pool, DSASOptions fields, FitOptions fields, "
                        "section.field)")
    p.add_argument("--grid", action="append",
                   help="strengths: '0.5,1,2' for all methods, 'caa=0.5,1,2' for one, "
                        "'caa+none=0.1,0.2' for one method with one gate; 'auto' in a grid: "
                        "each recipe's default strength, chosen on held-out fit texts as "
                        "'fit --strength auto' does (repeatable; default: per method, see "
                        "docs/evaluation.md)")
    p.add_argument("--seeds", type=_seed_list,
                   help="fit/generation seeds, e.g. 0,1 (default: 0,1; --quick: 0)")
    p.add_argument("--n-fit", type=positive_int, default=32, help="examples per fitting set")
    p.add_argument("--site", default="residual", help="hook site kind (see steerwise fit --help)")
    p.add_argument("--layers", default=None, help="layers to steer (default: all)")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"],
                   help="how a text's token activations become one example")
    p.add_argument("--lineas-steps", type=positive_int, default=None,
                   help="end-to-end training steps (LinEAS / E2E; default: the method's)")
    g = p.add_argument_group("data")
    g.add_argument("--preset", choices=["testbed"],
                   help="read every set from --data-dir (default: the files given below)")
    g.add_argument("--data-dir", help="directory in the shared data layout (with --preset)")
    g.add_argument("--control-pool", default="wikitext",
                   choices=["wikitext", "rtp-nontoxic", "neither", "mix"],
                   help="testbed preset: default control texts ('wikitext', default: paragraphs "
                        "of the WikiText articles not held out — measured best, see "
                        "docs/dsas-measured.md; 'rtp-nontoxic': training rows of "
                        "rtp_nontoxic.jsonl; 'neither': Davidson neutral tweets; 'mix': half "
                        "rtp, half wikitext); a gate variant may name another")
    g.add_argument("--n-ppl-continuations", type=positive_int, default=None,
                   help="testbed preset: held-out non-toxic continuations for perplexity "
                        "(default: 200; --quick: 40)")
    g.add_argument("--toxic-prompts", help="RTP-style JSONL (field 'prompt') or a text file")
    g.add_argument("--benign-prompts", help="benign prompts (over-steering check)")
    g.add_argument("--source", help="texts to steer away from (.txt/.jsonl 'text')")
    g.add_argument("--target", help="texts to steer towards")
    g.add_argument("--control", help="neutral texts the gate must leave alone")
    g.add_argument("--ppl-text", help="held-out running text for perplexity")
    g.add_argument("--ppl-continuations", help="JSONL with prompt/continuation: conditional ppl")
    g.add_argument("--mmlu-dir", help="MMLU CSV directory (<dir>/{dev,test}/<subject>_<split>.csv)")
    g.add_argument("--n-toxic", type=positive_int, default=None,
                   help="toxic prompts (default: 100; --quick: 24)")
    g.add_argument("--n-benign", type=non_negative_int, default=None,
                   help="benign prompts (default: 50; --quick: 12)")
    g.add_argument("--mmlu-subjects", type=non_negative_int, default=None,
                   help="number of MMLU subjects, spread alphabetically (default: 10; --quick: 4; "
                        "0 = skip)")
    g.add_argument("--mmlu-per-subject", type=positive_int, default=None,
                   help="questions per subject (default: 20; --quick: 10)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--scorer", default="profanity-check",
                   help="'profanity-check' (offline) or 'hf:<classifier dir>[@label]'")
    e.add_argument("--max-new-tokens", type=positive_int, default=50,
                   help="tokens sampled per toxicity prompt")
    e.add_argument("--top-p", type=open_unit_interval, default=0.3, help="nucleus sampling mass")
    e.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    e.add_argument("--repetition-penalty", type=positive_float, default=1.2,
                   help="penalty on repeated tokens (1 = none)")
    e.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="cut prompts from the left to this many tokens (default: no cut)")
    e.add_argument("--ppl-window", type=positive_int, default=256, help="perplexity window (tokens)")
    e.add_argument("--ppl-max-tokens", type=positive_int, default=None,
                   help="cap perplexity tokens (default: no cap; --quick: 2000)")
    e.add_argument("--mmlu-shots", type=non_negative_int, default=5, help="MMLU few-shot examples")
    e.add_argument("--mmlu-scoring", default="letter", choices=["letter", "text", "cloze"],
                   help="letter: log p(' A'..' D'); text: log p(choice text) after the "
                        "lettered prompt; cloze: log p(choice text) after the bare question")
    e.add_argument("--mmlu-backend", default="auto", choices=["auto", "lm-eval", "steerwise"],
                   help="who measures MMLU: lm-evaluation-harness's mmlu task (letter scoring, "
                        "as in the DSAS paper) or steerwise's scorer (auto: lm-eval when "
                        "installed and the scoring is letter)")
    e.add_argument("--mmlu-max-length", type=positive_int, default=None,
                   help="cut MMLU prompts from the left to this many tokens (default: no cut)")
    e.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="where continuations are sampled: the HF model point by point, or one "
                        "vLLM engine holding every recipe, many points a batch (needs vLLM and "
                        "the model as an HF directory; fits, perplexity and MMLU stay on HF; "
                        "docs/evaluation.md)")
    e.add_argument("--points-per-batch", type=positive_int, default=16,
                   help="with --engine vllm: points whose continuations are sampled in one batch "
                        "(kept in OUT/samples.jsonl, so an interruption loses at most one batch)")
    e.add_argument("--batch-size", type=positive_int, default=32,
                   help="rows per forward pass (generation, perplexity, MMLU)")
    e.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_sweep)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
