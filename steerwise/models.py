"""Loading models: any hub id or local directory, like every transformers tool; or the
embedded default (``concept-lm``, shipped inside the package) by name."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"concept-lm": ASSETS / "concept-lm", "task-lm": ASSETS / "task-lm"}
DEFAULT_MODEL = "concept-lm"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# what the Hugging Face hub accepts as a repo id: "name" or "namespace/name"
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.75) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id.

    True when it starts with ``/``, ``.`` or ``~``, holds a backslash or more than one ``/``
    (hub ids have at most one), or its first ``/``-separated part is an existing directory.
    """
    if name.startswith(("/", ".", "~")) or "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _missing_path_message(name: str, what: str) -> str:
    """``no <what> directory at NAME``, with the closest sibling of the deepest existing parent."""
    path = Path(name).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hint = ""
    if parent.is_dir():
        # the first missing component, compared with what the existing parent holds
        rel = path.relative_to(parent) if path.is_relative_to(parent) else path
        first = rel.parts[0] if rel.parts else path.name
        try:
            siblings = [p.name for p in parent.iterdir()]
        except OSError:
            siblings = []
        close = difflib.get_close_matches(first, siblings, n=1, cutoff=0.75)
        if close:
            hint = f" (did you mean {parent / close[0]}?)"
    return f"no {what} directory at {name}{hint}"


def check_model_name(
    name: str, embedded: Iterable[str], what: str = "model", kind: str = "embedded"
) -> Path | None:
    """Classify ``name`` without touching the network.

    Returns the local directory when ``name`` is one; ``None`` when it should be read as a hub id.
    Raises ``FileNotFoundError`` for a path-like name with no directory behind it (naming the
    closest existing sibling) and ``ValueError`` for a name that is neither a directory nor a
    hub id, or that is close to an embedded name (``concept_lm`` → did you mean concept-lm?).
    """
    embedded = list(embedded)
    if not name or not name.strip():
        raise ValueError(f"empty {what} name")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name} is a file; give the {what} directory that holds it")
    if looks_like_path(name):
        raise FileNotFoundError(_missing_path_message(name, what))
    known = f"{kind} {what}s: {', '.join(embedded)}" if embedded else ""
    hint = did_you_mean(name, embedded)
    if hint:
        raise ValueError(f"unknown {what} {name!r}{hint}; {known}")
    if not HUB_ID.match(name) or "--" in name or ".." in name:
        raise ValueError(
            f"{name!r} is neither a local directory nor a hub id (namespace/name)"
            + (f"; {known}" if known else "")
        )
    return None


def resolve_model_path(name: str) -> str:
    """An embedded model's directory, a local directory, or ``name`` unchanged (a hub id).

    Misspelled embedded names and missing local directories raise before any download is tried.
    """
    if name in EMBEDDED:
        path = EMBEDDED[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the embedded model {name!r} is missing from {path}")
        return str(path)
    local = check_model_name(name, EMBEDDED)
    if local is not None:
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{name} holds no config.json: not a Hugging Face model directory")
        return str(local)
    return name


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors often run on), less
    pointers to a stack trace the user is not shown."""
    for line in str(exc).splitlines():
        line = re.sub(r"\s*Please check out the root cause in the stacktrace above\.?", "", line)
        if line.strip():
            return line.strip()
    return type(exc).__name__


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) in eval mode. ``device`` defaults to CUDA when available."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as exc:
        raise OSError(f"cannot load model {name!r}: {first_line(exc)}") from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
