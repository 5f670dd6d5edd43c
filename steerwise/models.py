"""Loading models: any hub id or local directory, like every transformers tool; or the
embedded default (``concept-lm``, shipped inside the package) by name."""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"concept-lm": ASSETS / "concept-lm", "task-lm": ASSETS / "task-lm"}
DEFAULT_MODEL = "concept-lm"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str) -> str:
    """An embedded model's directory, or ``name`` unchanged (hub id or local path)."""
    if name in EMBEDDED:
        path = EMBEDDED[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the embedded model {name!r} is missing from {path}")
        return str(path)
    return name


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) in eval mode. ``device`` defaults to CUDA when available."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
