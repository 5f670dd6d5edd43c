"""Request shapes (OpenAI's, plus the ``steering`` field), server limits, and the OpenAI error
shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Steering(BaseModel):
    """The ``steering`` extra-body field. ``recipe``: a name loaded at start, or null / "none"
    for unsteered (absent: the server's default); ``strength`` (absent: the server's default,
    else the recipe's); ``explain``: return per-token gate values."""

    model_config = ConfigDict(extra="forbid")

    recipe: str | None = "__default__"
    strength: float | None = None
    explain: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    steering: Steering | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    tools: list[Any] | None = None
