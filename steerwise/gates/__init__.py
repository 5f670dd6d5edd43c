"""Gates ("when"): each registers itself under its kind (the order of the imports below does
not matter: ``gate_kinds()`` lists the kinds by name)."""

from .base import (
    GATE_FITTERS,
    GATE_REGISTRY,
    Gate,
    GateFit,
    GateFitter,
    NoGate,
    StepContext,
    gate_from_config,
    gate_kinds,
    register_gate,
    register_gate_fitter,
)
from .cast import CASTGate, CASTOptions
from .dsas import DSASGate, DSASOptions, layer_scale
from .e2e import E2EGate, E2EOptions

__all__ = [
    "GATE_FITTERS",
    "GATE_REGISTRY",
    "CASTGate",
    "CASTOptions",
    "DSASGate",
    "DSASOptions",
    "E2EGate",
    "E2EOptions",
    "Gate",
    "GateFit",
    "GateFitter",
    "NoGate",
    "StepContext",
    "gate_from_config",
    "gate_kinds",
    "layer_scale",
    "register_gate",
    "register_gate_fitter",
]
