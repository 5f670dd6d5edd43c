"""Gates ("when"): each registers itself under its kind."""

from .base import GATE_REGISTRY, Gate, NoGate, StepContext, gate_from_config, register_gate
from .dsas import DSASGate, DSASOptions, layer_scale

__all__ = [
    "DSASGate", "DSASOptions", "GATE_REGISTRY", "Gate", "NoGate", "StepContext",
    "gate_from_config", "layer_scale", "register_gate",
]
