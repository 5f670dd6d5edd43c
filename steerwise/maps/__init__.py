"""Steering maps ("how"): each registers itself under its method name."""

from .base import MAP_REGISTRY, SteeringMap, map_from_config, register_map
from .caa import CAAMap

__all__ = ["MAP_REGISTRY", "CAAMap", "SteeringMap", "map_from_config", "register_map"]
