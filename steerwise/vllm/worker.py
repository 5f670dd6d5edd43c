"""The vLLM worker that installs steerwise recipes.

``worker_cls="steerwise.vllm.worker.SteeringWorker"``:

It is the platform's own worker (CPU: ``CPUWorker``; CUDA/ROCm: ``Worker``) with two additions,
both made in ``load_model`` so that they are in place before vLLM compiles or captures the model:

- ``VllmSteering`` hooks on the decoder layers the recipes steer (``steerwise.vllm.runtime``);
- the model runner's ``_model_forward`` (called once per scheduled step, never for warm-up or
  capture runs) first writes each token's recipe and strength into the routing buffers, from
  the V1 runner's persistent batch: ``input_batch.req_ids`` (request order), ``query_start_loc``
  (token ranges), ``requests[id].sampling_params.extra_args`` (the request's choice) and, when a
  recipe leaves the first token unsteered, ``input_batch.num_computed_tokens_cpu`` (a request
  with none computed has its first token in this step).

The recipes come from ``additional_config["steerwise"]["recipes"]`` ({name: directory}); the
worker adds a digest of the recipe files there, so vLLM's compile cache (keyed on the config
hash) never serves a graph traced for other recipes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..recipe import Recipe
from .runtime import VllmSteering, parse_request

CONFIG_KEY = "steerwise"
TESTED_VLLM = ("0.32",)  # major.minor versions whose runner internals this was tested against
MIN_VLLM = (0, 32)
log = logging.getLogger(__name__)


def check_vllm_version(version: str) -> None:
    """Refuse vLLM older than the runner internals this relies on; warn on untested newer ones."""
    parts = version.split("+")[0].split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        log.warning("steerwise.vllm: cannot read vLLM version %r; tested: %s", version,
                    ", ".join(TESTED_VLLM))
        return
    if major_minor < MIN_VLLM:
        raise RuntimeError(
            f"steerwise.vllm needs vLLM >= {MIN_VLLM[0]}.{MIN_VLLM[1]} (its V1 model runner "
            f"internals); this is vLLM {version}"
        )
    if f"{major_minor[0]}.{major_minor[1]}" not in TESTED_VLLM:
        log.warning("steerwise.vllm was tested with vLLM %s; this is %s (the runner internals it "
                    "uses may have changed: run tests/test_vllm.py)", ", ".join(TESTED_VLLM),
                    version)


def _platform_worker() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    if current_platform.is_cuda_alike():
        from vllm.v1.worker.gpu_worker import Worker

        return Worker
    raise RuntimeError(
        f"steerwise.vllm supports vLLM's CPU and CUDA/ROCm workers; this platform is "
        f"{type(current_platform).__name__}"
    )


def recipes_from_config(vllm_config: Any) -> dict[str, Path]:
    extra = getattr(vllm_config, "additional_config", None) or {}
    section = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    recipes = (section or {}).get("recipes")
    if not isinstance(recipes, dict) or not recipes:
        raise ValueError(
            "steerwise.vllm: no recipes configured; pass additional_config="
            '{"steerwise": {"recipes": {"<name>": "<recipe dir>", ...}}} '
            "(steerwise.vllm.engine_args builds it)"
        )
    return {str(k): Path(v) for k, v in recipes.items()}


def recipes_digest(paths: dict[str, Path]) -> str:
    """SHA-256 over the recipe names and the bytes of their files."""
    h = hashlib.sha256()
    for name in sorted(paths):
        h.update(name.encode() + b"\0")
        for f in sorted(p for p in paths[name].iterdir() if p.is_file()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def check_engine_config(vllm_config: Any) -> None:
    """Refuse engine configurations in which the routing buffers would not match the tokens a
    hook sees. Micro-batching (dual batch overlap, ``enable_dbo`` / ``ubatch_size`` > 1) runs the
    model on slices of the step's tokens, each slice's hooks starting at token 0."""
    par = getattr(vllm_config, "parallel_config", None)
    if par is not None and (getattr(par, "enable_dbo", False)
                            or int(getattr(par, "ubatch_size", 0) or 0) > 1):
        raise RuntimeError(
            "steerwise.vllm does not support micro-batching (enable_dbo / ubatch_size > 1): the "
            "model runs on slices of a step's tokens, which the per-token routing does not "
            "follow; turn it off to serve steered requests")


def install(worker: Any) -> VllmSteering:
    """Load the configured recipes onto ``worker``'s model and route tokens before each step."""
    import vllm

    check_vllm_version(vllm.__version__)
    if getattr(worker, "use_v2_model_runner", False):
        raise RuntimeError(
            "steerwise.vllm routes tokens through vLLM's V1 model runner (input_batch, "
            "query_start_loc); this engine uses Model Runner V2. Set VLLM_USE_V2_MODEL_RUNNER=0."
        )
    cfg = worker.vllm_config
    check_engine_config(cfg)
    paths = recipes_from_config(cfg)
    recipes = {}
    for name, path in paths.items():
        try:
            recipes[name] = Recipe.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"steerwise.vllm: recipe {name!r} ({path}): {exc}") from exc
    cfg.additional_config[CONFIG_KEY]["digest"] = recipes_digest(paths)
    runner = worker.model_runner
    if not hasattr(runner, "input_batch") or not hasattr(runner, "query_start_loc"):
        raise RuntimeError(
            f"steerwise.vllm: the model runner {type(runner).__name__} lacks the V1 runner "
            "state it routes tokens with (input_batch, query_start_loc); vLLM version unsupported"
        )
    hf = cfg.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    steering = VllmSteering(
        runner.get_model(),
        recipes,
        model_type=str(text.model_type),
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
        max_tokens=int(runner.max_num_tokens),
        device=runner.device,
    )
    original = runner._model_forward

    def _model_forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("input_ids") is not None:
            num_tokens = int(kwargs["input_ids"].shape[0])
        elif kwargs.get("inputs_embeds") is not None:
            num_tokens = int(kwargs["inputs_embeds"].shape[0])
        else:
            num_tokens = int(kwargs["positions"].shape[-1])
        batch = runner.input_batch
        n = batch.num_reqs
        qsl = runner.query_start_loc.np[: n + 1]
        routes = []
        for rid in batch.req_ids[:n]:
            params = runner.requests[rid].sampling_params
            name, strength = parse_request(
                getattr(params, "extra_args", None), steering.defaults)
            routes.append((0, 0.0) if name is None else (steering.names.index(name), strength))
        computed = batch.num_computed_tokens_cpu[:n] if steering.skips_first else None
        steering.fill(routes, np.diff(qsl), num_tokens, computed)
        return original(*args, **kwargs)

    runner._model_forward = _model_forward
    worker.steerwise = steering
    return steering


class _SteeringMixin:
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        install(self)


SteeringWorker = type("SteeringWorker", (_SteeringMixin, _platform_worker()), {
    "__module__": __name__, "__doc__": "The platform's vLLM worker, with steerwise recipes."})
