"""Loading models: any hub id or local directory, like every transformers tool; a GGUF file
(llama.cpp's format, dequantized by transformers; the ``gguf`` extra); or the embedded default
(``concept-lm``, shipped inside the package) by name."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
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
        raise ValueError(f"{name} is a file; give the {what} directory that holds it"
                         + (" (or a .gguf file)" if what == "model" else ""))
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


GGUF_INSTALL = "pip install 'steerwise[gguf]'"


def is_gguf_name(name: str) -> bool:
    """Whether ``name`` names a GGUF file (by its extension)."""
    return name.lower().endswith(".gguf")


def resolve_gguf(name: str, gguf_file: str | None = None) -> tuple[str, str] | None:
    """``(directory or hub id, file name)`` when ``name`` (with ``gguf_file``) means a GGUF file,
    else ``None``. ``name`` is a ``.gguf`` file path, or a directory (or hub id) that holds
    ``gguf_file``. A local file that is missing raises ``FileNotFoundError`` (naming the closest
    ``.gguf`` file beside it)."""
    if gguf_file is None and not is_gguf_name(name):
        return None
    if gguf_file is not None:
        if not gguf_file.strip() or "/" in gguf_file or "\\" in gguf_file:
            raise ValueError(f"--gguf-file takes a file name inside --model's directory, "
                             f"got {gguf_file!r}")
        if is_gguf_name(name):
            raise ValueError(f"give either a .gguf file as the model ({name}) or --gguf-file, "
                             "not both")
        if name in EMBEDDED:
            raise ValueError(f"{name!r} is an embedded model, not a directory of GGUF files")
        local = check_model_name(name, EMBEDDED)
        if local is None:
            return name, gguf_file  # a hub repository holding the file
        directory, file = local, gguf_file
    else:
        path = Path(name).expanduser()
        directory, file = path.parent, path.name
        if path.is_dir():
            raise ValueError(f"{name} is a directory; a GGUF model is one .gguf file")
    target = directory / file
    if not target.is_file():
        siblings = sorted(p.name for p in directory.glob("*")
                          if is_gguf_name(p.name)) if directory.is_dir() else []
        hint = did_you_mean(file, siblings, cutoff=0.6)
        if not hint and siblings:
            hint = f" ({directory} holds: {', '.join(siblings[:5])})"
        raise FileNotFoundError(f"no GGUF file at {target}{hint}")
    return str(directory), file


def gguf_architectures() -> list[str]:
    """The GGUF architectures the installed transformers can dequantize."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def require_gguf() -> None:
    """Raise ``ImportError`` with the install command when ``gguf`` or ``accelerate`` is absent."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading a GGUF model needs the {' and '.join(missing)} "
                          f"package{'s' if len(missing) > 1 else ''}: {GGUF_INSTALL}")


def inspect_gguf(path: str | Path) -> dict:
    """Check a local GGUF file before the slow load: readable (not truncated or corrupt), an
    architecture transformers can dequantize. Returns ``architecture``, ``name``, ``tensors``,
    ``bytes``. Raises ``ValueError`` with one line naming the problem."""
    require_gguf()
    from gguf import GGUFReader

    path = Path(path)
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        tensors = reader.tensors
        end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
        arch_field = reader.fields.get("general.architecture")
        arch = arch_field.contents() if arch_field is not None else None
        name_field = reader.fields.get("general.name")
        model_name = name_field.contents() if name_field is not None else ""
    except Exception as exc:  # noqa: BLE001 (the reader fails in numpy on short or garbled data)
        why = "not a GGUF file (bad magic number)" if "magic" in str(exc).lower() else (
            f"truncated or corrupt GGUF file ({first_line(exc)})")
        raise ValueError(f"cannot read {path} ({size} bytes): {why}") from None
    if end > size:
        raise ValueError(f"cannot read {path}: truncated GGUF file ({size} bytes, its tensors "
                         f"need {end})")
    if not arch:
        raise ValueError(f"cannot read {path}: GGUF file without general.architecture")
    supported = gguf_architectures()
    # transformers maps a few llama.cpp names onto its own (qwen2moe, gpt-oss, minimax-m2, t5...)
    known = arch in supported or arch.replace("-", "_") in supported or (
        arch.replace("moe", "_moe") in supported) or "t5" in arch
    if not known:
        raise ValueError(f"transformers {_transformers_version()} cannot dequantize GGUF "
                         f"architecture {arch!r} ({path.name}); it supports: "
                         f"{', '.join(supported)}")
    return {"architecture": arch, "name": model_name, "tensors": len(tensors), "bytes": size}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _load_gguf(directory: str, file: str, dtype: str, progress: bool):
    """(model, tokenizer) from a GGUF file, dequantized to ``dtype`` by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    local = Path(directory) / file
    info = inspect_gguf(local) if local.is_file() else None
    where = str(local) if local.is_file() else f"{directory}:{file}"
    if progress:
        what = (f"{info['architecture']}, {info['tensors']} tensors, "
                f"{info['bytes'] / 1e6:.0f} MB" if info else "from the hub")
        print(f"loading GGUF model {where} ({what}): converting its tokenizer and dequantizing "
              f"to {dtype} (large files take minutes on a CPU)...", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file,
                                                     dtype=DTYPES[dtype])
    except OSError as exc:
        raise OSError(f"cannot load GGUF model {where}: {first_line(exc)}") from exc
    except ValueError as exc:
        msg = first_line(exc)
        if "not supported" in msg and "architecture" in msg.lower():
            msg += f" (transformers {_transformers_version()} supports: " \
                   f"{', '.join(gguf_architectures())})"
        raise ValueError(f"cannot load GGUF model {where}: {msg}") from exc
    # recipes and model cards record the file, not the directory that holds it
    model.config._name_or_path = where
    return model, tokenizer


def model_display_name(name: str, gguf_file: str | None = None) -> str:
    """How to give the model again on the command line: ``DIR/FILE.gguf`` for a local directory
    plus ``--gguf-file``, otherwise ``name``."""
    if gguf_file and Path(name).expanduser().is_dir():
        return str(Path(name) / gguf_file)
    return name


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str | None = None,
               gguf_file: str | None = None, progress: bool = True):
    """(model, tokenizer) in eval mode. ``device`` defaults to CUDA when available.

    ``name``: a hub id, a local directory, an embedded model name, or a ``.gguf`` file (llama.cpp's
    format, dequantized to ``dtype`` by transformers; ``pip install 'steerwise[gguf]'``);
    ``gguf_file``: the file name inside the directory (or hub repository) ``name``. ``progress``
    prints what a long GGUF load is doing on stderr.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    gguf = resolve_gguf(name, gguf_file)
    if gguf is not None:
        model, tokenizer = _load_gguf(*gguf, dtype=dtype, progress=progress)
    else:
        path = resolve_model_path(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        except OSError as exc:
            raise OSError(f"cannot load model {name!r}: {first_line(exc)}") from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
