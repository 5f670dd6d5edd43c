"""Gates ("when"): each registers itself under its kind."""

from .base import GATE_REGISTRY, Gate, NoGate, StepContext, gate_from_config, register_gate
from .cast import CASTGate, CASTOptions
from .dsas import DSASGate, DSASOptions, layer_scale
from .e2e import E2EGate

__all__ = [
    "CASTGate", "CASTOptions", "DSASGate", "DSASOptions", "E2EGate", "GATE_REGISTRY", "Gate",
    "NoGate", "StepContext", "gate_from_config", "layer_scale", "register_gate",
]
