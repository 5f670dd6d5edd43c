"""When to steer: the base class of gates.

A gate turns each token's activation ``t`` (shape (..., d), float32) into a strength in [0, 1]
with shape ``t.shape[:-1]``; returning ``None`` means "1 everywhere" (ungated). Gates read the
activation *before* their own site is steered. Per-sequence state (e.g. CAST's per-row decision
taken on the prompt) belongs to the caller, not to the gate: gates keep it in ``StepContext.state``
(keyed by ``id(gate)``), which the hook handle owns and clears at every prefill, so one recipe
applied in two threads keeps two states. ``reset()``, also called at every prefill, is for state a
gate keeps on itself (wrappers; none of steerwise's gates).

A gate kind is two classes: the ``Gate`` (inference, ``register_gate``) and its ``GateFitter``
(fitting, ``register_gate_fitter``); both list every method they may override below.
docs/extending.md walks through a new gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..kernel import LinearGate
from ..options import NoOptions, Options

if TYPE_CHECKING:
    from ..fit import FitContext, FitOptions
    from ..sites import Site
    from ..steering import SiteSteering

GATE_REGISTRY: dict[str, type[Gate]] = {}


def _register(registry: dict[str, Any], name: str, value: Any, what: str, owner: type) -> None:
    """Add ``value`` under ``name``; a name is taken once (another class under it is refused)."""
    if not name:
        raise ValueError(f"{what} class {owner.__name__} has no kind name")
    old = registry.get(name)
    old_cls = old if isinstance(old, type) or old is None else type(old)
    if old is not None and old_cls is not owner:
        raise ValueError(f"{what} {name!r} is already registered "
                         f"(by {old_cls.__module__}.{old_cls.__qualname__})")
    registry[name] = value


def register_gate(cls: type[Gate]) -> type[Gate]:
    """Class decorator: make a gate loadable from a recipe by its ``kind``."""
    _register(GATE_REGISTRY, cls.kind, cls, "gate", cls)
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
    """Base of every gate. Must: ``kind``, ``forward`` (or only ``linear_form``) and ``empty``.
    May: ``linear_form`` (the kernel's form; default external: ``forward`` is called),
    ``config`` (JSON settings saved in a recipe), ``reset`` and ``link``."""

    kind: ClassVar[str] = ""

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor | None:
        """Per-token strengths in [0, 1] of shape ``t.shape[:-1]`` (``None``: 1 everywhere)."""
        raise NotImplementedError(f"gate {self.kind!r} has no forward")

    def linear_form(self) -> LinearGate:
        """The gate in the kernel's canonical form ``f(w·t + c)`` (``steerwise.kernel``).

        The default, ``"external"``, means the hook calls ``forward`` and hands its per-token
        values to the kernel: right for stateful gates (CAST) and wrappers."""
        return LinearGate("external")

    def reset(self) -> None:
        """Forget per-sequence state kept on the gate itself (called at every prefill)."""

    def link(self, entries: Sequence[Any]) -> None:
        """Find other gates of the same steering when it is installed (CAST's followers find
        their condition gate); default: nothing to link."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings needed (with the tensors) to rebuild the gate."""
        return {}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> Gate:
        """A gate with tensors of the right shapes, to be filled by ``load_state_dict``."""
        raise NotImplementedError(f"gate {cls.kind!r} cannot be built empty (for loading)")


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

    The steps, in the order ``fit`` calls them (each has a default but ``fit``):

    * ``poolings`` — poolings to collect besides ``mean`` and the map's (e.g. ``tokens``);
    * ``extra_sites`` — sites to collect besides the steered ones (CAST's condition layer);
    * ``fit`` — the gates from the pooled source (S) and negative activations;
    * ``calibrate`` — refine the fitted gates with a second pass over the texts (DSAS);
    * ``train`` — with ``trains_end_to_end``, train the gates with the maps through the model;
    * ``finish`` — adjust the entries (add a site, diagnostics);
    * ``warnings`` — what the user should hear about the fit.

    ``Options``: the dataclass of the kind's options; ``options_field``: the ``FitOptions`` field
    that holds them (``None``: they come from ``FitOptions.gate_options``, a dict).
    """

    kind: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    options_field: ClassVar[str | None] = None
    needs_control: ClassVar[bool] = True
    trains_end_to_end: ClassVar[bool] = False  # learned through the model after ``fit``

    def options(self, opts: FitOptions) -> Any:
        """This kind's options out of the fit's options (``gate_options`` given to a kind that
        has its own section is refused, not ignored)."""
        if self.options_field is not None:
            if opts.gate_options:
                raise ValueError(f"gate {self.kind!r} takes its options from FitOptions."
                                 f"{self.options_field}, not from gate_options "
                                 f"({', '.join(map(str, opts.gate_options))})")
            return getattr(opts, self.options_field)
        return self.Options.from_dict(opts.gate_options, f"option of gate {self.kind!r}:")

    def cv_folds(self, opts: FitOptions) -> int:
        """Folds of the kind's held-out accuracy: each class needs at least this many texts."""
        return 2

    def poolings(self, opts: FitOptions) -> set[str]:
        """Poolings the fit needs besides ``mean`` and the map's (``steerwise.activations``)."""
        return set()

    def extra_sites(self, model: nn.Module, sites: Sequence[Site], opts: FitOptions) -> list[Site]:
        """Sites to collect besides the steered ones (steered with an identity map)."""
        return []

    def fit(self, sites: Sequence[Site], acts_s: Pooled, acts_c: Pooled | None,
            opts: FitOptions) -> GateFit:
        raise NotImplementedError(f"gate kind {self.kind!r} has no fit")

    def calibrate(self, ctx: FitContext, fitted: GateFit) -> None:
        """After ``fit`` (not for end-to-end kinds): refine ``fitted`` in place, e.g. with a
        second pass over the texts (``ctx.collect``). Default: nothing."""

    def train(self, ctx: FitContext, entries: list[SiteSteering]) -> dict[str, Any] | None:
        """With ``trains_end_to_end``: train the entries' gates (and end-to-end maps) through
        the model; returns the training summary."""
        raise NotImplementedError(f"gate kind {self.kind!r} is not trained end to end")

    def finish(self, entries: list[SiteSteering], fitted: GateFit, acts_s: Pooled,
               acts_c: Pooled | None, ctx: FitContext) -> list[SiteSteering]:
        """Last step (after end-to-end training): add entries, diagnostics; ``ctx`` holds what
        else the fit knows (``model``, ``map_cls``, ``extra_sites``, ``fit_info``)."""
        return entries

    def warnings(self, entries: Sequence[SiteSteering], opts: FitOptions) -> list[str]:
        return []


GATE_FITTERS: dict[str, GateFitter] = {}


def gate_kinds() -> tuple[str, ...]:
    """Every fittable gate kind: ``none`` first, then by name (whatever the import order)."""
    return tuple(sorted(GATE_FITTERS, key=lambda k: (k != "none", k)))


def register_gate_fitter(cls: type[GateFitter]) -> type[GateFitter]:
    """Class decorator: make a gate kind fittable by ``steerwise.fit`` under its ``kind``."""
    _register(GATE_FITTERS, cls.kind, cls(), "gate fitter", cls)
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
