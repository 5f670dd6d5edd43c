"""Recipe directories on disk: validated JSON + safetensors reading, all-or-nothing writing.

Generic over the recipe kind: ``steerwise.recipe`` (steering recipes) and
``steerwise.scaling.recipe`` (scaling recipes) both read and write through this module; each
declares its own format name, version and fields. Every problem is one ``RecipeError`` naming the
file and the field (docs/engine.md, "Recipe format").
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .identity import ModelIdentity
from .sites import Site

CONFIG_NAME = "steerwise.json"
TENSORS_NAME = "steering.safetensors"
CARD_NAME = "README.md"  # the model card (steerwise.card), written with every steering recipe

# ---- reading and writing recipe directories ----------------------------------------------------
# What a loader accepts (docs/engine.md, "Validation"): JSON that is UTF-8, an object at the top,
# every number finite, every key known, every field of its type; tensors whose names, shapes and
# dtypes match what the JSON declares, checked on the safetensors header before any tensor is
# read or any map is built, and whose values are finite. Symlinks are followed; what they lead to
# must be a regular file.
MAX_WIDTH = 1 << 20  # widest feature axis a recipe may declare (hidden sizes are ~10^3..10^4)
MAX_CONFIG_BYTES = 64 << 20  # a larger steerwise.json is refused before it is read
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Tensors that may hold an infinity on purpose: the AcT maps' support bounds, where -inf / +inf
# mean "no bound" (keyed by the end of the tensor's name).
INFINITY_ALLOWED = {".map.lo": -math.inf, ".map.hi": math.inf}


class RecipeError(ValueError):
    """A recipe directory that cannot be read or written; the message names file and field."""


class RecipeNotFoundError(RecipeError, FileNotFoundError):
    """The directory does not exist or holds no ``steerwise.json``."""


_KINDS: dict[type, str] = {
    type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
    list: "array", dict: "object",
}
_REQUIRED: Any = object()


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value: null, boolean, integer, number, string, array, object."""
    return _KINDS.get(type(value), type(value).__name__)


def _fits(value: Any, kinds: str | tuple[str, ...]) -> bool:
    kind = json_kind(value)
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    return kind in kinds or (kind == "integer" and "number" in kinds)


def _describe(value: Any) -> str:
    text = json.dumps(value, default=repr)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} (a JSON {json_kind(value)})"


def _article(kinds: str | tuple[str, ...]) -> str:
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    return " or ".join(("an " if k[0] in "aeiou" else "a ") + k for k in kinds)


def _field_path(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def non_finite_value(value: Any, where: str = "") -> tuple[str, float] | None:
    """The path and value of the first NaN/inf number in parsed JSON, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the top level", value
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite_value(item, _field_path(where, key))
        if found:
            return found
    return None


class RecipeFields:
    """One JSON object of a recipe file; every error names the file and the field."""

    def __init__(
        self, file: Path, obj: Any, where: str = "", known: Iterable[str] | None = None
    ) -> None:
        self.file, self.where = file, where
        if not isinstance(obj, dict):
            self.fail(where or "the top level", f"expected a JSON object, got {_describe(obj)}")
        self.obj: dict[str, Any] = obj
        if known is not None:
            known = list(known)
            for key in obj:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    self.fail(where or "the top level",
                              f"unknown key {key!r}{hint}; known keys: {', '.join(known)}")

    def fail(self, where: str, problem: str) -> NoReturn:
        raise RecipeError(f"{self.file}: {where}: {problem}")

    def path(self, key: str) -> str:
        return _field_path(self.where, key)

    def get(self, key: str, kinds: str | tuple[str, ...], default: Any = _REQUIRED) -> Any:
        if key not in self.obj:
            if default is _REQUIRED:
                self.fail(self.where or "the top level", f"missing required key {key!r}")
            return default
        value = self.obj[key]
        if not _fits(value, kinds):
            self.fail(self.path(key), f"expected {_article(kinds)}, got {_describe(value)}")
        return value

    def width(self, key: str, default: Any = _REQUIRED) -> int:
        """A declared feature width: an integer in 1..MAX_WIDTH (checked before any allocation)."""
        value = self.get(key, "integer", default)
        if not 1 <= value <= MAX_WIDTH:
            self.fail(self.path(key), f"{value} is out of range (a width is 1..{MAX_WIDTH})")
        return int(value)

    def identity(self, key: str = "model") -> ModelIdentity:
        m = RecipeFields(self.file, self.get(key, "object"), self.path(key),
                         known=[f.name for f in fields(ModelIdentity)])
        ident = ModelIdentity(
            model_type=m.get("model_type", "string"), hidden_size=m.width("hidden_size"),
            num_layers=m.get("num_layers", "integer"), name_or_path=m.get("name_or_path", "string", ""),
        )
        if ident.num_layers < 0:
            m.fail(m.path("num_layers"), f"{ident.num_layers} is negative")
        return ident

    def site(self, obj: Any, where: str) -> Site:
        kinds = {"name": "string", "module": "string", "layer": "integer", "io": "string",
                 "tuple_index": ("integer", "null"), "channel_dim": "integer"}
        s = RecipeFields(self.file, obj, where, known=[f.name for f in fields(Site)])
        for key in s.obj:
            s.get(key, kinds.get(key, tuple(_KINDS.values())))
        for key in ("name", "module"):
            s.get(key, "string")
        if s.obj.get("io", "output") not in ("output", "input"):
            s.fail(s.path("io"), f"{s.obj['io']!r} is neither 'output' nor 'input'")
        return Site.from_json(s.obj)


def build_on_meta(file: Path, where: str, build: Callable[..., nn.Module], *args: Any) -> nn.Module:
    """``build(*args)`` on the meta device (tensors take no memory): shapes without allocating.

    A failure is a ``RecipeError`` naming ``file`` and the field ``where``."""
    try:
        with torch.device("meta"):
            return build(*args)
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as exc:
        raise RecipeError(f"{file}: {where}: {exc}") from exc


def check_option_kinds(
    file: Path, given: dict[str, Any], reference: dict[str, Any], where: str
) -> None:
    """Each key of ``given`` must be a key of ``reference`` (a module's config), of its JSON kind."""
    RecipeFields(file, given, where, known=reference)
    for key, value in given.items():
        want = json_kind(reference[key])
        if want != "null" and not _fits(value, want):
            raise RecipeError(f"{file}: {_field_path(where, key)}: expected {_article(want)}, "
                              f"got {_describe(value)}")


def check_file(file: Path, what: str) -> os.stat_result:
    """Stat ``file`` following symlinks; it must then be a regular file."""
    try:
        st = file.stat()
    except FileNotFoundError:
        if file.is_symlink():
            raise RecipeError(f"{file}: a broken symlink (to {os.readlink(file)})") from None
        raise RecipeError(f"{file}: missing; a {what} needs {CONFIG_NAME} and {TENSORS_NAME}") \
            from None
    except OSError as exc:
        raise RecipeError(f"{file}: cannot be read ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        link = f" (a symlink to {file.resolve()})" if file.is_symlink() else ""
        raise RecipeError(f"{file}: {kind}{link}; a {what}'s files must be regular files")
    return st


def read_recipe_config(path: Path, fmt: str, max_version: int, what: str) -> dict[str, Any]:
    """The JSON of a recipe directory: parsed, finite, of format ``fmt`` and a readable version.

    The fields themselves are checked by each loader (``RecipeFields``)."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        problem = "no such directory" if not path.exists() else "not a directory"
        raise RecipeNotFoundError(f"{path} is not a {what} ({problem})")
    if not os.path.lexists(file):
        raise RecipeNotFoundError(f"{path} is not a {what} (no {CONFIG_NAME})")
    size = check_file(file, what).st_size
    if size > MAX_CONFIG_BYTES:
        raise RecipeError(f"{file}: {size} bytes; a recipe's JSON is at most {MAX_CONFIG_BYTES}")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{file}: cannot be read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise RecipeError(f"{file}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, "
                          f"column {column})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}") from None
    except RecursionError:
        raise RecipeError(f"{file}: invalid JSON: nested too deeply") from None
    top = RecipeFields(file, config)
    bad = non_finite_value(config)
    if bad:
        top.fail(bad[0], f"{bad[1]} is not a finite number")
    if config.get("format") != fmt:
        raise RecipeError(
            f"{file} is not a {what} (format {config.get('format')!r}; expected {fmt!r})"
        )
    version = top.get("format_version", "integer")
    if version < 1:
        top.fail("format_version", f"{version} is not a format version (1, 2, ...)")
    if version > max_version:
        raise RecipeError(
            f"{file} uses {what} format {version}; this steerwise ({__version__}) reads up to "
            f"{max_version}: upgrade steerwise"
        )
    return config


def _non_finite_problem(name: str, tensor: torch.Tensor) -> str | None:
    if not tensor.is_floating_point():
        return None
    ok = torch.isfinite(tensor)
    for suffix, allowed in INFINITY_ALLOWED.items():
        if name.endswith(suffix):
            ok |= tensor == allowed
    if bool(ok.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    counts = {"NaN": nan, "inf": int((~ok).sum()) - nan}
    found = " and ".join(f"{what} ({n} of {tensor.numel()} values)" for what, n in counts.items() if n)
    return f"tensor {name!r} holds {found}; recipe tensors must be finite"


def read_recipe_tensors(
    file: Path, expected: dict[str, tuple[tuple[int, ...], str]], what: str
) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, exactly ``expected`` (name → (shape, who needs it)).

    Names, shapes and dtypes are checked on the safetensors header before any tensor is read."""
    check_file(file, what)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = {}
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                part = f.get_slice(key)
                header[key] = (tuple(part.get_shape()), part.get_dtype())
            missing = [k for k in expected if k not in header]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise RecipeError(f"{file}: missing tensor {missing[0]!r}{more}, needed by "
                                  f"{expected[missing[0]][1]}")
            extra = sorted(k for k in header if k not in expected)
            if extra:
                names = ", ".join(repr(k) for k in extra[:4])
                more = f" and {len(extra) - 4} more" if len(extra) > 4 else ""
                noun = "tensor" if len(extra) == 1 else "tensors"
                raise RecipeError(f"{file}: unexpected {noun} {names}{more}: no part of "
                                  f"{CONFIG_NAME} uses them")
            for name, (shape, owner) in expected.items():
                got, dtype = header[name]
                if got != shape:
                    raise RecipeError(f"{file}: tensor {name!r} has shape {got}, but {owner} "
                                      f"needs {shape}")
                if dtype not in FLOAT_DTYPES:
                    raise RecipeError(f"{file}: tensor {name!r} has dtype {dtype}; recipe "
                                      f"tensors are floating point ({', '.join(FLOAT_DTYPES)})")
            tensors = {name: f.get_tensor(name) for name in expected}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise RecipeError(f"{file}: not a readable safetensors file ({exc})") from exc
    for name, tensor in tensors.items():
        problem = _non_finite_problem(name, tensor)
        if problem:
            raise RecipeError(f"{file}: {problem}")
    return tensors


def state_shapes(module: nn.Module, prefix: str, owner: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected tensors of a (meta) module: name → (shape, who needs it)."""
    return {prefix + k: (tuple(v.shape), owner) for k, v in module.state_dict().items()}


def _existing_target(target: Path) -> str:
    """What ``target`` is now: "missing", "empty" (directory) or "recipe" (directory holding only
    recipe files); anything else may belong to the user and is refused."""
    if not os.path.lexists(target):
        return "missing"
    if not target.is_dir():
        raise RecipeError(f"{target} exists and is not a directory; refusing to replace it")
    names = [p.name for p in target.iterdir()]
    ours = (CONFIG_NAME, TENSORS_NAME, *((CARD_NAME,) if CONFIG_NAME in names else ()))
    foreign = sorted(n for n in names if n not in ours)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise RecipeError(
            f"{target} is a directory that holds other files than a recipe ({shown}); refusing "
            f"to replace it: save to a new or empty directory, or over an existing recipe"
        )
    return "recipe" if names else "empty"


def write_recipe_dir(
    target: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``steerwise.json`` + ``steering.safetensors`` (+ ``extra_files``, name → text: the
    model card), all or nothing.

    Both files are written to a hidden staging directory beside ``target``. A new ``target``
    is that directory renamed; an empty one receives the two files (tensors first, the JSON that
    makes it a recipe last); an existing recipe is swapped as a whole (old → staging, new →
    ``target``, old put back if that fails). Symlinks in ``target`` are followed."""
    bad = non_finite_value(config)
    if bad:
        raise RecipeError(f"cannot save {target}: {bad[0]} is {bad[1]}; recipe values must be finite")
    for name, tensor in tensors.items():
        problem = _non_finite_problem(name, tensor)
        if problem:
            raise RecipeError(f"cannot save {target}: {problem}")
    text = json.dumps(config, indent=2, allow_nan=False)
    real = Path(os.path.realpath(target))
    state = _existing_target(real)
    real.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{real.name}.steerwise-", dir=real.parent))
    new, old = stage / "new", stage / "old"
    keep_stage = False
    try:
        new.mkdir()
        save_file(tensors, str(new / TENSORS_NAME), metadata={"format": str(config["format"])})
        for name, content in (extra_files or {}).items():
            (new / name).write_text(content, encoding="utf-8")
        (new / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        names = (*(extra_files or {}), TENSORS_NAME, CONFIG_NAME)
        if state == "missing":
            os.rename(new, real)
        elif state == "empty":  # keep the user's directory (its permissions, a cwd in it)
            try:
                for name in names:
                    os.rename(new / name, real / name)
            except BaseException:
                for name in names:
                    (real / name).unlink(missing_ok=True)
                raise
        else:
            os.rename(real, old)
            try:
                os.rename(new, real)
            except BaseException as exc:
                try:
                    os.rename(old, real)
                except OSError as again:
                    keep_stage = True
                    raise RecipeError(
                        f"saving {real} failed ({exc}) and the previous recipe could not be put "
                        f"back ({again}): it is in {old}"
                    ) from exc
                raise
    finally:
        if not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)
    return Path(target)

