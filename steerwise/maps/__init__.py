"""Steering maps ("how"): each registers itself under its method name."""

from .base import MAP_REGISTRY, SteeringMap, map_from_config, register_map
from .act import LinearActMap, MeanActMap
from .caa import CAAMap
from .iti import ITIMap
from .lineas import LinEASMap, LinEASOptions

__all__ = [
    "MAP_REGISTRY", "CAAMap", "ITIMap", "LinEASMap", "LinEASOptions", "LinearActMap", "MeanActMap",
    "SteeringMap", "map_from_config", "register_map",
]
