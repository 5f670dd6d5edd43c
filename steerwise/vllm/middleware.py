"""ASGI middleware for vLLM's OpenAI server.

``--middleware steerwise.vllm.middleware.SteeringMiddleware``:

On ``POST .../completions`` and ``.../chat/completions`` it

- accepts steerwise's request field ``"steering": {"recipe": NAME, "strength": X}`` (the names
  ``steerwise serve`` documents; ``recipe`` ``null`` or ``"none"`` = unsteered; ``explain`` is
  refused, gate traces are HF-only) and moves it into ``vllm_xargs`` as ``steering_recipe`` /
  ``steering_strength`` (requests may also set those ``vllm_xargs`` directly);
- adds the ``cache_salt`` of the steering (``steerwise.vllm.cache_salt``), keeping a client's own
  salt in front, so prefix caching never reuses KV blocks computed under another steering.

Anything else passes through untouched. A malformed ``steering`` field gets HTTP 400.
"""

from __future__ import annotations

import json
from typing import Any

from . import cache_salt
from .runtime import XARG_RECIPE, XARG_STRENGTH

_PATHS = ("/completions", "/chat/completions")


def rewrite_request(data: Any) -> Any:
    """The request body with ``steering`` moved into ``vllm_xargs`` and ``cache_salt`` set."""
    if not isinstance(data, dict):
        return data
    steering = data.pop("steering", None)
    xargs = data.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return data  # vLLM's own validation reports it
    xargs = dict(xargs or {})
    if steering is not None:
        if not isinstance(steering, dict) or not set(steering) <= {"recipe", "strength", "explain"}:
            raise ValueError('"steering" must be an object {"recipe": name, "strength": number}')
        if steering.get("explain"):
            raise ValueError('"steering.explain" (per-token gate values) is not available on '
                             "vLLM; steerwise serve (HF backend) has it")
        if steering.get("recipe") == "none":  # steerwise serve's spelling of "unsteered"
            steering = {"recipe": None}
        for key, xkey in (("recipe", XARG_RECIPE), ("strength", XARG_STRENGTH)):
            if steering.get(key) is None:
                continue
            if xkey in xargs and xargs[xkey] != steering[key]:
                raise ValueError(f'"steering.{key}" and "vllm_xargs.{xkey}" disagree')
            xargs[xkey] = steering[key]
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

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope.get("type") != "http" or scope.get("method") != "POST"
                or not str(scope.get("path", "")).endswith(_PATHS)):
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
                body = json.dumps(rewrite_request(data)).encode()
            except ValueError as exc:
                await _bad_request(send, str(exc))
                return
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        message = {"type": "http.request", "body": body, "more_body": False}
        await self.app({**scope, "headers": headers}, _replay([message], receive), send)


def _replay(messages: list[dict], receive: Any):
    pending = list(messages)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _bad_request(send: Any, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError",
                                 "param": "steering", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
