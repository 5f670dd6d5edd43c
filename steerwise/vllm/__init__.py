"""steerwise recipes inside an unmodified vLLM: per-token gates, per-request recipe and strength.

::

    from vllm import LLM, SamplingParams
    import steerwise.vllm as sv

    llm = LLM(model_dir, **sv.engine_args({"detox": "recipes/detox"}))
    params = SamplingParams(max_tokens=32, extra_args=sv.steering_args("detox", 4.0))
    out = llm.generate(sv.steered_prompt("Some prompt", "detox", 4.0), params)

Each request picks its recipe and strength through ``SamplingParams.extra_args`` (over HTTP:
``vllm_xargs``) with the keys ``steering_recipe`` and ``steering_strength``; no recipe or
strength 0 is vanilla vLLM. ``steered_prompt`` adds the ``cache_salt`` that keeps prefix caching
from reusing KV blocks computed under another steering. See docs/vllm.md.

Importing this package does not import vLLM (the worker and validator modules do).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .runtime import XARG_RECIPE, XARG_STRENGTH, SteeringRequestError, parse_request

WORKER_CLS = "steerwise.vllm.worker.SteeringWorker"
VALIDATOR_CLS = "steerwise.vllm.validate:SteeringValidator"
ENV_RECIPES = "STEERWISE_VLLM_RECIPES"  # {name: default strength}, set by engine_args
# vLLM 0.32 picks Model Runner V2 wherever Triton is installed (every CUDA install) unless this
# says otherwise; the steering worker routes tokens through the V1 runner
ENV_V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"
ENV_SERVER = "STEERWISE_VLLM_SERVER"  # {default_recipe, default_strength, max_strength}: serve

__all__ = [
    "shutdown",
    "VALIDATOR_CLS",
    "WORKER_CLS",
    "XARG_RECIPE",
    "XARG_STRENGTH",
    "SteeringRequestError",
    "cache_salt",
    "engine_args",
    "parse_request",
    "steered_prompt",
    "steering_args",
    "use_every_cpu_core",
]


def engine_args(recipes: Mapping[str, str | os.PathLike], **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` that load ``recipes`` ({name: recipe
    directory}) into every worker and check each request's steering fields in the front end.

    Also sets ``STEERWISE_VLLM_RECIPES`` in this process (the names the front-end check knows)
    and, unless it is set already, ``VLLM_USE_V2_MODEL_RUNNER=0`` (vLLM's V1 model runner, the
    one the steering worker routes tokens through; unset, vLLM 0.32 picks V2 on CUDA).
    ``overrides`` are merged in (e.g. ``additional_config`` entries of your own are kept).
    """
    from ..recipe import Recipe

    if not recipes:
        raise ValueError("steerwise.vllm.engine_args: give at least one recipe {name: directory}")
    paths = {}
    defaults = {}
    for name, path in recipes.items():
        p = Path(path).resolve()
        try:
            defaults[str(name)] = Recipe.from_pretrained(p).default_strength
        except (OSError, ValueError) as exc:
            raise ValueError(f"steerwise.vllm: recipe {name!r} ({p}): {exc}") from exc
        paths[str(name)] = str(p)
    os.environ[ENV_RECIPES] = json.dumps(defaults)
    os.environ.setdefault(ENV_V2_RUNNER, "0")  # a user's own choice is kept (V2 is refused)
    extra = dict(overrides.pop("additional_config", None) or {})
    extra["steerwise"] = {"recipes": paths}
    procs = list(overrides.pop("logits_processors", None) or [])
    if VALIDATOR_CLS not in procs:
        procs.append(VALIDATOR_CLS)
    if overrides.get("worker_cls") not in (None, "auto", WORKER_CLS):
        raise ValueError(f"steerwise.vllm needs worker_cls={WORKER_CLS!r}, "
                         f"got {overrides['worker_cls']!r}")
    overrides.pop("worker_cls", None)
    return {"worker_cls": WORKER_CLS, "additional_config": extra, "logits_processors": procs,
            **overrides}


def use_every_cpu_core() -> None:
    """On a CPU machine of at most 4 cores, let vLLM's worker use them all
    (``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` unless set): vLLM keeps a core for its scheduler, which
    on 2 cores halves the worker's threads (measured: 100 prompts x 30 greedy tokens 60 s ->
    42 s). Call it before the engine starts."""
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def known_recipes() -> dict[str, float] | None:
    """{name: default strength} of the recipes ``engine_args`` loaded in this process (``None``
    when it did not run here)."""
    raw = os.environ.get(ENV_RECIPES)
    return None if not raw else {str(k): float(v) for k, v in json.loads(raw).items()}


def steering_args(recipe: str | None, strength: float | None = None) -> dict[str, Any]:
    """``SamplingParams.extra_args`` (or ``vllm_xargs``) that steer a request."""
    if recipe is None:
        return {}
    out: dict[str, Any] = {XARG_RECIPE: recipe}
    if strength is not None:
        out[XARG_STRENGTH] = float(strength)
    return out


def cache_salt(recipe: str | None, strength: float | None, salt: str | None = None) -> str | None:
    """The prefix-cache salt of a steered request (``None`` for an unsteered one, which shares
    the cache with vanilla requests). A caller's own ``salt`` is kept in front."""
    if recipe is None or (strength is not None and float(strength) == 0.0):
        return salt
    key = json.dumps([recipe, None if strength is None else float(strength)])
    ours = "steerwise:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return ours if not salt else f"{salt}|{ours}"


def steered_prompt(
    prompt: str | Mapping[str, Any], recipe: str | None, strength: float | None = None
) -> dict[str, Any]:
    """A vLLM prompt dict (``{"prompt": ...}`` or the given dict) with the ``cache_salt`` of
    this steering."""
    out = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
    salt = cache_salt(recipe, strength, out.get("cache_salt"))
    if salt is not None:
        out["cache_salt"] = salt
    return out


def shutdown(llm: Any) -> None:
    """Stop an ``LLM``'s engine core now (its processes and memory), not at garbage collection."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
