"""Loading a diffusers pipeline from a hub id, a local directory, or a built-in tiny name."""

from __future__ import annotations

import warnings
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "steerwise's diffusion support needs diffusers: pip install 'steerwise[diffusion]'"
        ) from exc


def _from_pretrained(name: str, dtype: torch.dtype, tiny: tuple[str, ...]) -> Any:
    """``DiffusionPipeline.from_pretrained`` after a check of the name that needs no network,
    with diffusers' warnings and log lines held back and a failure reported in one line."""
    from ..models import check_model_name, first_line

    local = check_model_name(name, tiny, what="pipeline", kind="built-in")
    if local is not None and not (local / "model_index.json").is_file():
        raise FileNotFoundError(f"{name} holds no model_index.json: not a diffusers pipeline directory")
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DiffusionPipeline.from_pretrained(name, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load pipeline {name!r}: {first_line(exc)}") from exc
    finally:
        dlogging.set_verbosity(level)


def load_pipeline(name_or_path: str, *, dtype: str = "float32", device: str | None = None) -> Any:
    """A diffusers pipeline: ``tiny-sd`` / ``tiny-sd3`` (random, offline), a hub id or a path.

    Hub ids honour ``HF_HUB_OFFLINE`` like any diffusers tool (offline: the local cache only).
    """
    require_diffusers()
    from .testing import TINY_PIPELINES, tiny_pipeline

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if name_or_path in TINY_PIPELINES:
        pipe = tiny_pipeline(name_or_path)
        if dtype != "float32":
            pipe = pipe.to(dtype=DTYPES[dtype])
    else:
        pipe = _from_pretrained(name_or_path, DTYPES[dtype], TINY_PIPELINES)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
