"""When to steer: the base class of gates.

A gate turns each token's activation ``t`` (shape (..., d), float32) into a strength in [0, 1]
with shape ``t.shape[:-1]``; returning ``None`` means "1 everywhere" (ungated). Gates read the
activation *before* their own site is steered. Per-sequence state (e.g. CAST's per-row decision
taken on the prompt) belongs to the caller, not to the gate: gates keep it in ``StepContext.state``
(keyed by ``id(gate)``), which the hook handle owns and clears at every prefill, so one recipe
applied in two threads keeps two states. ``reset()``, also called at every prefill, is for state a
gate keeps on itself (wrappers; none of steerwise's gates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..kernel import LinearGate

if TYPE_CHECKING:
    from ..fit import FitOptions
    from ..sites import Site
    from ..steering import SiteSteering

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

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:
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


# ---- fitting: each gate kind owns it ---------------------------------------------------------
Pooled = dict[str, dict[str, Tensor]]  # site name -> pooling ("mean", "last") -> (n, d)


@dataclass
class GateFit:
    """What a gate kind's fit returns, per site name: its gate, layer scale a_l, diagnostics."""

    gates: dict[str, Gate]
    scales: dict[str, float]
    diagnostics: dict[str, dict[str, Any]]


class GateFitter:
    """How one gate kind is fitted by ``steerwise.fit.fit`` (registered under ``kind``).

    ``fit`` gets the pooled source (S) and control (C) activations of every collected site and
    returns the gates; the optional steps let a kind collect extra sites (CAST's condition
    layer), adjust the entries after any end-to-end training, and warn. A new gate is one file:
    a ``Gate`` subclass (inference, registered with ``register_gate``) and a ``GateFitter``
    (fitting, registered with ``register_gate_fitter``).
    """

    kind: ClassVar[str] = ""
    needs_control: ClassVar[bool] = True
    trains_end_to_end: ClassVar[bool] = False  # learned through the model after ``fit``

    def cv_folds(self, opts: FitOptions) -> int:
        return opts.dsas.cv_folds

    def extra_sites(self, model: nn.Module, sites: Sequence[Site], opts: FitOptions) -> list[Site]:
        """Sites to collect besides the steered ones (steered with an identity map)."""
        return []

    def fit(self, sites: Sequence[Site], acts_s: Pooled, acts_c: Pooled | None,
            opts: FitOptions) -> GateFit:
        raise NotImplementedError

    def finish(self, entries: list[SiteSteering], fitted: GateFit, acts_s: Pooled,
               acts_c: Pooled | None, extra: dict[str, Any]) -> list[SiteSteering]:
        """Last step (after end-to-end training): add entries, diagnostics; ``extra`` holds
        what else the fit knows (``model``, ``map_cls``, ``extra_sites``, ``fit_info``)."""
        return entries

    def warnings(self, entries: Sequence[SiteSteering], opts: FitOptions) -> list[str]:
        return []


GATE_FITTERS: dict[str, GateFitter] = {}


def register_gate_fitter(cls: type[GateFitter]) -> type[GateFitter]:
    GATE_FITTERS[cls.kind] = cls()
    return cls


@register_gate_fitter
class NoGateFitter(GateFitter):
    """Vanilla steering: every site ungated at full layer scale."""

    kind = "none"
    needs_control = False

    def fit(self, sites, acts_s, acts_c, opts) -> GateFit:
        return GateFit({s.name: NoGate() for s in sites}, {s.name: 1.0 for s in sites},
                       {s.name: {} for s in sites})


def gate_from_config(kind: str, dim: int, config: dict[str, Any]) -> Gate:
    if kind not in GATE_REGISTRY:
        raise ValueError(f"unknown gate {kind!r}; known: {', '.join(sorted(GATE_REGISTRY))}")
    return GATE_REGISTRY[kind].empty(dim, config)
