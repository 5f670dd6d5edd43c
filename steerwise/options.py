"""Option dataclasses: one declaration per option gives its type, default, help and CLI flag.

Every map and gate kind states its options as a dataclass whose fields are made with ``option``
(PEFT's ``field(metadata={"help": ...})`` convention). From that one declaration:

* ``Options.from_dict`` builds the options from a plain dict (``map_options`` given by a user, a
  sweep spec or a recipe's JSON) and rejects an unknown key with a "did you mean" hint;
* ``steerwise fit`` builds its flags, defaults and help text (``add_option_flags``);
* ``to_json`` writes them back.

The argument types below (``positive_int``, ...) check numbers at the command line's boundary;
``steerwise.cli`` re-exports them for the other sub-commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self, TypeVar

from .models import did_you_mean

T = TypeVar("T", bound="Options")


# ---- argument types (checked when the command line is parsed) ------------------------------------
def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is not NaN or ±inf."""
    return _number(text, float, "a finite number", lambda v: True)


def positive_float(text: str) -> float:
    return _number(text, float, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def unit_interval(text: str) -> float:
    """A float in [0, 1]."""
    return _number(text, float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def open_unit_interval(text: str) -> float:
    """A float in (0, 1] (e.g. nucleus sampling's top-p)."""
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


OFF = ("off", "none")  # how an optional share is switched off in text (a flag, a sweep variant)


def share_or_off(text: str) -> float | None:
    """A share in (0, 1), or ``off`` / ``none`` (None)."""
    if text.strip().lower() in OFF:
        return None
    return _number(text, float, "a share in (0, 1) or 'off'", lambda v: 0 < v < 1)


def positive_int(text: str) -> int:
    return int(_number(text, int, "an integer >= 1", lambda v: v >= 1))


def non_negative_int(text: str) -> int:
    return int(_number(text, int, "an integer >= 0", lambda v: v >= 0))


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return int(_number(text, int, f"an integer >= {low}", lambda v: v >= low))

    parse.__name__ = f"int_at_least_{low}"
    return parse


# ---- declaring options -------------------------------------------------------------------------
def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: Iterable[Any] | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its help text and how ``steerwise fit`` exposes it.

    ``flag``: the command-line flag (default ``--<name>`` with dashes); ``type``: the argument
    type that parses and checks it (default: from the default's Python type); ``choices``: the
    allowed values; ``cli=False``: not on the command line (set from Python or a spec only)."""
    meta = {"help": help, "flag": flag, "type": type, "metavar": metavar, "cli": cli,
            "choices": tuple(choices) if choices is not None else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def unknown_key_error(key: str, known: Iterable[str], what: str) -> ValueError:
    """``unknown <what> 'key' (did you mean ...?); known: ...`` as a ValueError."""
    known = list(known)
    listed = ", ".join(known) if known else "none"
    return ValueError(f"unknown {what} {key!r}{did_you_mean(key, known, cutoff=0.6)}; "
                      f"known: {listed}")


def check_keys(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise ``unknown_key_error`` for the first key of ``given`` not in ``known``."""
    known = list(known)
    for key in given:
        if key not in known:
            raise unknown_key_error(key, known, what)


class Options:
    """Base of every option dataclass (subclasses are ``@dataclass``es)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Self | None = None, what: str = "",
                  **more: Any) -> Self:
        """Options from a dict (and keyword arguments); an unknown key raises ``ValueError``
        naming the closest known one. Already-built options are returned as they are, updated
        by ``more`` (a copy: the caller's object is never changed)."""
        what = what or f"{cls.__name__} option"
        if isinstance(values, cls):
            return dataclasses.replace(values, **more) if more else values  # type: ignore[type-var]
        if values is not None and not isinstance(values, Mapping):
            raise TypeError(f"{what}s must be a dict or {cls.__name__}, not "
                            f"{type(values).__name__}")
        merged = {**(values or {}), **more}
        check_keys(merged, cls.field_names(), what)
        return cls(**merged)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclasses.dataclass
class NoOptions(Options):
    """A map or gate kind without options."""


# ---- options on the command line ---------------------------------------------------------------
def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest_of(f: dataclasses.Field) -> str:
    return flag_of(f)[2:].replace("-", "_")


def _arg_type(f: dataclasses.Field, default: Any) -> Callable[[str], Any] | None:
    if f.metadata.get("type") is not None:
        return f.metadata["type"]
    if isinstance(default, bool) or f.metadata.get("choices"):
        return None
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return finite_float
    return None


def add_field_flag(group: argparse._ActionsContainer, f: dataclasses.Field, default: Any,
                   help: str | None = None) -> None:
    """One flag for the option field ``f`` (its declared help unless ``help`` is given)."""
    kw: dict[str, Any] = {"dest": dest_of(f), "default": default,
                          "help": f.metadata.get("help", "") if help is None else help}
    if isinstance(default, bool) and f.type in ("bool", bool):
        kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif f.type in ("bool | None", "Optional[bool]"):
        kw["action"] = argparse.BooleanOptionalAction
    else:
        arg_type = _arg_type(f, default)
        if arg_type is not None:
            kw["type"] = arg_type
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"])
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
    group.add_argument(flag_of(f), **kw)


def add_option_flags(group: argparse._ActionsContainer, cls: type[Options],
                     skip: Iterable[str] = ()) -> list[str]:
    """Add one flag per command-line field of ``cls`` (help, default, choices and type from
    its declaration) and return the field names added; ``skip``: fields handled elsewhere
    (e.g. a shared ``--seed``)."""
    added = []
    ref = cls()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip or not f.metadata.get("cli", False):
            continue
        add_field_flag(group, f, getattr(ref, f.name))
        added.append(f.name)
    return added


def options_from_args(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """``cls`` built from the parsed flags ``add_option_flags`` added (and ``fixed`` values)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif f.metadata.get("cli", False) and hasattr(args, dest_of(f)):
            values[f.name] = getattr(args, dest_of(f))
    return cls(**values)
