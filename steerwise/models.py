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


class _BadGGUF(Exception):
    """A GGUF header that cannot be read (the message says why)."""


# GGUF metadata value types -> size in bytes (8 string and 9 array are read apart)
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_gguf_header(path: str | Path) -> dict:
    """The header of a GGUF file (format versions 2 and 3), read without building tensors:
    ``architecture``, ``name``, ``tensors`` (count), ``bytes`` (file size) and ``needs`` (the
    size the tensor table says the file has). Much faster than ``gguf.GGUFReader`` on files with
    large vocabularies (it skips the token arrays). Raises ``_BadGGUF`` naming the problem."""
    import mmap
    import struct

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _BadGGUF("empty file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != b"GGUF":
            raise _BadGGUF("not a GGUF file (bad magic number)")
        pos = 4

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise _BadGGUF("truncated GGUF file")
            out = struct.unpack_from("<" + fmt, buf, pos)
            pos += n
            return out if len(out) > 1 else out[0]

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > size:
                raise _BadGGUF("truncated GGUF file")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                string()
            elif vtype == 9:
                item, count = take("I"), take("Q")
                if item in _GGUF_SCALARS:
                    pos += _GGUF_SCALARS[item] * count
                else:
                    for _ in range(count):
                        skip(item)
            elif vtype in _GGUF_SCALARS:
                pos += _GGUF_SCALARS[vtype]
            else:
                raise _BadGGUF(f"corrupt GGUF file (unknown value type {vtype})")
            if pos > size:
                raise _BadGGUF("truncated GGUF file")

        version = take("I")
        if version not in (2, 3):
            raise _BadGGUF(f"unsupported GGUF version {version} (or a big-endian or corrupt file)")
        n_tensors, n_kv = take("Q"), take("Q")
        if n_tensors > size or n_kv > size:
            raise _BadGGUF("corrupt GGUF file (impossible tensor or key count)")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key, vtype = string(), take("I")
            if key in ("general.architecture", "general.name") and vtype == 8:
                meta[key] = string()
            elif key == "general.alignment" and vtype == 4:
                meta[key] = take("I")
            else:
                skip(vtype)
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        infos = []
        for _ in range(n_tensors):
            name, n_dims = string(), take("I")
            if n_dims > 8:
                raise _BadGGUF(f"corrupt GGUF file (tensor {name!r} has {n_dims} dimensions)")
            dims = [take("Q") for _ in range(n_dims)]
            ttype, offset = take("I"), take("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise _BadGGUF(f"unknown tensor type {ttype} in {name!r} (corrupt, or newer "
                               "than the installed gguf package)") from None
            count = 1
            for d in dims:
                count *= d
            infos.append(offset + count // block * type_size)
        align = int(meta.get("general.alignment", 32)) or 32
        data_start = (pos + align - 1) // align * align
        return {"architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
                "tensors": n_tensors, "bytes": size, "needs": data_start + max(infos, default=0)}
    finally:
        buf.close()


def inspect_gguf(path: str | Path) -> dict:
    """Check a local GGUF file before the slow load: readable (not truncated or corrupt), an
    architecture transformers can dequantize. Returns ``architecture``, ``name``, ``tensors``,
    ``bytes``. Raises ``ValueError`` with one line naming the problem."""
    require_gguf()
    path = Path(path)
    size = path.stat().st_size
    try:
        info = read_gguf_header(path)
    except _BadGGUF as exc:
        raise ValueError(f"cannot read {path} ({size} bytes): {exc}") from None
    if info["needs"] > size:
        raise ValueError(f"cannot read {path} ({size} bytes): truncated GGUF file (its tensors "
                         f"need {info['needs']} bytes)")
    arch = info["architecture"]
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
    return info


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
    except NotImplementedError as exc:  # transformers: the gguf package lacks the architecture
        from importlib.metadata import version

        raise ValueError(f"cannot load GGUF model {where}: the installed gguf package "
                         f"({version('gguf')}) does not know its architecture"
                         f"{' ' + repr(info['architecture']) if info else ''}; "
                         "pip install -U gguf") from exc
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
