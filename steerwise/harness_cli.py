"""``steerwise harness``: lm-evaluation-harness on a steered model, from the command line.

    steerwise harness --model M --recipe DIR_OR_HUB_ID --strength 4 -- --tasks arc_easy ...

Everything after ``--`` is lm-eval's own ``run`` arguments (``--tasks``, ``--num_fewshot``,
``--include_path``, ``--output_path``, ``--apply_chat_template``, more ``--model_args``...).
This module imports lm-eval only when the command runs, so the CLI works without it.
"""

from __future__ import annotations

import argparse
import json


def _cmd_harness(args: argparse.Namespace) -> int:
    try:
        from .harness import MODEL_NAME, lm_eval_main
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    rest = list(args.lm_eval_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in rest):
        raise ValueError("give lm-eval's --tasks after '--', e.g. "
                         "steerwise harness --model M --recipe DIR -- --tasks arc_easy")
    model_args = {"pretrained": args.model, "dtype": args.dtype}
    if args.gguf_file:
        model_args["gguf_file"] = args.gguf_file
    if args.recipe:
        model_args["recipe"] = args.recipe
        if args.revision:
            model_args["recipe_revision"] = args.revision
    if args.strength is not None:
        model_args["strength"] = args.strength
    argv = ["run", "--model", MODEL_NAME, "--model_args", json.dumps(model_args)]
    if args.device:
        argv += ["--device", args.device]
    lm_eval_main(argv + rest)
    return 0


def register(subparsers) -> None:
    from .cli import add_model_args

    p = subparsers.add_parser(
        "harness",
        help="run lm-evaluation-harness on a steered model (needs steerwise[harness])",
        description="lm-eval's `run` with the model steered by a recipe (any method, any gate): "
                    "steerwise harness --model M --recipe DIR --strength 4 -- <lm-eval args>. "
                    "The same as lm-eval --model steerwise --model_args "
                    "pretrained=M,recipe=DIR,strength=4 (python -m steerwise.harness ...).",
    )
    add_model_args(p)
    p.add_argument("--recipe", help="recipe directory or Hub repo id (omit: unsteered)")
    p.add_argument("--revision", help="Hub revision of the recipe (branch, tag or commit)")
    p.add_argument("--strength", type=float, default=None, help="default: the recipe's")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                   help="-- then lm-eval run arguments (--tasks ... are required)")
    p.set_defaults(func=_cmd_harness)
