"""A learned scaling intervention as a directory (safetensors + JSON, nothing pickled).

Layout, the same file names as a steering recipe but its own format tag, so each loader refuses
the other's directory with a clear message::

    DIR/steerwise.json         format "steerwise-scale", library version, model identity (type,
                               hidden size, layer count), method, sites, intervention config
                               (positions / bias), training options, training log and metrics
    DIR/steering.safetensors   the parameters: ``alpha`` (sites, positions), ``vectors``
                               (sites, positions, d), or ``weight`` (sites, d) + ``offset`` (sites)

``ScaleRecipe.apply(model, beta)`` checks the model and returns a ``ScalingHandle``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .. import __version__
from ..recipe import (
    CONFIG_NAME,
    TENSORS_NAME,
    ModelIdentity,
    check_identity,
    read_recipe_config,
    write_recipe_dir,
)
from ..sites import Site
from .hooks import ScalingHandle
from .interventions import INTERVENTIONS, ScalingIntervention

FORMAT = "steerwise-scale"
FORMAT_VERSION = 1


@dataclass
class ScaleRecipe:
    """A trained intervention plus what it was trained for and how."""

    model: ModelIdentity
    intervention: ScalingIntervention
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.intervention.method

    @property
    def sites(self) -> list[Site]:
        return self.intervention.sites

    def check_model(self, model: nn.Module) -> None:
        check_identity(self.model, model, what="scaling recipe")

    def apply(
        self, model: nn.Module, beta: float | torch.Tensor = 1.0, *, trace: bool = False
    ) -> ScalingHandle:
        """Install on ``model``: ``with recipe.apply(model, beta=1.0): ...``."""
        self.check_model(model)
        return ScalingHandle(model, self.intervention, beta, trace=trace)

    def to_json(self) -> dict[str, Any]:
        iv = self.intervention
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "model": vars(self.model),
            "method": iv.method,
            "dim": iv.dim,
            "config": iv.config(),
            "sites": [s.to_json() for s in iv.sites],
            "options": self.options,
            "info": self.info,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the recipe; the directory appears complete or not at all."""
        target = Path(directory)
        tensors = {k: v.detach().cpu().float().contiguous()
                   for k, v in self.intervention.state_dict().items()}
        return write_recipe_dir(target, tensors, self.to_json())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ScaleRecipe:
        path = Path(directory)
        config = read_recipe_config(path, FORMAT, FORMAT_VERSION, "scaling recipe")
        cfg_path = path / CONFIG_NAME
        method = config["method"]
        if method not in INTERVENTIONS:
            raise ValueError(f"{cfg_path}: unknown method {method!r}")
        sites = [Site.from_json(s) for s in config["sites"]]
        iv = INTERVENTIONS[method].empty(sites, int(config["dim"]), config.get("config", {}))
        iv.load_state_dict(load_file(str(path / TENSORS_NAME)), strict=True)
        return cls(
            model=ModelIdentity(**config["model"]),
            intervention=iv,
            options=config.get("options", {}),
            info=config.get("info", {}),
        )
