"""When to steer: the base class of gates.

A gate turns each token's activation ``t`` (shape (..., d), float32) into a strength in [0, 1]
with shape ``t.shape[:-1]``; returning ``None`` means "1 everywhere" (ungated). Gates read the
activation *before* their own site is steered. Per-generation state (e.g. CAST's per-row
decision taken on the prompt) lives on the gate instance and is cleared by ``reset()``, which
the hook handle calls when a new sequence starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..kernel import LinearGate

GATE_REGISTRY: dict[str, type[Gate]] = {}


def register_gate(cls: type[Gate]) -> type[Gate]:
    GATE_REGISTRY[cls.kind] = cls
    return cls


@dataclass
class StepContext:
    """What a hook knows about the current forward call besides the activation.

    ``attention_mask`` covers the *current* positions only (batch, new_tokens), 1 = real token;
    ``None`` when the caller passed no mask. ``is_prefill`` is true when the call starts a new
    sequence (no KV cache yet). ``state`` holds per-sequence gate state (e.g. CAST's per-row
    decision), keyed by ``id(gate)``: it belongs to the hook handle, not to the gate, so one recipe
    applied in two threads keeps two states; the handle clears it at every prefill.
    """

    attention_mask: Tensor | None = None
    is_prefill: bool = True
    state: dict[int, Any] = field(default_factory=dict)


class Gate(nn.Module):
    kind: ClassVar[str] = ""

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:  # noqa: D401
        raise NotImplementedError

    def linear_form(self) -> LinearGate:
        """The gate in the kernel's canonical form ``f(w·t + c)`` (``steerwise.kernel``).

        The default, ``"external"``, means the hook calls ``forward`` and hands its per-token
        values to the kernel: right for stateful gates (CAST) and wrappers."""
        return LinearGate("external")

    def reset(self) -> None:
        """Forget per-sequence state kept on the gate itself (called at every prefill)."""

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> Gate:
        raise NotImplementedError


@register_gate
class NoGate(Gate):
    """Vanilla steering: constant strength everywhere."""

    kind = "none"

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:
        return None

    def linear_form(self) -> LinearGate:
        return LinearGate("one")

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> NoGate:
        return cls()


def gate_from_config(kind: str, dim: int, config: dict[str, Any]) -> Gate:
    if kind not in GATE_REGISTRY:
        raise ValueError(f"unknown gate {kind!r}; known: {', '.join(sorted(GATE_REGISTRY))}")
    return GATE_REGISTRY[kind].empty(dim, config)
