"""The ``steerwise`` command line.

Each feature module registers its own sub-commands through a ``register(subparsers)`` function
listed in ``COMMAND_MODULES``; this file holds the core ones (fit, generate, sites).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .chat import CHAT_ROLES
from .models import DEFAULT_MODEL

COMMAND_MODULES: tuple[str, ...] = ("steerwise.demo", "steerwise.diffusion.cli", "steerwise.eval.cli",
                                    "steerwise.scaling.cli", "steerwise.server.cli",
                                    "steerwise.harness_cli")

console = Console()


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local directory, or embedded model name (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def diagnostics_table(recipe, title: str = "per-site diagnostics") -> Table:
    """A rich table of what a fit found per site (gate/probe accuracy, scale, norms)."""
    rows = recipe.diagnostics()
    keys = [k for k in ("gate_accuracy", "probe_accuracy") if any(k in r for r in rows)]
    table = Table(title=title)
    table.add_column("site")
    for k in keys:
        table.add_column(k.replace("_", " "), justify="right")
    table.add_column("scale a_l", justify="right")
    table.add_column("|source|", justify="right")
    table.add_column("|delta|", justify="right")
    for r in rows:
        cells = [r["site"]]
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else f"{v:.3f}")
        cells += [f"{r['scale']:.2f}", f"{r.get('source_norm', float('nan')):.2f}",
                  f"{r.get('delta_norm', float('nan')):.2f}"]
        table.add_row(*cells)
    return table


def _cmd_fit(args: argparse.Namespace) -> int:
    from .data import load_texts
    from .fit import FitOptions, fit
    from .gates.cast import CASTOptions
    from .gates.dsas import DSASOptions
    from .maps.lineas import LinEASOptions
    from .models import load_model

    source = load_texts(args.source, limit=args.limit)
    control = load_texts(args.control, limit=args.limit) if args.control else None
    target = load_texts(args.target, limit=args.limit) if args.target else None
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    opts = FitOptions(
        method=args.method, gate=args.gate, site=args.site, layers=args.layers,
        pooling=args.pooling, batch_size=args.batch_size, default_strength=args.strength,
        dsas=DSASOptions(n_components=args.n_components, cv_folds=args.cv_folds,
                         threshold=args.threshold, below_threshold=args.below_threshold,
                         whiten=args.whiten, seed=args.seed),
        map_options={k: v for k, v in (("top_k_heads", args.top_k_heads),
                                       ("support", args.support), ("seed", args.seed))
                     if v is not None},
        lineas=LinEASOptions(steps=args.lineas_steps, lr=args.lineas_lr,
                             batch_size=args.lineas_batch_size, l1=args.l1,
                             group_l1=args.group_l1, gamma=args.gamma, e2e_gate=args.e2e_gate,
                             e2e_init=args.e2e_init, seed=args.seed),
        cast=CASTOptions(condition_layer=args.cast_layer, cv_folds=args.cv_folds, seed=args.seed),
        chat=args.chat,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = fit(model, tok, source, control, target, opts)
    console.print(diagnostics_table(recipe))
    training = recipe.fit_info.get("training")
    if training:
        line = (f"end-to-end training ({training['trained']}): W2 {training['w2_initial']:.4g} → "
                f"{training['w2_final']:.4g} in {training['steps']} steps, "
                f"{training['seconds']:.1f} s")
        if "active_dims" in training:
            line += (f"; active dims {training['active_dims']}/{training['total_dims']}, "
                     f"layers {training['active_layers']}/{training['total_layers']}")
        console.print(line)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    recipe.fit_info["model_name"] = args.model
    out = recipe.save_pretrained(args.out)
    console.print(f"saved recipe ({recipe.method} + {recipe.gate}, {len(recipe.entries)} sites) "
                  f"to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .models import load_model
    from .recipe import Recipe

    recipe = Recipe.from_pretrained(args.recipe) if args.recipe else None
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    gen_kwargs = {}
    if args.sample:
        gen_kwargs = dict(do_sample=True, top_p=args.top_p, temperature=args.temperature)
    if args.repetition_penalty != 1.0:
        gen_kwargs["repetition_penalty"] = args.repetition_penalty
    explain = bool(args.explain or args.html)
    result = generate(model, tok, args.prompts, recipe, args.strength, explain=explain,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, chat=args.chat,
                      **gen_kwargs)
    base = None
    if args.compare and recipe is not None:
        base = generate(model, tok, args.prompts, None, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, chat=args.chat, **gen_kwargs)
    for i, (prompt, text) in enumerate(zip(result.prompts, result.continuations)):
        if base is not None:
            console.print(f"[dim]unsteered:[/] {prompt}[cyan]{base.continuations[i]}[/]")
        console.print(f"[dim]steered:  [/] {prompt}[green]{text}[/]" if recipe else f"{prompt}{text}")
        if args.explain and result.trace is not None:
            console.print(result.trace.to_rich(i))
            console.print()
    if args.html and result.trace is not None:
        path = result.trace.save_html(args.html)
        console.print(f"gate heat map written to {path}")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sites import describe_sites, model_type, num_layers

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    table = Table(title=f"{model_type(model)}: {num_layers(model)} layers (layer 0 shown)")
    table.add_column("site")
    table.add_column("module (io)")
    for kind, where in describe_sites(model).items():
        table.add_row(kind, where)
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="steerwise",
        description="Activation steering: how (maps), when (DSAS gates), where (sites).",
    )
    parser.add_argument("--version", action="version", version=f"steerwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a steering recipe from example texts")
    add_model_args(p)
    p.add_argument("--source", required=True, help="texts to steer away from / act on (.txt or .jsonl)")
    p.add_argument("--control", help="neutral texts the gate must leave alone")
    p.add_argument("--target", help="texts to steer towards (default: the control texts)")
    from .fit import GATES
    from .maps import MAP_REGISTRY

    p.add_argument("--method", default="caa", choices=sorted(MAP_REGISTRY))
    p.add_argument("--gate", default="dsas", choices=list(GATES))
    p.add_argument("--site", default="residual",
                   help="residual | attn | mlp | heads | re:<module-regex>[:i] | re-in:<regex>")
    p.add_argument("--layers", default=None, help="all (default), a range '2-5' or a list '1,3'")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"])
    p.add_argument("--limit", type=int, default=None, help="use at most N texts of each file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--strength", type=float, default=1.0, help="default strength saved in the recipe")
    p.add_argument("--n-components", type=int, default=5, help="PCA rank r of DSAS gates")
    p.add_argument("--cv-folds", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.75, help="gate accuracy threshold τ")
    p.add_argument("--below-threshold", default="skip", choices=["skip", "constant"])
    p.add_argument("--whiten", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("method options (see docs/methods.md)")
    m.add_argument("--top-k-heads", type=int, default=None,
                   help="ITI on --site heads: steer the K heads of best probe accuracy (48)")
    m.add_argument("--support", action=argparse.BooleanOptionalAction, default=None,
                   help="AcT: apply only inside the source support (default: on for linear-act)")
    m.add_argument("--lineas-steps", type=int, default=1000, help="LinEAS / E2E training steps")
    m.add_argument("--lineas-lr", type=float, default=1e-3)
    m.add_argument("--lineas-batch-size", type=int, default=4)
    m.add_argument("--l1", type=float, default=0.0, help="LinEAS L1 proximal weight")
    m.add_argument("--group-l1", type=float, default=0.0, help="LinEAS per-layer group-lasso weight")
    m.add_argument("--gamma", type=float, default=1.0, help="E2E-DSAS control-term weight γ")
    m.add_argument("--e2e-gate", default="sigmoid", choices=["sigmoid", "relu"])
    m.add_argument("--e2e-init", default="dsas", choices=["dsas", "zero"])
    m.add_argument("--cast-layer", type=int, default=None,
                   help="CAST condition layer (default: best held-out F1)")
    p.add_argument("--chat", choices=CHAT_ROLES, default=None,
                   help="render texts with the tokenizer's chat template as user / assistant "
                        "messages (instruct models)")
    p.add_argument("--out", required=True, help="recipe directory to write")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("generate", help="generate with (or without) a recipe")
    add_model_args(p)
    p.add_argument("--recipe", help="recipe directory (omit for unsteered generation)")
    p.add_argument("--strength", type=float, default=None, help="default: the recipe's")
    p.add_argument("--explain", action="store_true", help="show per-token gate values")
    p.add_argument("--html", help="write a gate heat map (tokens x layers) to this HTML file")
    p.add_argument("--compare", action="store_true", help="also print the unsteered continuation")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", choices=CHAT_ROLES, default=None,
                   help="render prompts with the tokenizer's chat template: 'user' (the model "
                        "answers) or 'assistant' (the model continues its own reply)")
    p.add_argument("prompts", nargs="+")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("sites", help="list the named hook sites of a model")
    add_model_args(p)
    p.set_defaults(func=_cmd_sites)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:
        from rich.markup import escape  # messages may hold brackets, e.g. 'steerwise[harness]'

        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
