"""A fitted steering as a directory: sites + maps + gates + metadata.

Layout (nothing is pickled; loading never executes code)::

    DIR/steerwise.json         everything but tensors: format, library version, model identity
                               (type, hidden size, layer count), method, gate, default strength,
                               fit data sizes and options, and per site: site, map and gate
                               configs, layer scale, diagnostics (gate/probe accuracy, ...)
    DIR/steering.safetensors   tensors, keyed ``entries.<i>.map.<name>`` / ``entries.<i>.gate.<name>``

``Recipe.apply(model, strength)`` checks the model matches and returns a ``SteeringHandle``
(a context manager).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .gates.base import gate_from_config
from .hooks import SiteSteering, SteeringHandle
from .maps.base import map_from_config
from .sites import Site, hidden_size, model_type, num_layers

CONFIG_NAME = "steerwise.json"
TENSORS_NAME = "steering.safetensors"
FORMAT = "steerwise-recipe"
FORMAT_VERSION = 1


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


def check_identity(expected: ModelIdentity, model: nn.Module, what: str = "recipe") -> None:
    """Raise ``RecipeMismatchError`` naming every difference between ``model`` and ``expected``."""
    other = ModelIdentity.of(model)
    problems = []
    if other.model_type != expected.model_type:
        problems.append(f"model type {other.model_type!r} (recipe: {expected.model_type!r})")
    if other.hidden_size != expected.hidden_size:
        problems.append(f"hidden size {other.hidden_size} (recipe: {expected.hidden_size})")
    if other.num_layers != expected.num_layers:
        problems.append(f"{other.num_layers} layers (recipe: {expected.num_layers})")
    if problems:
        raise RecipeMismatchError(
            f"this {what} was fitted for another model: the given model has " + ", ".join(problems)
        )


def read_recipe_config(path: Path, fmt: str, max_version: int, what: str) -> dict[str, Any]:
    """The JSON of a recipe directory, checked to be of format ``fmt`` and a readable version."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a {what} (no {CONFIG_NAME})")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != fmt:
        raise ValueError(
            f"{cfg_path} is not a {what} (format {config.get('format')!r}; expected {fmt!r})"
        )
    if int(config.get("format_version", 0)) > max_version:
        raise ValueError(
            f"{cfg_path} uses {what} format {config['format_version']}; this steerwise "
            f"({__version__}) reads up to {max_version}: upgrade steerwise"
        )
    return config


def write_recipe_dir(
    target: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``steerwise.json`` + ``steering.safetensors`` (+ ``extra_files``: name → text, e.g.
    the model card) so the directory appears complete or not at all: all files go to a temporary
    directory beside ``target`` and are renamed in."""
    text = json.dumps(config, indent=2, allow_nan=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".steerwise-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": str(config["format"])})
        (tmp / CONFIG_NAME).write_text(text + "\n")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content, encoding="utf-8")
        if target.exists():
            for name in (CONFIG_NAME, TENSORS_NAME, *(extra_files or {})):
                os.replace(tmp / name, target / name)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def apply_recipes(
    model: nn.Module, recipes: dict[str, Recipe], *, trace: bool = False
) -> SteeringHandle:
    """Install several recipes at once; each batch row then picks its own with
    ``handle.route(names, strengths)`` (a name, or ``None`` for an unsteered row)."""
    for name, recipe in recipes.items():
        try:
            recipe.check_model(model)
        except RecipeMismatchError as exc:
            raise RecipeMismatchError(f"recipe {name!r}: {exc}") from None
        recipe.check_applicable()
    return SteeringHandle.many(model, {n: r.entries for n, r in recipes.items()}, trace=trace)


@dataclass
class Recipe:
    """A fitted steering: a list of ``SiteSteering`` entries plus metadata."""

    model: ModelIdentity
    entries: list[SiteSteering]
    method: str
    gate: str
    default_strength: float = 1.0
    fit_info: dict[str, Any] = field(default_factory=dict)

    # ---- applying --------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ``RecipeMismatchError`` naming every difference from the fitted model."""
        check_identity(self.model, model)

    def apply(
        self, model: nn.Module, strength: float | None = None, *, trace: bool = False
    ) -> SteeringHandle:
        """Install the steering on ``model``; use as ``with recipe.apply(model, 4.0): ...``."""
        self.check_model(model)
        self.check_applicable()
        s = self.default_strength if strength is None else strength
        return SteeringHandle(model, self.entries, s, trace=trace)

    def check_applicable(self) -> None:
        """Refuse recipes that need a driver of their own (multi-bucket diffusion recipes)."""
        buckets = len(self.fit_info.get("diffusion", {}).get("timestep_buckets", [])) - 1
        if buckets > 1:
            raise ValueError(
                f"this diffusion recipe has {buckets} timestep buckets, which must switch with the "
                f"denoising step: apply it with steerwise.diffusion.steer(pipe, recipe, strength)"
            )

    @property
    def sites(self) -> list[Site]:
        return [e.site for e in self.entries]

    def diagnostics(self) -> list[dict[str, Any]]:
        return [{"site": e.site.name, "scale": e.scale, **e.diagnostics} for e in self.entries]

    # ---- saving and loading ----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "model": vars(self.model),
            "method": self.method,
            "gate": self.gate,
            "default_strength": self.default_strength,
            "fit": self.fit_info,
            "entries": [
                {
                    "site": e.site.to_json(),
                    "dim": e.dim,
                    "map": {"method": e.map.method, "config": e.map.config()},
                    "gate": {"kind": e.gate.kind, "config": e.gate.config()},
                    "scale": e.scale,
                    "diagnostics": e.diagnostics,
                }
                for e in self.entries
            ],
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the recipe and its model card (``README.md``); the directory appears complete
        or not at all."""
        from .card import model_card

        target = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self.entries):
            for part, module in (("map", e.map), ("gate", e.gate)):
                for key, value in module.state_dict().items():
                    tensors[f"entries.{i}.{part}.{key}"] = value.detach().cpu().contiguous()
        card = model_card(self, load_from=str(directory))
        return write_recipe_dir(target, tensors, self.to_json(), {"README.md": card})

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Publish to the Hugging Face Hub with its model card (see ``steerwise.hub.push_to_hub``:
        ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, revision: str | None = None, **hub_kwargs: Any
    ) -> Recipe:
        """Load from a directory, or from a Hub repo id (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``: see ``steerwise.hub.resolve_recipe_dir``)."""
        from .hub import resolve_recipe_dir

        path = resolve_recipe_dir(directory, revision=revision, **hub_kwargs)
        config = read_recipe_config(path, FORMAT, FORMAT_VERSION, "steerwise recipe")
        tensors = load_file(str(path / TENSORS_NAME))
        ident = ModelIdentity(**config["model"])
        entries = []
        for i, ec in enumerate(config["entries"]):
            site = Site.from_json(ec["site"])
            dim = int(ec.get("dim", ident.hidden_size))
            m = map_from_config(ec["map"]["method"], dim, ec["map"]["config"])
            g = gate_from_config(ec["gate"]["kind"], dim, ec["gate"]["config"])
            for part, module in (("map", m), ("gate", g)):
                prefix = f"entries.{i}.{part}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                module.load_state_dict(state, strict=True)
            entries.append(SiteSteering(site, m, g, ec["scale"], ec.get("diagnostics")))
        return cls(
            model=ident,
            entries=entries,
            method=config["method"],
            gate=config["gate"],
            default_strength=float(config.get("default_strength", 1.0)),
            fit_info=config.get("fit", {}),
        )

