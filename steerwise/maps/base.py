"""How to steer: the base class of steering maps T_l(t; λ).

Every map is written in the *gated* form the DSAS paper uses,
``t' = t + λ_l(t) · (T_l(t; 1) − t)``, so a map only has to say ``delta(t) = T_l(t; 1) − t``.
For additive maps (CAA, ITI, Mean-AcT) ``delta`` does not depend on ``t``; for affine maps
(Linear-AcT, LinEAS) it does. The hook (steerwise.hooks) multiplies ``delta`` by the global
strength, the layer scale and the gate value; maps never see the strength.

Maps keep their fitted state in registered buffers/parameters so ``state_dict`` round-trips
through safetensors; everything else that defines them goes in ``config()`` (JSON).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..kernel import AffineMap

MAP_REGISTRY: dict[str, type[SteeringMap]] = {}


def register_map(cls: type[SteeringMap]) -> type[SteeringMap]:
    """Class decorator: make a map loadable from a recipe by its ``method`` name."""
    MAP_REGISTRY[cls.method] = cls
    return cls


class SteeringMap(nn.Module):
    method: ClassVar[str] = ""

    def delta(self, t: Tensor) -> Tensor:
        """T(t; 1) − t for float32 activations ``t`` of shape (..., d); broadcastable result."""
        f = self.affine()
        d = f.b if f.a is None else torch.addcmul(f.b, f.a, t)
        if f.lo is not None and f.hi is not None:
            d = d * ((t >= f.lo) & (t <= f.hi)).to(t.dtype)
        return d

    def affine(self) -> AffineMap:
        """The map in the kernel's canonical form ``δ(t) = m(t) ⊙ (a ⊙ t + b)``
        (``steerwise.kernel``); every map the kernel can run implements it."""
        raise NotImplementedError(f"map {self.method!r} has no canonical (affine) form")

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings needed (with the tensors) to rebuild the map."""
        return {}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> SteeringMap:
        """A map with tensors of the right shapes, to be filled by ``load_state_dict``."""
        raise NotImplementedError

    def forward(self, t: Tensor, strength: float | Tensor = 1.0) -> Tensor:
        """The steered activation ``t + strength · delta(t)`` (ungated, for direct use)."""
        return t + strength * self.delta(t)


def map_from_config(method: str, dim: int, config: dict[str, Any]) -> SteeringMap:
    if method not in MAP_REGISTRY:
        raise ValueError(
            f"unknown steering method {method!r}; known: {', '.join(sorted(MAP_REGISTRY))}"
        )
    return MAP_REGISTRY[method].empty(dim, config)


def as_float_rows(x: Tensor | Any, name: str) -> Tensor:
    """Validate a (n, d) activation matrix: non-empty, finite; returned as float32."""
    x = torch.as_tensor(x).float()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(
            f"{name}: activations contain NaN or inf (an fp16 overflow? try float32 or bf16)"
        )
    return x
