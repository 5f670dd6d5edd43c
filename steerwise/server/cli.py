"""``steerwise serve``: the command line of the server, on either engine (docs/serving.md):
``--engine hf`` (default: this package's FastAPI server) or ``--engine vllm`` (vLLM's OpenAI
server with steerwise's worker and middleware, ``steerwise.vllm.serve``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_RECIPE = "pear"
ENGINES = ("hf", "vllm")
# the HF engine's bounds: None when not given (ServerConfig's default; --engine vllm refuses them)
HF_LIMITS = ("max_tokens", "max_prompt_tokens", "max_body_bytes", "max_queue", "max_batch")


def parse_recipe_args(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` (or ``DIR``, named after its folder) → {name: directory}."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        if not name or not path:
            raise ValueError(f"--recipe {value!r}: expected NAME=DIR")
        if name.lower() in ("none", "") or name in out:
            raise ValueError(f"--recipe {value!r}: the name {name!r} is reserved or repeated")
        out[name] = Path(path)
    return out


def demo_recipe(model, tokenizer, n_fit: int = 32):
    """The demo's CAA + DSAS 'pear' recipe on concept-lm (fitted in a few seconds)."""
    from ..fit import fit
    from ..tasks import concepts

    sets = concepts.demo_sets(n_fit, seed=0)
    return fit(model, tokenizer, sets["source"], sets["control"], sets["target"], gate="dsas",
               site="residual", progress=False, probe_accuracy=False, default_strength=5.0)


def api_key(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``STEERWISE_API_KEY``, else None."""
    return args.api_key or os.environ.get("STEERWISE_API_KEY") or None


def build_server(args: argparse.Namespace):
    """(app, engine, config) from parsed ``serve`` arguments."""
    from ..models import DEFAULT_MODEL, load_model
    from ..recipe import Recipe
    from .app import create_app
    from .engine import Engine
    from .policy import ServerConfig

    model_id = args.model or DEFAULT_MODEL
    model, tok = load_model(model_id, dtype=args.dtype or "float32", device=args.device,
                          gguf_file=args.gguf_file)
    recipes = {name: Recipe.from_pretrained(path)
               for name, path in parse_recipe_args(args.recipe).items()}
    if args.demo:
        if DEMO_RECIPE in recipes:
            raise ValueError(f"--demo adds a recipe named {DEMO_RECIPE!r}; rename yours")
        recipes[DEMO_RECIPE] = demo_recipe(model, tok)
    limits = {k: getattr(args, k) for k in HF_LIMITS if getattr(args, k) is not None}
    config = ServerConfig(
        model_name=args.served_name or model_id, default_recipe=args.default_recipe,
        default_strength=args.strength, max_strength=args.max_strength,
        api_key=api_key(args), **limits,
    )
    engine = Engine(model, tok, recipes, max_batch=config.max_batch, max_queue=config.max_queue,
                    joining=False if args.no_joining else None)
    try:
        app = create_app(engine, config)
    except BaseException:
        engine.close()
        raise
    return app, engine, config


def _cmd_serve(args: argparse.Namespace) -> int:
    from .policy import exposure_warning

    args.api_key = api_key(args)
    if args.vllm_args and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    if args.engine == "vllm":
        from ..vllm.serve import serve

        return serve(args)
    if args.vllm_args:
        raise ValueError(f"{' '.join(args.vllm_args)!r}: options after -- go to vLLM's server; "
                         f"they need --engine vllm")
    try:
        import uvicorn
    except ImportError:
        raise ValueError("steerwise serve needs the serve extra: pip install 'steerwise[serve]'"
                         ) from None
    warn_exposure(exposure_warning(args.host, args.api_key))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app, engine, config = build_server(args)
    print(f"steerwise serve: {config.model_name} with recipes "
          f"{', '.join(engine.recipes) or '(none)'} on http://{args.host}:{args.port} "
          f"(playground at /)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def warn_exposure(warning: str | None) -> None:
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)


def register(sub) -> None:
    from ..cli import add_model_args, finite_float, non_negative_int, positive_float, positive_int
    from ..models import DEFAULT_MODEL
    from .policy import ServerConfig

    d = ServerConfig()
    p = sub.add_parser("serve", help="OpenAI-compatible server: per-request recipe and strength",
                       description="An OpenAI-compatible server with per-request recipe and "
                       "strength, on the HF engine (default) or on vLLM (--engine vllm; options "
                       "after -- go to vLLM's server). Flags marked [hf] are the HF engine's "
                       "only; --engine vllm refuses them. See docs/serving.md.")
    p.add_argument("--engine", choices=ENGINES, default="hf",
                   help="hf: steerwise's server (transformers); vllm: vLLM's OpenAI server with "
                        "the recipes (needs vLLM; docs/vllm.md)")
    add_model_args(p)
    p.set_defaults(model=None, dtype=None)  # None: not given (--engine vllm passes only given ones)
    notes = {"model": f" (default: {DEFAULT_MODEL}; --engine vllm: required)",
             "dtype": " (default: float32; --engine vllm: vLLM's)"}
    for action in p._actions:
        if action.dest in notes:
            action.help += notes[action.dest]
        elif action.dest in ("device", "gguf_file"):
            action.help = "[hf] " + action.help
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=DIR",
                   help="a recipe a request may name (repeatable); requests can never give paths")
    p.add_argument("--demo", action="store_true",
                   help=f"[hf] also fit the demo's CAA + DSAS {DEMO_RECIPE!r} recipe (concept-lm)")
    p.add_argument("--default-recipe", default=None,
                   help="recipe of requests that name none (default: unsteered)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="strength of requests that give none (default: the recipe's own)")
    p.add_argument("--max-strength", type=positive_float, default=d.max_strength,
                   help="bound on |strength|")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port to bind")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (or set STEERWISE_API_KEY)")
    p.add_argument("--served-name", default=None, help="model id in the API (default: --model)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help=f"[hf] bound on a request's max_tokens (default: {d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help=f"[hf] bound on a prompt's length in tokens, longer: 400 "
                        f"(default: {d.max_prompt_tokens})")
    p.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help=f"[hf] bound on a request body, larger: 413 "
                        f"(default: {d.max_body_bytes})")
    p.add_argument("--max-queue", type=positive_int, default=None,
                   help=f"[hf] requests waiting for a batch slot; more get 429 "
                        f"(default: {d.max_queue})")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help=f"[hf] rows decoded together (default: {d.max_batch})")
    p.add_argument("--no-joining", action="store_true",
                   help="[hf] batch without joining running batches (requests wait for the next)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="[hf] torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (vLLM: --uvicorn-log-level)")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_OPTION",
                   help="with --engine vllm: options of vLLM's server, after -- (e.g. -- "
                        "--enforce-eager --max-model-len 4096)")
    p.set_defaults(func=_cmd_serve)
