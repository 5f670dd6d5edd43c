"""Gates ("when"): each registers itself under its kind."""
# ruff: noqa: I001  (the import order of the gate modules is the order of steerwise.fit.GATES)

from .base import (
    GATE_FITTERS,
    GATE_REGISTRY,
    Gate,
    GateFit,
    GateFitter,
    NoGate,
    StepContext,
    gate_from_config,
    register_gate,
    register_gate_fitter,
)
from .dsas import DSASGate, DSASOptions, layer_scale
from .cast import CASTGate, CASTOptions
from .e2e import E2EGate

__all__ = [
    "GATE_FITTERS",
    "GATE_REGISTRY",
    "CASTGate",
    "CASTOptions",
    "DSASGate",
    "DSASOptions",
    "E2EGate",
    "Gate",
    "GateFit",
    "GateFitter",
    "NoGate",
    "StepContext",
    "gate_from_config",
    "layer_scale",
    "register_gate",
    "register_gate_fitter",
]
