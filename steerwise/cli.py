"""The ``steerwise`` command line.

Each feature module registers its own sub-commands through a ``register(subparsers)`` function
listed in ``COMMAND_MODULES``; this file holds the core ones (fit, generate, sites), the parser
every sub-command shares (one-line errors, defaults in ``--help``), the argument types that check
numbers at the boundary, and ``main``, which turns bad input into one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .chat import CHAT_ROLES
from .models import DEFAULT_MODEL
from .options import (  # noqa: F401 (the argument types other sub-commands import from here)
    finite_float,
    int_at_least,
    non_negative_float,
    non_negative_int,
    open_unit_interval,
    positive_float,
    positive_int,
    unit_interval,
)

COMMAND_MODULES: tuple[str, ...] = ("steerwise.demo", "steerwise.diffusion.cli", "steerwise.eval.cli",
                                    "steerwise.scaling.cli", "steerwise.server.cli",
                                    "steerwise.harness_cli", "steerwise.export")
DEBUG_ENV = "STEERWISE_DEBUG"

console = Console()


# ---------------------------------------------------------------- argument types (checked at parse)

def finite_floats(text: str) -> list[float]:
    """Comma-separated finite numbers: ``0,2,4.5``."""
    values = [p.strip() for p in text.split(",") if p.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    try:
        return [finite_float(v) for v in values]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers, got {text!r}") from None


def non_empty_text(text: str) -> str:
    """A prompt with at least one non-blank character."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a prompt is empty; give some text")
    return text


# ---------------------------------------------------------------- the parser every command shares

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help unless the default is ``None`` (the help
    then says what happens) or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = action.nargs == 0 and isinstance(action.default, bool)  # store_true: off unless given
        if action.default is None or flag or "default:" in text or "(default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit 2), whose help shows the
    defaults, and where every sub-command accepts ``--debug``. Sub-parsers inherit all three."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help=f"on an error, show the full traceback (or set {DEBUG_ENV}=1)")

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_gguf_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="a GGUF file inside the --model directory (or hub repository), "
                        "dequantized by transformers; a .gguf --model needs no --gguf-file")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local directory, embedded model name (concept-lm, task-lm), or a "
                        ".gguf file (needs steerwise[gguf])")
    add_gguf_arg(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in (steering is computed in float32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


# ---------------------------------------------------------------- gate traces without colour

def colour_terminal(con: Console | None = None) -> bool:
    """Whether ``con`` (default: the CLI's console) shows colours: a terminal, not ``TERM=dumb``,
    no ``NO_COLOR``."""
    con = con or console
    if os.environ.get("NO_COLOR", "") or os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return False
    return con.is_terminal and con.color_system is not None and not con.no_color


def _token_label(tok: str) -> str:
    label = tok.strip()
    return label if label and ":" not in label and label.isprintable() else repr(tok)


def gate_numbers(trace, row: int) -> str:
    """One line: each token with its mean gate over the steered sites (``-``: none), and ``|``
    between the prompt and the generated tokens, e.g. ``the:0.12 apple:0.95 | pear:0.80``."""
    parts: list[str] = []
    for k, (tok, g) in enumerate(zip(trace.tokens[row], trace.mean_per_token(row))):
        if k == trace.n_prompt[row]:
            parts.append("|")
        parts.append(f"{_token_label(tok)}:{'-' if math.isnan(g) else f'{g:.2f}'}")
    return f"gate per token (mean over {len(trace.sites)} sites): " + " ".join(parts)


def print_gates(trace, row: int, con: Console | None = None) -> None:
    """The gate values of one row: coloured tokens on a colour terminal, numbers otherwise."""
    con = con or console
    if colour_terminal(con):
        con.print(trace.to_rich(row))
    else:
        con.print(gate_numbers(trace, row), soft_wrap=True, highlight=False, markup=False)


def _norm(value: float | None) -> str:
    """A norm in a few characters: 2 decimals below 100, none above."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def diagnostics_table(recipe, title: str = "per-site diagnostics") -> Table:
    """A rich table of what a fit found per site (gate/probe accuracy, scale, norms, and the
    steering's norm at the default strength relative to the median token norm)."""
    from .strength import relative_strength

    rows = recipe.diagnostics()
    keys = [k for k in ("gate_accuracy", "probe_accuracy") if any(k in r for r in rows)]
    lam = recipe.default_strength
    table = Table(title=title, caption=f"median |x|: the median token norm (source texts); "
                                       f"rel: λ·a_l·|delta| / median |x| at the default "
                                       f"strength λ = {lam:.3g}, the gate fully open")
    table.add_column("site", no_wrap=True)
    for k in keys:
        table.add_column(k.replace("_", " "), justify="right")
    table.add_column("scale a_l", justify="right")
    table.add_column("|source|", justify="right")
    table.add_column("|delta|", justify="right")
    table.add_column("median |x|", justify="right")
    table.add_column("rel", justify="right")
    for r in rows:
        cells = [r["site"]]
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else f"{v:.3f}")
        rel = relative_strength(r, lam)
        cells += [f"{r['scale']:.2f}", _norm(r.get("source_norm")), _norm(r.get("delta_norm")),
                  _norm(r.get("token_norm_median")), "-" if rel is None else f"{rel:.2g}"]
        table.add_row(*cells)
    return table


# ---------------------------------------------------------------- steerwise fit's options
# Every flag of ``steerwise fit`` below comes from the option dataclasses (``steerwise.options``):
# the name, default, help text, choices and argument type are declared once, on the field.
# Shared flags: ``--seed`` sets every seed, ``--cv-folds`` the folds of every gate's accuracy.
SHARED_FLAGS = ("seed", "cv_folds")


def _fit_sections():
    """(FitOptions field, options class, title) of each option section on the command line."""
    from .gates.cast import CASTOptions
    from .gates.dsas import DSASOptions
    from .gates.e2e import E2EOptions
    from .maps.lineas import LinEASOptions

    return (("dsas", DSASOptions, "DSAS gate options (docs/algorithms.md)"),
            ("lineas", LinEASOptions, "end-to-end training (LinEAS maps, E2E gates)"),
            ("e2e", E2EOptions, "E2E-DSAS gate options"),
            ("cast", CASTOptions, "CAST gate options"))


def _map_option_fields() -> dict[str, tuple[Any, list[str]]]:
    """Each command-line field of the registered maps' options: name → (field, methods)."""
    from .maps import MAP_REGISTRY

    out: dict[str, tuple[Any, list[str]]] = {}
    for method, cls in sorted(MAP_REGISTRY.items()):
        for f in dataclasses.fields(cls.Options):
            if f.metadata.get("cli") and f.name not in SHARED_FLAGS:
                out.setdefault(f.name, (f, []))[1].append(method)
    return out


def add_fit_option_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``steerwise fit`` that set ``FitOptions`` (all but the data and model)."""
    from .fit import FitOptions
    from .gates.base import gate_kinds
    from .maps import MAP_REGISTRY
    from .options import add_field_flag, add_option_flags

    defaults = FitOptions()
    fields = {f.name: f for f in dataclasses.fields(FitOptions)}
    p.add_argument("--method", default=defaults.method, choices=sorted(MAP_REGISTRY),
                   help=fields["method"].metadata["help"])
    p.add_argument("--gate", default=defaults.gate, choices=list(gate_kinds()),
                   help=fields["gate"].metadata["help"])
    add_option_flags(p, FitOptions)
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use at most N texts of each file (default: all)")
    for name, cls, title in _fit_sections():
        group = p.add_argument_group(title)
        shared = [] if name == "dsas" else SHARED_FLAGS  # --seed, --cv-folds: declared once
        add_option_flags(group, cls, skip=shared)
    group = p.add_argument_group("map options (see docs/methods.md; each applies to the methods "
                                 "named in its help)")
    for f, methods in _map_option_fields().values():
        add_field_flag(group, f, f.default, f"{f.metadata['help']} [{', '.join(methods)}]")


def fit_options_from_args(args: argparse.Namespace):
    """``FitOptions`` from the parsed flags of ``steerwise fit`` (``add_fit_option_flags``).

    A map option given for a method that does not have it is an error, not ignored."""
    from .fit import FitOptions
    from .maps import MAP_REGISTRY
    from .options import dest_of, flag_of, options_from_args

    shared = {k: getattr(args, k) for k in SHARED_FLAGS}
    sections = {name: options_from_args(cls, args, **{k: v for k, v in shared.items()
                                                      if k in cls.field_names()})
                for name, cls, _ in _fit_sections()}
    map_cls = MAP_REGISTRY[args.method]
    own = map_cls.Options.field_names()
    map_options = {}
    for fname, (f, methods) in _map_option_fields().items():
        value = getattr(args, dest_of(f))
        if fname in own:
            map_options[fname] = value
        elif value != f.default:
            raise ValueError(f"{flag_of(f)} is an option of "
                             f"{', '.join(methods)}, not of method {args.method!r}")
    if "seed" in own:
        map_options["seed"] = args.seed
    return options_from_args(FitOptions, args, method=args.method, gate=args.gate,
                             map_options=map_options, **sections)


def _cmd_fit(args: argparse.Namespace) -> int:
    from .data import load_texts
    from .fit import fit
    from .models import load_model, model_display_name

    source = load_texts(args.source, limit=args.limit)
    control = load_texts(args.control, limit=args.limit) if args.control else None
    target = load_texts(args.target, limit=args.limit) if args.target else None
    opts = fit_options_from_args(args)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                            gguf_file=args.gguf_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = fit(model, tok, source, control, target, opts)
    # a terminal gets the table at its width, a file or pipe the whole table
    (console if console.is_terminal else Console(width=160)).print(diagnostics_table(recipe))
    if "strength" in recipe.fit_info:
        from .strength import search_summary

        console.print(search_summary(recipe.fit_info["strength"]), soft_wrap=True,
                      highlight=False, markup=False)
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
    recipe.fit_info["model_name"] = model_display_name(args.model, args.gguf_file)
    out = recipe.save_pretrained(args.out)
    console.print(f"saved recipe ({recipe.method} + {recipe.gate}, {len(recipe.entries)} sites) "
                  f"to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .models import load_model
    from .recipe import Recipe

    recipe = Recipe.from_pretrained(args.recipe) if args.recipe else None
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file)
    gen_kwargs = {}
    if args.sample:
        gen_kwargs = {"do_sample": True, "top_p": args.top_p, "temperature": args.temperature}
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
        prompt, text = escape(prompt), escape(text)
        if base is not None:
            console.print(f"[dim]unsteered:[/] {prompt}[cyan]{escape(base.continuations[i])}[/]")
        console.print(f"[dim]steered:  [/] {prompt}[green]{text}[/]" if recipe else f"{prompt}{text}")
        if args.explain and result.trace is not None:
            print_gates(result.trace, i)
            console.print()
    if args.html and result.trace is not None:
        path = result.trace.save_html(args.html)
        console.print(f"gate heat map written to {path}")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sites import describe_sites, model_type, num_layers

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file)
    table = Table(title=f"{model_type(model)}: {num_layers(model)} layers (layer 0 shown)")
    table.add_column("site")
    table.add_column("module (io)")
    for kind, where in describe_sites(model).items():
        table.add_row(kind, where)
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="steerwise",
        description="Activation steering: how (maps), when (DSAS gates), where (sites).",
    )
    parser.add_argument("--version", action="version", version=f"steerwise {__version__}",
                        help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a steering recipe from example texts")
    add_model_args(p)
    p.add_argument("--source", required=True, help="texts to steer away from / act on (.txt or .jsonl)")
    p.add_argument("--control", help="neutral texts the gate must leave alone; generic text "
                                     "(e.g. encyclopaedia paragraphs) gave cheaper gates than "
                                     "in-domain benign text (docs/dsas-measured.md)")
    p.add_argument("--target", help="texts to steer towards (default: the control texts)")
    add_fit_option_flags(p)
    p.add_argument("--out", required=True, help="recipe directory to write")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("generate", help="generate with (or without) a recipe")
    add_model_args(p)
    p.add_argument("--recipe", help="recipe directory (omit for unsteered generation)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="global strength λ (default: the recipe's)")
    p.add_argument("--explain", action="store_true",
                   help="show per-token gate values (numbers when the output has no colours)")
    p.add_argument("--html", help="write a gate heat map (tokens x layers) to this HTML file")
    p.add_argument("--compare", action="store_true", help="also print the unsteered continuation")
    p.add_argument("--max-new-tokens", type=positive_int, default=40,
                   help="tokens to generate per prompt")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--top-p", type=open_unit_interval, default=0.9,
                   help="nucleus sampling mass (with --sample)")
    p.add_argument("--temperature", type=positive_float, default=1.0,
                   help="sampling temperature (with --sample)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="penalty on repeated tokens (1 = none)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling")
    p.add_argument("--chat", choices=CHAT_ROLES, default=None,
                   help="render prompts with the tokenizer's chat template: 'user' (the model "
                        "answers) or 'assistant' (the model continues its own reply)")
    p.add_argument("prompts", nargs="+", type=non_empty_text, help="prompts to continue")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("sites", help="list the named hook sites of a model")
    add_model_args(p)
    p.set_defaults(func=_cmd_sites)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its message with newlines folded (the class name if empty)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("steerwise: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as exc:
        if debug:
            traceback.print_exc()
        command = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
        print(f"steerwise {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
