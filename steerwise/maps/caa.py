"""CAA: contrastive activation addition, ``T(t; λ) = t + λ·v`` with ``v = mean(T) − mean(S)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernel import AffineMap
from .base import SteeringMap, as_float_rows, register_map


@register_map
class CAAMap(SteeringMap):
    method = "caa"

    def __init__(self, vector: Tensor) -> None:
        super().__init__()
        self.register_buffer("vector", vector.detach().float().clone())

    def affine(self) -> AffineMap:
        return AffineMap(b=self.vector)

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, options: Any = None, **kwargs: Any) -> CAAMap:
        """``v = mean(target) − mean(source)`` over pooled activations (rows = sentences).
        CAA has no options: any given is refused."""
        cls.options(options, **kwargs)
        s = as_float_rows(source, "source activations")
        t = as_float_rows(target, "target activations")
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"source and target widths differ: {s.shape[1]} vs {t.shape[1]}")
        return cls(t.mean(0) - s.mean(0))

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> CAAMap:
        return cls(torch.zeros(dim))
