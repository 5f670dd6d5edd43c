"""One steered site: where (``Site``), how (``SteeringMap``), when (``Gate``), and a layer scale.

A recipe is a list of ``SiteSteering`` entries; ``steerwise.compile`` turns the entries of one or
several recipes into the per-site stacks that every backend runs (``steerwise.kernel``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .gates.base import Gate, NoGate
from .maps.base import SteeringMap
from .sites import Site


class SiteSteering(nn.Module):
    """One steered site: where (``site``), how (``map``), when (``gate``), and a layer scale."""

    def __init__(
        self,
        site: Site,
        steering_map: SteeringMap,
        gate: Gate | None = None,
        scale: float = 1.0,
        diagnostics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.site = site
        self.map = steering_map
        self.gate = gate if gate is not None else NoGate()
        self.scale = float(scale)
        self.diagnostics = dict(diagnostics or {})

    @property
    def dim(self) -> int:
        """Feature width of the site, read off the map's tensors."""
        for t in self.map.state_dict().values():
            return int(t.shape[-1])
        raise ValueError(f"map {self.map.method!r} has no tensors to tell its width")
