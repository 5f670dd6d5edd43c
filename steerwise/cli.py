"""The ``steerwise`` command line.

Each feature module registers its own sub-commands through a ``register(subparsers)`` function
listed in ``COMMAND_MODULES``; this file holds the core ones (fit, generate, sites), the parser
every sub-command shares (one-line errors, defaults in ``--help``), the argument types that check
numbers at the boundary, and ``main``, which turns bad input into one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .chat import CHAT_ROLES
from .models import DEFAULT_MODEL

COMMAND_MODULES: tuple[str, ...] = ("steerwise.demo", "steerwise.diffusion.cli", "steerwise.eval.cli",
                                    "steerwise.scaling.cli", "steerwise.server.cli",
                                    "steerwise.harness_cli")
DEBUG_ENV = "STEERWISE_DEBUG"

console = Console()


# ---------------------------------------------------------------- argument types (checked at parse)

def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is not NaN or ±inf."""
    return _number(text, float, "a finite number", lambda v: True)


def positive_float(text: str) -> float:
    return _number(text, float, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def unit_interval(text: str) -> float:
    """A float in [0, 1]."""
    return _number(text, float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def open_unit_interval(text: str) -> float:
    """A float in (0, 1] (e.g. nucleus sampling's top-p)."""
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def positive_int(text: str) -> int:
    return int(_number(text, int, "an integer >= 1", lambda v: v >= 1))


def non_negative_int(text: str) -> int:
    return int(_number(text, int, "an integer >= 0", lambda v: v >= 0))


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return int(_number(text, int, f"an integer >= {low}", lambda v: v >= low))

    parse.__name__ = f"int_at_least_{low}"
    return parse


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
    from .models import load_model, model_display_name

    source = load_texts(args.source, limit=args.limit)
    control = load_texts(args.control, limit=args.limit) if args.control else None
    target = load_texts(args.target, limit=args.limit) if args.target else None
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file)
    opts = FitOptions(
        method=args.method, gate=args.gate, site=args.site, layers=args.layers,
        pooling=args.pooling, batch_size=args.batch_size, default_strength=args.strength,
        dsas=DSASOptions(n_components=args.n_components, cv_folds=args.cv_folds,
                         threshold=args.threshold, below_threshold=args.below_threshold,
                         whiten=args.whiten, seed=args.seed, train_on=args.gate_train_on,
                         negatives=args.gate_negatives, calibrate=args.gate_calibrate,
                         calibrate_eps=args.gate_calibrate_eps),
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
    from .fit import GATES
    from .gates.dsas import DSASOptions
    from .maps import MAP_REGISTRY

    p.add_argument("--method", default="caa", choices=sorted(MAP_REGISTRY),
                   help="how to steer: the map fitted per site (docs/methods.md)")
    p.add_argument("--gate", default="dsas", choices=list(GATES),
                   help="when to steer: the per-token gate (none = uniform steering)")
    p.add_argument("--site", default="residual",
                   help="residual | attn | mlp | heads | re:<module-regex>[:i] | re-in:<regex>")
    p.add_argument("--layers", default=None, help="all (default), a range '2-5' or a list '1,3'")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"],
                   help="how a text's token activations become one example")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use at most N texts of each file (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="texts per forward pass while collecting activations")
    p.add_argument("--strength", type=finite_float, default=1.0,
                   help="default strength saved in the recipe")
    p.add_argument("--n-components", type=positive_int, default=5, help="PCA rank r of DSAS gates")
    p.add_argument("--cv-folds", type=int_at_least(2), default=5,
                   help="cross-validation folds of the gate accuracy")
    p.add_argument("--threshold", type=unit_interval, default=0.75,
                   help="gate accuracy threshold τ")
    p.add_argument("--below-threshold", default="skip", choices=["skip", "constant"],
                   help="sites below τ: not steered, or steered at constant strength")
    p.add_argument("--whiten", action="store_true",
                   help="divide the PCA components by their standard deviation")
    defaults = DSASOptions()
    p.add_argument("--gate-train-on", default=defaults.train_on, choices=["means", "tokens"],
                   help="DSAS gates learn from text means (the paper) or from every token, as "
                        "they are applied (docs/dsas-measured.md)")
    p.add_argument("--gate-negatives", default=defaults.negatives,
                   choices=["control", "control+target"],
                   help="what a DSAS gate learns to keep shut: the control texts, or control "
                        "and target texts (the contrastive gate)")
    p.add_argument("--gate-calibrate", type=open_unit_interval, default=defaults.calibrate,
                   metavar="Q", help="rescale each DSAS gate so that a share Q of the negative "
                                     "tokens gets a gate below --gate-calibrate-eps and the "
                                     "median source token 1 − ε (default: off, the paper's "
                                     "gate; 0.9 helped token-trained gates)")
    p.add_argument("--gate-calibrate-eps", type=open_unit_interval,
                   default=defaults.calibrate_eps, help="ε of --gate-calibrate")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every random step")
    m = p.add_argument_group("method options (see docs/methods.md)")
    m.add_argument("--top-k-heads", type=positive_int, default=None,
                   help="ITI on --site heads: steer the K heads of best probe accuracy "
                        "(default: 48)")
    m.add_argument("--support", action=argparse.BooleanOptionalAction, default=None,
                   help="AcT: apply only inside the source support (default: on for linear-act)")
    m.add_argument("--lineas-steps", type=positive_int, default=1000,
                   help="LinEAS / E2E training steps")
    m.add_argument("--lineas-lr", type=positive_float, default=1e-3,
                   help="LinEAS / E2E Adam learning rate")
    m.add_argument("--lineas-batch-size", type=positive_int, default=4,
                   help="LinEAS / E2E texts per training step")
    m.add_argument("--l1", type=non_negative_float, default=0.0,
                   help="LinEAS L1 proximal weight")
    m.add_argument("--group-l1", type=non_negative_float, default=0.0,
                   help="LinEAS per-layer group-lasso weight")
    m.add_argument("--gamma", type=non_negative_float, default=1.0,
                   help="E2E-DSAS control-term weight γ")
    m.add_argument("--e2e-gate", default="sigmoid", choices=["sigmoid", "relu"],
                   help="E2E-DSAS gate non-linearity")
    m.add_argument("--e2e-init", default="dsas", choices=["dsas", "zero"],
                   help="E2E-DSAS gate initialisation: the offline DSAS fit, or zeros")
    m.add_argument("--cast-layer", type=non_negative_int, default=None,
                   help="CAST condition layer (default: best held-out F1)")
    p.add_argument("--chat", choices=CHAT_ROLES, default=None,
                   help="render texts with the tokenizer's chat template as user / assistant "
                        "messages (instruct models)")
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
