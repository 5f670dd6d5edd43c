"""Loading a diffusers pipeline from a hub id, a local directory, or a built-in tiny name."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hold back transformers' and diffusers' warnings and log lines (e.g. "requires torchvision"
    while diffusers imports a pipeline class, deprecation notices, hub look-up chatter)."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    levels = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(levels[0])
        tlogging.set_verbosity(levels[1])


def _from_pretrained(name: str, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained``, a failure reported in one line."""
    from diffusers import DiffusionPipeline

    from ..models import first_line

    try:
        return DiffusionPipeline.from_pretrained(name, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load pipeline {name!r}: {first_line(exc)}") from exc


def load_pipeline(name_or_path: str, *, dtype: str = "float32", device: str | None = None) -> Any:
    """A diffusers pipeline: ``tiny-sd`` / ``tiny-sd3`` (random, offline), a hub id or a path.

    Hub ids honour ``HF_HUB_OFFLINE`` like any diffusers tool (offline: the local cache only).
    """
    from ..models import check_model_name
    from .testing import TINY_PIPELINES, tiny_pipeline

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if name_or_path not in TINY_PIPELINES:  # checked before diffusers is imported or the hub asked
        local = check_model_name(name_or_path, TINY_PIPELINES, what="pipeline", kind="built-in")
        if local is not None and not (local / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{name_or_path} holds no model_index.json: not a diffusers pipeline directory")
    require_diffusers()
    with quiet_libraries():
        if name_or_path in TINY_PIPELINES:
            pipe = tiny_pipeline(name_or_path)
            if dtype != "float32":
                pipe = pipe.to(dtype=DTYPES[dtype])
        else:
            pipe = _from_pretrained(name_or_path, DTYPES[dtype])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
