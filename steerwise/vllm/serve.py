"""vLLM's OpenAI server with steerwise recipes, in one command.

    python -m steerwise.vllm.serve --recipe detox=recipes/detox [--recipe NAME=DIR ...] \\
        -- --model MODEL [any vLLM server option ...]

adds to vLLM's own server (``vllm.entrypoints.openai.api_server``) the worker that installs the
recipes, the front-end check of each request's steering fields, and the middleware that reads
``"steering": {"recipe", "strength"}`` and sets ``cache_salt``. See docs/vllm.md.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys

from . import VALIDATOR_CLS, engine_args


def vllm_argv(recipes: dict[str, str], rest: list[str]) -> list[str]:
    """The vLLM server arguments: ``rest`` plus the steerwise worker, validator and middleware."""
    for flag in ("--worker-cls", "--additional-config"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise SystemExit(f"steerwise.vllm.serve sets {flag} itself: remove it")
    args = engine_args(recipes)
    return [*rest, "--worker-cls", args["worker_cls"],
            "--additional-config", json.dumps(args["additional_config"]),
            "--logits-processors", VALIDATOR_CLS,
            "--middleware", "steerwise.vllm.middleware.SteeringMiddleware"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m steerwise.vllm.serve --recipe NAME=DIR ... -- "
                         "--model MODEL [vLLM server options]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="python -m steerwise.vllm.serve")
    ap.add_argument("--recipe", action="append", required=True, metavar="NAME=DIR",
                    help="a recipe directory served under NAME (repeat for several)")
    ns = ap.parse_args(argv[:cut])
    recipes = {}
    for item in ns.recipe:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--recipe {item!r}: expected NAME=DIR")
        recipes[name] = path
    sys.argv = ["vllm.entrypoints.openai.api_server", *vllm_argv(recipes, argv[cut + 1:])]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
