"""``steerwise scale fit | eval | plot``: learned activation scaling from the command line.

    steerwise scale fit  --task ccc --method activscalar --out runs/ccc-as
    steerwise scale eval --task ccc --recipe runs/ccc-as
    steerwise scale plot --recipe runs/ccc-as --out ccc-as.png

``--task`` is ``ccc``, ``ioi`` or a JSONL file of ``{"prompt", "correct", "wrong"}`` rows.
``--model`` defaults to the embedded task model (``task-lm``); any hub id or local directory of a
causal LM works the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
DEFAULT_TASK_MODEL = "task-lm"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_TASK_MODEL) -> None:
    p.add_argument("--model", default=model_default,
                   help="hub id, local directory or embedded name (default: task-lm)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _add_task(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--task", required=required, help="ccc | ioi | path to a JSONL file")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts and of training")


def metrics_table(report: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("β", "flip accuracy", "mean z_w − z_c", "KL"):
        table.add_column(col, justify="right")
    table.add_row("clean", f"{1 - report['clean_accuracy']:.3f}",
                  f"{report['clean_logit_diff']:+.3f}", "0")
    for key, row in report["per_beta"].items():
        table.add_row(key, f"{row['flip_accuracy']:.3f}", f"{row['logit_diff']:+.3f}",
                      f"{row['kl']:.4f}")
    table.caption = (f"{report['method']}: {report['n']} prompts of {report['prompt_tokens']} "
                     f"tokens; clean accuracy {report['clean_accuracy']:.3f}; "
                     f"{report['n_nonzero']}/{report['n_parameters']} parameters non-zero "
                     f"(|θ| > {report['nonzero_tol']:g}), ℓ1 {report['l1']:.3f}")
    return table


def _cmd_fit(args: argparse.Namespace) -> int:
    from ..models import load_model
    from .data import TASKS, load_task
    from .metrics import evaluate_scaling
    from .train import ScaleOptions, fit_scaling

    train = load_task(args.task, args.n_train, seed=args.seed, split="train",
                      prefix_sentences=args.prefix_sentences)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    opts = ScaleOptions(
        method=args.method, sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()),
        layers=args.layers, lambda_f=args.lambda_f, lambda_m=args.lambda_m, margin=args.margin,
        lr=args.lr, steps=args.steps, batch_size=args.batch_size, betas=tuple(args.betas),
        kl=args.kl, bias=args.bias, seed=args.seed, nonzero_tol=args.nonzero_tol,
    )
    recipe = fit_scaling(model, tok, train, opts)
    recipe.info["model_name"] = args.model
    recipe.info["task"] = args.task
    tr = recipe.info["training"]
    log = tr["log"]
    console.print(
        f"trained {args.method} on {tr['n_examples']} prompts ({tr['n_positions']} positions, "
        f"{tr['n_parameters']} parameters) in {tr['seconds']:.1f} s; final terms: "
        f"effectiveness {log['effectiveness'][-1]:.4f}, faithfulness {log['faithfulness'][-1]:.5f}, "
        f"ℓ1 {log['minimality'][-1]:.3f}" if log["steps"] else "trained 0 steps"
    )
    report = evaluate_scaling(model, tok, recipe, train, betas=opts.betas)
    console.print(metrics_table(report, "train prompts"))
    recipe.info["train_metrics"] = report
    if args.task in TASKS and args.n_test > 0:
        test = load_task(args.task, args.n_test, seed=args.seed, split="test",
                         prefix_sentences=args.prefix_sentences)
        report = evaluate_scaling(model, tok, recipe, test, betas=opts.betas)
        console.print(metrics_table(report, "held-out test prompts"))
        recipe.info["test_metrics"] = report
    out = recipe.save_pretrained(args.out)
    console.print(f"saved scaling recipe ({args.method}, {len(recipe.sites)} sites) to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..models import load_model
    from .data import TASKS, load_task
    from .metrics import evaluate_scaling
    from .recipe import ScaleRecipe

    recipe = ScaleRecipe.from_pretrained(args.recipe)
    model_name = args.model or recipe.info.get("model_name") or DEFAULT_TASK_MODEL
    model, tok = load_model(model_name, dtype=args.dtype, device=args.device)
    results = {}
    prefixes = args.prefix_sentences if args.task in TASKS else [0]
    for k in prefixes:
        examples = load_task(args.task, args.n, seed=args.seed, split=args.split,
                             prefix_sentences=k)
        report = evaluate_scaling(model, tok, recipe, examples, betas=args.betas)
        title = f"{args.task} ({args.split})" + (f", {k} filler sentences" if k else "")
        console.print(metrics_table(report, title))
        results[str(k)] = report
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"metrics written to {args.json}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import dynamic_scalars, plot_scalars
    from .recipe import ScaleRecipe

    recipe = ScaleRecipe.from_pretrained(args.recipe)
    values = tokens = None
    if recipe.method == "dynscalar" or args.prompt:
        from ..models import load_model

        prompt = args.prompt or recipe.info.get("reference_prompt")
        if not prompt:
            raise ValueError("give --prompt: a DynScalar's scalars depend on the prompt")
        model_name = args.model or recipe.info.get("model_name") or DEFAULT_TASK_MODEL
        model, tok = load_model(model_name, dtype=args.dtype, device=args.device)
        values, tokens = dynamic_scalars(model, tok, recipe, prompt)
    path = plot_scalars(recipe, args.out, values=values, tokens=tokens, title=args.title)
    console.print(f"heat map written to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("scale", help="learned activation scaling: fit | eval | plot")
    ssub = p.add_subparsers(dest="scale_command", required=True)

    f = ssub.add_parser("fit", help="train an intervention that flips correct vs wrong answers")
    _add_common(f)
    _add_task(f)
    f.add_argument("--method", default="activscalar",
                   choices=["activscalar", "steervec", "dynscalar"])
    f.add_argument("--sites", default="attn,mlp",
                   help="comma-separated: attn, mlp, residual or re:<regex> (default: attn,mlp)")
    f.add_argument("--layers", default=None, help="all (default), a range '2-5' or a list '1,3'")
    f.add_argument("--n-train", type=int, default=128, help="generated training prompts")
    f.add_argument("--n-test", type=int, default=128, help="generated held-out prompts")
    f.add_argument("--prefix-sentences", type=int, default=0,
                   help="neutral 6-word sentences before each generated prompt (prompt length)")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--lr", type=float, default=5e-2, help="Adam learning rate")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lambda-f", type=float, default=1.0, help="faithfulness (KL) weight λ_F")
    f.add_argument("--lambda-m", type=float, default=1e-3, help="minimality (ℓ1) weight λ_M")
    f.add_argument("--margin", type=float, default=2.0, help="hinge margin m on z_w − z_c")
    f.add_argument("--betas", type=_floats, default=[1.0, -1.0],
                   help="directions trained jointly (default: 1,-1)")
    f.add_argument("--kl", default="renormalized", choices=["renormalized", "masked", "full"])
    f.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                   help="DynScalar: α = w·h + b (default) or, with --no-bias, α = w·h")
    f.add_argument("--nonzero-tol", type=float, default=1e-2,
                   help="|θ| above which a parameter counts as non-zero in reports")
    f.add_argument("--out", required=True, help="recipe directory to write")
    f.set_defaults(func=_cmd_fit)

    e = ssub.add_parser("eval", help="flip accuracy, logit difference, KL of a scaling recipe")
    _add_common(e, model_default=None)
    _add_task(e)
    e.add_argument("--recipe", required=True)
    e.add_argument("--n", type=int, default=128, help="generated prompts")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--prefix-sentences", type=_ints, default=[0],
                   help="filler sentences before each prompt; a list '0,1,2' evaluates several "
                        "prompt lengths (DynScalar)")
    e.add_argument("--betas", type=_floats, default=[1.0, -1.0])
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=_cmd_eval)

    q = ssub.add_parser("plot", help="heat map of the learned scalars (site x layer x position)")
    _add_common(q, model_default=None)
    q.add_argument("--recipe", required=True)
    q.add_argument("--out", required=True, help="PNG file to write")
    q.add_argument("--prompt", default=None,
                   help="show α on this prompt (DynScalar; default: the training reference prompt)")
    q.add_argument("--title", default=None)
    q.set_defaults(func=_cmd_plot)
