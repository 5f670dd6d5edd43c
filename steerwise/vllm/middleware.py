"""ASGI middleware for vLLM's OpenAI server.

``--middleware steerwise.vllm.middleware.SteeringMiddleware``:

On ``POST .../completions`` and ``.../chat/completions`` it

- reads steerwise's request field ``"steering": {"recipe": NAME, "strength": X}`` exactly as
  ``steerwise serve`` (HF engine) does: the same reader (``steerwise.server.policy``), so the
  same defaults (``--default-recipe``, ``--strength``), the same bound (``--max-strength``) and,
  for a bad field, the same HTTP 400 with the same OpenAI error body; ``explain`` is refused
  (gate traces are HF-only). It moves the result into ``vllm_xargs`` as ``steering_recipe`` /
  ``steering_strength`` (requests may also set those ``vllm_xargs`` directly: vLLM's own path,
  checked by ``steerwise.vllm.validate``);
- adds the ``cache_salt`` of the steering (``steerwise.vllm.cache_salt``), keeping a client's own
  salt in front, so prefix caching never reuses KV blocks computed under another steering.

With an API key (``VLLM_API_KEY``, where ``steerwise serve --engine vllm`` puts ``--api-key``), a
request without the key passes through untouched, to vLLM's own 401: a bad steering field is
never answered (and the loaded recipe names never listed) to a client without the key.

The recipe names come from ``STEERWISE_VLLM_RECIPES`` (set by ``engine_args`` in this process),
the server's defaults and bound from ``STEERWISE_VLLM_SERVER`` (set by ``steerwise serve
--engine vllm``; absent: ``ServerConfig``'s). Anything else passes through untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from typing import Any

from ..server.policy import ServerConfig, SteeringFieldError, resolve_steering
from . import ENV_SERVER, cache_salt, known_recipes
from .runtime import XARG_RECIPE, XARG_STRENGTH

_PATHS = ("/completions", "/chat/completions")
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")  # the paths vLLM's API key guards
SERVER_FIELDS = ("default_recipe", "default_strength", "max_strength")  # what ENV_SERVER holds


def server_config(raw: str | None) -> ServerConfig:
    """The ``ServerConfig`` of ``STEERWISE_VLLM_SERVER``'s JSON (``None``: the defaults)."""
    values = json.loads(raw) if raw else {}
    return ServerConfig(**{k: values[k] for k in SERVER_FIELDS if k in values})


def rewrite_request(data: Any, recipes: Mapping[str, float] | None = None,
                    config: ServerConfig | None = None) -> Any:
    """The request body with ``steering`` moved into ``vllm_xargs`` and ``cache_salt`` set, or a
    ``SteeringFieldError``. ``recipes``: {name: default strength} (``None``: names unchecked);
    ``config``: the server's default recipe and strength and the strength bound."""
    if not isinstance(data, dict):
        return data
    config = config or ServerConfig()
    given = "steering" in data
    steering = data.pop("steering", None)
    xargs = data.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return data  # vLLM's own validation reports it
    xargs = dict(xargs or {})
    if isinstance(steering, dict) and "recipe" not in steering and XARG_RECIPE in xargs:
        steering = {**steering, "recipe": xargs[XARG_RECIPE]}  # the strength of vLLM's recipe
    if given or XARG_RECIPE not in xargs:  # the steering field, or the server's default
        recipe, strength, explain = resolve_steering(steering, recipes, config)
        if explain:
            raise SteeringFieldError('"steering.explain" (per-token gate values) is not '
                                     "available on vLLM; steerwise serve (HF engine) has it",
                                     "steering.explain")
        values = (recipe, None if recipe is None else strength)
        for value, key, xkey in zip(values, ("recipe", "strength"), (XARG_RECIPE, XARG_STRENGTH)):
            if value is None:
                continue
            if xkey in xargs and xargs[xkey] != value:
                raise SteeringFieldError(f'"steering.{key}" and "vllm_xargs.{xkey}" disagree',
                                         f"steering.{key}")
            xargs[xkey] = value
    if xargs:
        data["vllm_xargs"] = xargs
    recipe = xargs.get(XARG_RECIPE)
    strength = xargs.get(XARG_STRENGTH)
    if isinstance(recipe, str) and recipe:
        try:
            value = None if strength is None else float(strength)
        except (TypeError, ValueError):
            return data  # the engine's validator names the bad strength
        salt = cache_salt(recipe, value, data.get("cache_salt"))
        if salt is not None:
            data["cache_salt"] = salt
    return data


class SteeringMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.recipes = known_recipes()
        self.config = server_config(os.environ.get(ENV_SERVER))
        key = os.environ.get("VLLM_API_KEY")
        self.keys = [_digest(key)] if key else []

    def authorized(self, scope: dict) -> bool:
        """Whether vLLM's API-key check (``AuthenticationMiddleware``) lets this request in."""
        path = str(scope.get("path", "")).removeprefix(scope.get("root_path", ""))
        if not self.keys or not path.startswith(GUARDED_PREFIX):
            return True
        value = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        given, match = _digest(token), False
        for key in self.keys:  # every key compared, in constant time (as vLLM does)
            match |= secrets.compare_digest(given, key)
        return scheme.lower() == "bearer" and match

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope.get("type") != "http" or scope.get("method") != "POST"
                or not str(scope.get("path", "")).endswith(_PATHS) or not self.authorized(scope)):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # not JSON: let vLLM answer
        if data is not None:
            try:
                body = json.dumps(rewrite_request(data, self.recipes, self.config)).encode()
            except SteeringFieldError as exc:
                await _bad_request(send, exc)
                return
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        message = {"type": "http.request", "body": body, "more_body": False}
        await self.app({**scope, "headers": headers}, _replay([message], receive), send)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _replay(messages: list[dict], receive: Any):
    pending = list(messages)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _bad_request(send: Any, exc: SteeringFieldError) -> None:
    body = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
