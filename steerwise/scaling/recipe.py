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

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..identity import ModelIdentity, check_identity
from ..recipe_io import (
    CONFIG_NAME,
    TENSORS_NAME,
    RecipeFields,
    build_on_meta,
    check_option_kinds,
    read_recipe_config,
    read_recipe_tensors,
    state_shapes,
    write_recipe_dir,
)
from ..sites import Site
from .hooks import ScalingHandle
from .interventions import INTERVENTIONS, ScalingIntervention

FORMAT = "steerwise-scale"
FORMAT_VERSION = 1
WHAT = "scaling recipe"
TOP_KEYS = ("format", "format_version", "library_version", "model", "method", "dim", "config",
            "sites", "options", "info")
# The JSON kind of a constructor option without a default, from its annotation.
_ANNOTATION_KINDS = {"int": 0, "bool": False, "float": 0.0, "str": ""}


def _option_reference(cls: type[ScalingIntervention]) -> tuple[dict[str, Any], list[str]]:
    """The options an intervention's constructor takes (beyond sites and dim), each with a value
    of its JSON kind (its default, or a stand-in for its annotated type); and the required ones."""
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, sites, dim
    reference = {p.name: p.default if p.default is not p.empty
                 else _ANNOTATION_KINDS.get(str(p.annotation)) for p in params}
    return reference, [p.name for p in params if p.default is p.empty]


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
        """Load a scaling recipe; anything malformed raises ``RecipeError`` naming file and field.

        The declared sites, width and options are checked against the safetensors header (and
        ``MAX_WIDTH``) before a tensor is read or the intervention is built."""
        path = Path(directory)
        config = read_recipe_config(path, FORMAT, FORMAT_VERSION, WHAT)
        file = path / CONFIG_NAME
        top = RecipeFields(file, config, known=TOP_KEYS)
        ident = top.identity("model")
        method = top.get("method", "string")
        if method not in INTERVENTIONS:
            top.fail("method", f"unknown method {method!r}; known: {', '.join(INTERVENTIONS)}")
        dim = top.width("dim")
        sites = [top.site(s, f"sites[{i}]") for i, s in enumerate(top.get("sites", "array"))]
        if not sites:
            top.fail("sites", "empty; a scaling recipe acts on at least one site")
        options = top.get("config", "object", {})
        kind = INTERVENTIONS[method]
        reference, required = _option_reference(kind)
        check_option_kinds(file, options, reference, top.path("config"))
        for key in required:
            if key not in options:
                top.fail("config", f"missing required key {key!r}")
        meta = build_on_meta(file, "config", kind.empty, sites, dim, options)
        owner = f"the {method} intervention ({len(sites)} sites, dim {dim}, config {options})"
        tensors = read_recipe_tensors(path / TENSORS_NAME, state_shapes(meta, "", owner), WHAT)
        iv = kind.empty(sites, dim, options)  # shapes checked against the header above
        iv.load_state_dict(tensors)
        return cls(
            model=ident,
            intervention=iv,
            options=top.get("options", "object", {}),
            info=top.get("info", "object", {}),
        )
