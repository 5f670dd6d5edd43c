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

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..kernel import AffineMap
from ..options import NoOptions, Options

MAP_REGISTRY: dict[str, type[SteeringMap]] = {}


def register_map(cls: type[SteeringMap]) -> type[SteeringMap]:
    """Class decorator: make a map loadable from a recipe by its ``method`` name.

    A name can be registered once: a second class under the same name is refused (unregister
    the first with ``MAP_REGISTRY.pop(name)`` to replace it on purpose)."""
    if not cls.method:
        raise ValueError(f"map class {cls.__name__} has no method name")
    old = MAP_REGISTRY.get(cls.method)
    if old is not None and old is not cls:
        raise ValueError(f"map method {cls.method!r} is already registered "
                         f"(by {old.__module__}.{old.__qualname__})")
    MAP_REGISTRY[cls.method] = cls
    return cls


class SteeringMap(nn.Module):
    """Base of every steering map: what a map must provide and what it may override.

    Must: ``method`` (its registered name), ``affine`` (the kernel's form), ``empty`` (a map of
    the right shapes for loading) and, for a map fitted from pooled activations, ``fit``.
    May: ``Options`` (the dataclass of its fit options, default none), ``config`` (JSON settings
    saved in a recipe), ``finalize`` (a step over all sites once each is fitted),
    ``adapt_options`` (options that depend on the model), ``active_dims`` (a diagnostic),
    ``end_to_end = True`` with ``train`` (trained through the model instead of by ``fit``).
    docs/extending.md walks through a new map.
    """

    method: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    end_to_end: ClassVar[bool] = False  # True: trained through the model (steerwise.training)

    # ---- fitting -------------------------------------------------------------------------------
    @classmethod
    def options(cls, options: Options | Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """This map's ``Options`` from a dict, an instance or keyword arguments; an unknown key
        raises ``ValueError`` naming the closest known one."""
        return cls.Options.from_dict(options, f"option of map {cls.method!r}:", **kwargs)

    @classmethod
    def adapt_options(cls, options: Any, model: nn.Module, site: str) -> Any:
        """Options completed from the model and the site kind (e.g. ITI's head count on
        ``heads`` sites); returns a new object (default: ``options`` unchanged)."""
        return options

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, options: Any = None, **kwargs: Any
            ) -> SteeringMap:
        """Fit on pooled activations (rows = texts) of the source and target sets; options as
        an ``Options`` instance, a dict or keyword arguments (``cls.options``)."""
        raise NotImplementedError(f"map {cls.method!r} is not fitted from pooled activations")

    @classmethod
    def train(cls, ctx: Any, entries: list[Any]) -> dict[str, Any]:
        """With ``end_to_end``: train the entries' maps (built by ``empty``) through the model
        (``ctx``: ``steerwise.fit.FitContext``); returns the training summary."""
        raise NotImplementedError(f"map {cls.method!r} is not trained end to end")

    @classmethod
    def finalize(cls, maps: Sequence[SteeringMap], options: Any) -> dict[str, Any]:
        """Called by ``steerwise.fit`` once every site is fitted (e.g. ITI's global top-K head
        choice); returns a summary for the recipe's ``fit.map`` (default: nothing to do)."""
        return {}

    # ---- applying ------------------------------------------------------------------------------
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
        raise NotImplementedError(f"map {cls.method!r} cannot be built empty (for loading)")

    def active_dims(self) -> int | None:
        """How many dimensions the map changes, for the diagnostics (``None``: not reported)."""
        return None

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
