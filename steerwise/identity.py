"""Which model a steering was fitted for: ``ModelIdentity`` (type, hidden size, layer count) and
the one identity check every backend uses (the HF hooks, the server, vLLM, diffusion).

The check compares descriptions, so a backend without an HF ``nn.Module`` (vLLM reads its model's
``hf_config``) builds a ``ModelIdentity`` and calls the same ``check_identity``. Models that are
not transformers language models describe themselves through a registered provider
(``register_identity_provider``; diffusers denoisers: ``steerwise.diffusion.sites``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .sites import hidden_size, model_type, num_layers


class RecipeMismatchError(ValueError):
    """A recipe applied to a model it was not fitted for."""


@dataclass
class ModelIdentity:
    model_type: str
    hidden_size: int
    num_layers: int
    name_or_path: str = ""

    @classmethod
    def of(cls, model: nn.Module) -> ModelIdentity:
        root = type(model).__module__.split(".")[0]
        if root in IDENTITY_MODULES:  # e.g. diffusers denoisers: described by their own module
            importlib.import_module(IDENTITY_MODULES[root])
        for provider in _IDENTITY_PROVIDERS:
            ident = provider(model)
            if ident is not None:
                return ident
        cfg = getattr(model, "config", None)
        return cls(
            model_type=model_type(model),
            hidden_size=hidden_size(model),
            num_layers=num_layers(model),
            name_or_path=str(getattr(cfg, "_name_or_path", "") or ""),
        )


# Extension point for models that are not transformers language models: a provider returns the
# identity of a model it knows (or None); IDENTITY_MODULES names the steerwise module that
# registers the provider for models of a given top-level package, imported on first use.
IdentityProvider = Callable[[nn.Module], "ModelIdentity | None"]
_IDENTITY_PROVIDERS: list[IdentityProvider] = []
IDENTITY_MODULES: dict[str, str] = {"diffusers": "steerwise.diffusion.sites"}


def register_identity_provider(provider: IdentityProvider) -> IdentityProvider:
    """Register how to describe (type, width, layer count) a family of non-LM models."""
    if provider not in _IDENTITY_PROVIDERS:
        _IDENTITY_PROVIDERS.append(provider)
    return provider


def identity_problems(expected: ModelIdentity, other: ModelIdentity) -> list[str]:
    """Every difference of ``other`` (the model at hand) from ``expected`` (the fitted one)."""
    problems = []
    if other.model_type != expected.model_type:
        problems.append(f"model type {other.model_type!r} (recipe: {expected.model_type!r})")
    if other.hidden_size != expected.hidden_size:
        problems.append(f"hidden size {other.hidden_size} (recipe: {expected.hidden_size})")
    if other.num_layers != expected.num_layers:
        problems.append(f"{other.num_layers} layers (recipe: {expected.num_layers})")
    return problems


def check_identity(
    expected: ModelIdentity, model: nn.Module | ModelIdentity, what: str = "recipe"
) -> None:
    """Raise ``RecipeMismatchError`` naming every difference between ``model`` (a model, or the
    ``ModelIdentity`` of one, e.g. read from vLLM's config) and ``expected``."""
    other = model if isinstance(model, ModelIdentity) else ModelIdentity.of(model)
    problems = identity_problems(expected, other)
    if problems:
        raise RecipeMismatchError(
            f"this {what} was fitted for another model: the given model has " + ", ".join(problems)
        )

