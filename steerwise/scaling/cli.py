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
    from ..cli import finite_floats

    return finite_floats(text)


def _ints(text: str) -> list[int]:
    from ..cli import non_negative_int

    parts = [x.strip() for x in text.split(",") if x.strip()]
    try:
        if not parts:
            raise argparse.ArgumentTypeError
        return [non_negative_int(x) for x in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_TASK_MODEL) -> None:
    p.add_argument("--model", default=model_default,
                   help="hub id, local directory or embedded name (default: "
                        + ("task-lm)" if model_default else "the recipe's model, else task-lm)"))
    from ..cli import add_gguf_arg

    add_gguf_arg(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _add_task(p: argparse.ArgumentParser, required: bool = True) -> None:
    from ..cli import non_negative_int

    p.add_argument("--task", required=required, help="ccc | ioi | path to a JSONL file")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the generated prompts and of training")


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
    from ..models import load_model, model_display_name
    from .data import TASKS, load_task
    from .metrics import evaluate_scaling
    from .train import ScaleOptions, fit_scaling

    train = load_task(args.task, args.n_train, seed=args.seed, split="train",
                      prefix_sentences=args.prefix_sentences)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file)
    opts = ScaleOptions(
        method=args.method, sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()),
        layers=args.layers, lambda_f=args.lambda_f, lambda_m=args.lambda_m, margin=args.margin,
        lr=args.lr, steps=args.steps, batch_size=args.batch_size, betas=tuple(args.betas),
        kl=args.kl, bias=args.bias, seed=args.seed, nonzero_tol=args.nonzero_tol,
    )
    recipe = fit_scaling(model, tok, train, opts)
    recipe.info["model_name"] = model_display_name(args.model, args.gguf_file)
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
    model, tok = load_model(model_name, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file if args.model else None)
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
        model, tok = load_model(model_name, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file if args.model else None)
        values, tokens = dynamic_scalars(model, tok, recipe, prompt)
    path = plot_scalars(recipe, args.out, values=values, tokens=tokens, title=args.title)
    console.print(f"heat map written to {path}")
    return 0


def register(sub) -> None:
    from ..cli import (
        finite_float,
        non_negative_float,
        non_negative_int,
        positive_float,
        positive_int,
    )

    p = sub.add_parser("scale", help="learned activation scaling: fit | eval | plot")
    ssub = p.add_subparsers(dest="scale_command", required=True, metavar="COMMAND")

    f = ssub.add_parser("fit", help="train an intervention that flips correct vs wrong answers "
                                    "(minutes on a CPU; see docs/scaling.md)")
    _add_common(f)
    _add_task(f)
    f.add_argument("--method", default="activscalar",
                   choices=["activscalar", "steervec", "dynscalar"],
                   help="a scalar per site/layer/position, a vector, or a scalar computed from "
                        "the activation")
    f.add_argument("--sites", default="attn,mlp",
                   help="comma-separated: attn, mlp, residual or re:<regex>")
    f.add_argument("--layers", default=None, help="all (default), a range '2-5' or a list '1,3'")
    f.add_argument("--n-train", type=positive_int, default=128, help="generated training prompts")
    f.add_argument("--n-test", type=non_negative_int, default=128,
                   help="generated held-out prompts (0: no test)")
    f.add_argument("--prefix-sentences", type=non_negative_int, default=0,
                   help="neutral 6-word sentences before each generated prompt (prompt length)")
    f.add_argument("--steps", type=non_negative_int, default=300, help="Adam steps")
    f.add_argument("--lr", type=positive_float, default=5e-2, help="Adam learning rate")
    f.add_argument("--batch-size", type=positive_int, default=32, help="prompts per step")
    f.add_argument("--lambda-f", type=non_negative_float, default=1.0,
                   help="faithfulness (KL) weight λ_F")
    f.add_argument("--lambda-m", type=non_negative_float, default=1e-3,
                   help="minimality (ℓ1) weight λ_M")
    f.add_argument("--margin", type=finite_float, default=2.0, help="hinge margin m on z_w − z_c")
    f.add_argument("--betas", type=_floats, default=[1.0, -1.0],
                   help="directions trained jointly, comma-separated")
    f.add_argument("--kl", default="renormalized", choices=["renormalized", "masked", "full"],
                   help="faithfulness KL over the other tokens renormalised, masked, or all")
    f.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                   help="DynScalar: α = w·h + b, or with --no-bias α = w·h")
    f.add_argument("--nonzero-tol", type=non_negative_float, default=1e-2,
                   help="|θ| above which a parameter counts as non-zero in reports")
    f.add_argument("--out", required=True, help="recipe directory to write")
    f.set_defaults(func=_cmd_fit)

    e = ssub.add_parser("eval", help="flip accuracy, logit difference, KL of a scaling recipe")
    _add_common(e, model_default=None)
    _add_task(e)
    e.add_argument("--recipe", required=True, help="scaling recipe directory")
    e.add_argument("--n", type=positive_int, default=128, help="generated prompts")
    e.add_argument("--split", default="test", choices=["train", "test"],
                   help="which generated prompts (the fit used 'train')")
    e.add_argument("--prefix-sentences", type=_ints, default=[0],
                   help="filler sentences before each prompt; a list '0,1,2' evaluates several "
                        "prompt lengths (DynScalar)")
    e.add_argument("--betas", type=_floats, default=[1.0, -1.0],
                   help="directions to evaluate, comma-separated")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=_cmd_eval)

    q = ssub.add_parser("plot", help="heat map of the learned scalars (site x layer x position)")
    _add_common(q, model_default=None)
    q.add_argument("--recipe", required=True, help="scaling recipe directory")
    q.add_argument("--out", required=True, help="PNG file to write")
    q.add_argument("--prompt", default=None,
                   help="show α on this prompt (DynScalar; default: the training reference prompt)")
    q.add_argument("--title", default=None, help="plot title (default: from the recipe)")
    q.set_defaults(func=_cmd_plot)
