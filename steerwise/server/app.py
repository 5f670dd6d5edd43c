"""The HTTP side: FastAPI routes in OpenAI's shapes over an ``Engine``.

``/v1/completions`` and ``/v1/chat/completions`` (streaming as server-sent events, or not),
``/v1/models`` (the model and its recipes), ``/health``, and the playground page at ``/``.
Steering per request: ``"steering": {"recipe": NAME, "strength": S, "explain": true}`` (the
OpenAI client's ``extra_body``). Every refusal is a 4xx with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineClosedError, Event, Job, QueueFullError
from .policy import (  # noqa: F401 (exposure_warning: imported from here by callers)
    SteeringFieldError,
    check_default_recipe,
    exposure_warning,
    resolve_steering,
)
from .schemas import APIError, ChatRequest, CompletionRequest, ServerConfig, error_body

if TYPE_CHECKING:
    from typing_extensions import Self

STATIC = Path(__file__).parent / "static"


# ---- plumbing -----------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (checked on the declared
    length and on the bytes actually read); the body is then replayed to the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks: list[bytes] = []
        size = 0
        while not too_big:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.limit
            if not message.get("more_body", False):
                break
        if too_big:
            response = JSONResponse(error_body(
                f"request body exceeds {self.limit} bytes", param=None, code="body_too_large"),
                status_code=413)
            return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = JSONResponse(error_body(
                    "missing or incorrect API key (send Authorization: Bearer KEY)",
                    code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client goes (whatever the ASGI version), so
    the generator's ``finally`` frees the request's batch slot."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went while we were sending
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


# ---- the app --------------------------------------------------------------------------------------
def create_app(engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``Engine``) under ``config``'s bounds."""
    check_default_recipe(config, engine.recipes)
    app = FastAPI(title="steerwise", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(BearerAuth, key=config.api_key)  # outermost: before reading bodies
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = []
        for part in first.get("loc", ())[1:]:  # after "body"; stop at a union member's tag
            if str(part) in ("str", "int", "float", "bool") or "[" in str(part):
                break
            loc.append(str(part))
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif "json" not in request.headers.get("content-type", ""):
            message = "send the body as JSON with the header Content-Type: application/json"
        elif param is None:
            message = "the request body must be a JSON object"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}",
                                       type="server_error"), status_code=500)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "playground.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, **engine.load(),
                **engine.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        recipes = [{"name": n, "method": r.method, "gate": r.gate,
                    "default_strength": r.default_strength,
                    "sites": [e.site.name for e in r.entries]}
                   for n, r in engine.recipes.items()]
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": created,
            "owned_by": "steerwise", "max_model_len": engine.context,
            "steering": {"recipes": recipes, "default_recipe": config.default_recipe,
                         "default_strength": config.default_strength,
                         "max_strength": config.max_strength, "max_tokens": config.max_tokens},
        }]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        for name, bad in (("echo", body.echo), ("logprobs", body.logprobs is not None),
                          ("best_of", body.best_of not in (None, 1)),
                          ("suffix", body.suffix is not None)):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            elif prompt and all(isinstance(x, int) for x in prompt):
                ids = [int(x) for x in prompt]
                vocab = engine.vocab_size
                if any(not 0 <= x < vocab for x in ids):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})",
                                   param="prompt")
                return await _generate(request, body, ids, chat=False)
            else:
                raise APIError(400, "prompt must be one string or one list of token ids "
                               "(this server answers one prompt per request)", param="prompt")
        with engine.tok_lock:
            ids = engine.tokenizer(prompt)["input_ids"]
        return await _generate(request, body, list(ids), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        for name, bad in (("logprobs", body.logprobs), ("tools", bool(body.tools))):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {config.model_name!r} has no chat template (its "
                           f"tokenizer defines none): use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        messages = [_message(m) for m in body.messages]
        try:
            with engine.tok_lock:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
        except (TemplateError, ValueError, TypeError, KeyError) as exc:  # roles, order...
            raise APIError(400, f"the chat template rejected these messages: {exc}",
                           param="messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(request, body, list(ids), chat=True)

    defaults = {name: r.default_strength for name, r in engine.recipes.items()}

    def _steering(body) -> tuple[str | None, float, bool]:
        try:
            recipe, strength, explain = resolve_steering(body.steering, defaults, config)
        except SteeringFieldError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        return recipe, float(strength), explain

    def _check(body, ids: list[int], chat: bool) -> tuple[int, list[str]]:
        if body.model != config.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                           f"{config.model_name!r}", param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "n must be 1 (one choice per request)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                           f"{config.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        room = engine.context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt ({len(ids)} tokens) fills the model's context of "
                           f"{engine.context} tokens", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = min(config.max_tokens, room) if chat else config.default_max_tokens
        if not 1 <= max_tokens <= config.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {config.max_tokens}, got "
                           f"{max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens})"
                           f" exceeds the model's context of {engine.context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        return max_tokens, stop

    async def _generate(request: Request, body, ids: list[int], chat: bool):
        max_tokens, stop = _check(body, ids, chat)
        recipe, strength, explain = _steering(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        job = Job(ids, max_tokens, emit, temperature=body.temperature, top_p=body.top_p,
                  seed=body.seed, stop=stop, recipe=recipe, strength=strength, explain=explain)
        try:
            engine.submit(job)
        except QueueFullError:
            raise APIError(429, f"the server is busy: {engine.max_queue} requests are already "
                           f"waiting; retry later", type="rate_limit_error",
                           code="queue_full") from None
        except EngineClosedError:
            raise APIError(503, "the server is shutting down", type="server_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        meta = {"id": rid, "created": int(time.time()), "model": config.model_name}
        steering = {"recipe": recipe, "strength": strength}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return EventStream(_sse(job, queue, meta, steering, chat, usage))
        return await _collect(request, job, queue, meta, steering, chat)

    return app


def _message(m) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):  # content parts: the text ones, joined
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return {"role": m.role, "content": content or ""}


def _choice(chat: bool, text: str, finish: str | None, delta: bool, first: bool = False):
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        d: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            d["content"] = text
        return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish}


async def _collect(request: Request, job: Job, queue: asyncio.Queue, meta, steering, chat):
    async def watch() -> None:  # a client that gives up frees its batch slot
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        job.cancel()
        queue.put_nowait(Event("error", error="client disconnected", status=499))

    watcher = asyncio.create_task(watch())
    parts: list[str] = []
    try:
        while True:
            event = await queue.get()
            if event.kind == "delta":
                parts.append(event.text)
            elif event.kind == "error":
                return JSONResponse(error_body(event.error or "generation failed",
                                               type="server_error"), status_code=event.status)
            else:
                break
    finally:
        watcher.cancel()
        if not job.done:
            job.cancel()
    out = {**meta, "object": "chat.completion" if chat else "text_completion",
           "choices": [_choice(chat, "".join(parts), event.finish_reason, delta=False)],
           "usage": event.usage, "steering": {**steering, "explain": event.explain}}
    return JSONResponse(out)


async def _sse(job: Job, queue: asyncio.Queue, meta, steering, chat, include_usage
               ) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({**meta, "object": kind, "choices": choices, **extra}) + "\n\n"

    try:
        if chat:
            yield chunk([_choice(chat, "", None, delta=True, first=True)])
        while True:
            event = await queue.get()
            if event.kind == "delta":
                yield chunk([_choice(chat, event.text, None, delta=True)])
            elif event.kind == "error":
                yield "data: " + json.dumps(error_body(event.error or "generation failed",
                                                       type="server_error")) + "\n\n"
                return
            else:
                yield chunk([_choice(chat, "", event.finish_reason, delta=True)],
                            steering={**steering, "explain": event.explain})
                if include_usage:
                    yield chunk([], usage=event.usage)
                yield "data: [DONE]\n\n"
                return
    finally:
        if not job.done:
            job.cancel()


# ---- running it ---------------------------------------------------------------------------------
class ServerThread:
    """Uvicorn serving ``app`` in a background thread on ``host`` and a free port (tests,
    benchmarks, notebooks); ``url`` once started, ``stop()`` to end."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="steerwise-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

