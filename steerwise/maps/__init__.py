"""Steering maps ("how"): each registers itself under its method name (any import order)."""

from .act import ActOptions, LinearActMap, MeanActMap
from .base import MAP_REGISTRY, SteeringMap, map_from_config, register_map
from .caa import CAAMap
from .iti import ITIMap, ITIOptions
from .lineas import LinEASMap, LinEASOptions

__all__ = [
    "MAP_REGISTRY", "ActOptions", "CAAMap", "ITIMap", "ITIOptions", "LinEASMap", "LinEASOptions",
    "LinearActMap", "MeanActMap", "SteeringMap", "map_from_config", "register_map",
]
