"""``steerwise serve``: the command line of the server (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_RECIPE = "pear"


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


def build_server(args: argparse.Namespace):
    """(app, engine, config) from parsed ``serve`` arguments."""
    from ..models import load_model
    from ..recipe import Recipe
    from .app import create_app
    from .engine import Engine
    from .schemas import ServerConfig

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                          gguf_file=args.gguf_file)
    recipes = {name: Recipe.from_pretrained(path)
               for name, path in parse_recipe_args(args.recipe).items()}
    if args.demo:
        if DEMO_RECIPE in recipes:
            raise ValueError(f"--demo adds a recipe named {DEMO_RECIPE!r}; rename yours")
        recipes[DEMO_RECIPE] = demo_recipe(model, tok)
    config = ServerConfig(
        model_name=args.served_name or args.model, default_recipe=args.default_recipe,
        default_strength=args.strength, max_strength=args.max_strength,
        max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
        api_key=args.api_key or os.environ.get("STEERWISE_API_KEY") or None,
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
    try:
        import uvicorn
    except ImportError:
        raise ValueError("steerwise serve needs the serve extra: pip install 'steerwise[serve]'"
                         ) from None
    from .app import exposure_warning

    warning = exposure_warning(args.host, args.api_key or os.environ.get("STEERWISE_API_KEY"))
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
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


def register(sub) -> None:
    from ..cli import add_model_args, finite_float, non_negative_int, positive_float, positive_int

    p = sub.add_parser("serve", help="OpenAI-compatible server: per-request recipe and strength")
    add_model_args(p)
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=DIR",
                   help="a recipe a request may name (repeatable); requests can never give paths")
    p.add_argument("--demo", action="store_true",
                   help=f"also fit the demo's CAA + DSAS {DEMO_RECIPE!r} recipe (concept-lm)")
    p.add_argument("--default-recipe", default=None,
                   help="recipe of requests that name none (default: unsteered)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="strength of requests that give none (default: the recipe's own)")
    p.add_argument("--max-strength", type=positive_float, default=20.0,
                   help="bound on |strength|")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port to bind")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (or set STEERWISE_API_KEY)")
    p.add_argument("--served-name", default=None, help="model id in the API (default: --model)")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="bound on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=2048,
                   help="bound on a prompt's length in tokens (longer: 400)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1_000_000,
                   help="bound on a request body (larger: 413)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a batch slot; more get 429")
    p.add_argument("--max-batch", type=positive_int, default=16, help="rows decoded together")
    p.add_argument("--no-joining", action="store_true",
                   help="batch without joining running batches (requests wait for the next one)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")
    p.set_defaults(func=_cmd_serve)
