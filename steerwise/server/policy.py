"""What both serving engines share, with no HTTP framework and no vLLM: the server's bounds
(``ServerConfig``), OpenAI's error body, and the reading of a request's ``steering`` field with
its error messages.

``steerwise serve`` (HF engine, ``steerwise.server.app``) and ``steerwise serve --engine vllm``
(the ASGI middleware ``steerwise.vllm.middleware``) both call ``resolve_steering``, so the same
field gets the same answer, status and message included, from either engine.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNSTEERED = ("none", "")  # recipe names that mean "unsteered" (besides null)
STEERING_FIELDS = ("recipe", "strength", "explain")
_SHAPE = '{"recipe": NAME, "strength": NUMBER}'


@dataclass
class ServerConfig:
    """What the server serves and the bounds it enforces (each bound: a 4xx, never a hang)."""

    model_name: str = "concept-lm"
    default_recipe: str | None = None  # used when a request names none (None: unsteered)
    default_strength: float | None = None  # None: the recipe's own default strength
    max_strength: float = 20.0  # |strength| bound
    max_tokens: int = 256  # bound on a request's max_tokens
    default_max_tokens: int = 16  # OpenAI's completions default
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1_000_000
    max_queue: int = 64  # requests waiting for a batch slot; beyond: 429
    max_batch: int = 16  # rows decoded together
    api_key: str | None = None


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class SteeringFieldError(ValueError):
    """A bad ``steering`` field: answered with HTTP 400 and ``body()``."""

    status = 400

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, code=self.code)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable beyond this machine without an API key."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"serving on {host} without --api-key: anyone who can reach this address can use "
            f"the model; pass --api-key or bind 127.0.0.1")


def check_default_recipe(config: ServerConfig, names) -> None:
    """A ValueError (at start) when ``config.default_recipe`` is not among the loaded ``names``."""
    names = list(names)
    if config.default_recipe is not None and config.default_recipe not in names:
        raise ValueError(f"default recipe {config.default_recipe!r} is not loaded; loaded: "
                         f"{', '.join(names) or 'none'}")


def resolve_steering(
    field: Any, recipes: Mapping[str, float] | None, config: ServerConfig
) -> tuple[str | None, float | None, bool]:
    """``(recipe or None, strength, explain)`` of a request's raw ``steering`` field (``None``
    when absent), or a ``SteeringFieldError``.

    ``recipes`` maps each loaded recipe to its default strength; ``None`` when the names are not
    known here (no name check, and a strength left out stays ``None``: the engine's default).
    Absent recipe: ``config.default_recipe``; ``null``, ``"none"`` or ``""``: unsteered. Absent
    strength: ``config.default_strength``, else the recipe's own, else 0 when unsteered.
    """
    if field is None:
        field = {}
    if not isinstance(field, dict):
        raise SteeringFieldError(f"steering must be an object {_SHAPE}, got "
                                 f"{_json_type(field)}", "steering")
    extra = [k for k in field if k not in STEERING_FIELDS]
    if extra:
        raise SteeringFieldError(f"steering: extra field {extra[0]!r} is not permitted (the "
                                 f"fields are {', '.join(STEERING_FIELDS)})", f"steering.{extra[0]}")
    recipe = field.get("recipe", config.default_recipe)
    if recipe is not None and not isinstance(recipe, str):
        raise SteeringFieldError(f"steering.recipe must be a recipe name or null, got "
                                 f"{_json_type(recipe)}", "steering.recipe")
    if recipe is not None and recipe.lower() in UNSTEERED:
        recipe = None
    if recipe is not None and recipes is not None and recipe not in recipes:
        known = ", ".join(repr(n) for n in recipes) or "none are loaded"
        raise SteeringFieldError(f"unknown recipe {recipe!r}; this server serves: {known} "
                                 f"(or null for unsteered)", "steering.recipe", "unknown_recipe")
    strength = field.get("strength")
    if strength is not None and (isinstance(strength, bool) or
                                 not isinstance(strength, (int, float))):
        raise SteeringFieldError(f"steering.strength must be a number, got {_json_type(strength)}",
                                 "steering.strength")
    if strength is not None:
        try:
            strength = float(strength)
        except OverflowError:  # an integer beyond floats
            strength = math.inf
    if strength is None:
        strength = config.default_strength
    if strength is None and recipe is None:
        strength = 0.0
    if strength is None and recipes is not None:
        strength = recipes[recipe]
    if strength is not None and (not math.isfinite(strength)
                                 or abs(strength) > config.max_strength):
        raise SteeringFieldError(f"steering.strength must be a finite number within "
                                 f"±{config.max_strength}, got {strength}", "steering.strength")
    explain = field.get("explain", False)
    if not isinstance(explain, bool):
        raise SteeringFieldError(f"steering.explain must be true or false, got "
                                 f"{_json_type(explain)}", "steering.explain")
    if explain and recipe is None:
        raise SteeringFieldError("explain needs a recipe (an unsteered request has no gates)",
                                 "steering.explain")
    return recipe, None if strength is None else float(strength), explain


def _json_type(value: Any) -> str:
    """``value`` as the JSON reader sees it: ``the string 'x'``, ``an array``, ..."""
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return "an array" if isinstance(value, list) else "an object"
