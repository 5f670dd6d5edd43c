"""A fitted steering as a directory: sites + maps + gates + metadata.

Layout (nothing is pickled; loading never executes code)::

    DIR/steerwise.json         everything but tensors: format, library version, model identity
                               (type, hidden size, layer count), method, gate, default strength,
                               position policy, fit data sizes and options, and per site: site,
                               map and gate configs, layer scale, diagnostics (gate/probe
                               accuracy, ...)
    DIR/steering.safetensors   tensors, keyed ``entries.<i>.map.<name>`` / ``entries.<i>.gate.<name>``

``Recipe.apply(model, strength)`` checks the model matches and returns a ``SteeringHandle``
(a context manager).

Saving is all or nothing; loading checks every field, width and tensor shape (against the
safetensors header) before it allocates anything, and reports any problem as one ``RecipeError``
naming the file and the field (docs/engine.md, "Recipe format"). The generic file reading and
writing lives in ``steerwise.recipe_io`` and the model identity in ``steerwise.identity``; both are
re-exported here.

Format versions: 1 had no position policy (such recipes steer every position, their meaning when
they were saved); 2 adds ``"positions": {"first_token": "steer" | "skip"}``
(``steerwise.positions``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .gates.base import gate_from_config
from .hooks import SteeringHandle
from .identity import (  # noqa: F401  (re-exported: steerwise.recipe is where users find them)
    IDENTITY_MODULES,
    IdentityProvider,
    ModelIdentity,
    RecipeMismatchError,
    check_identity,
    identity_problems,
    register_identity_provider,
)
from .maps.base import map_from_config
from .positions import LEGACY_FIRST_TOKEN, check_first_token
from .recipe_io import (  # noqa: F401  (re-exported for scaling.recipe and older imports)
    CARD_NAME,
    CONFIG_NAME,
    FLOAT_DTYPES,
    INFINITY_ALLOWED,
    MAX_CONFIG_BYTES,
    MAX_WIDTH,
    TENSORS_NAME,
    RecipeError,
    RecipeFields,
    RecipeNotFoundError,
    build_on_meta,
    check_file,
    check_option_kinds,
    json_kind,
    non_finite_value,
    read_recipe_config,
    read_recipe_tensors,
    state_shapes,
    write_recipe_dir,
)
from .sites import Site
from .steering import SiteSteering

FORMAT = "steerwise-recipe"
FORMAT_VERSION = 2  # 2: "positions" (the position policy)
WHAT = "steerwise recipe"
TOP_KEYS = ("format", "format_version", "library_version", "model", "method", "gate",
            "default_strength", "positions", "fit", "entries")
ENTRY_KEYS = ("site", "dim", "map", "gate", "scale", "diagnostics")
POSITION_KEYS = ("first_token",)


def apply_recipes(
    model: nn.Module, recipes: dict[str, Recipe], *, trace: bool = False
) -> SteeringHandle:
    """Install several recipes at once; each batch row then picks its own with
    ``handle.route(names, strengths)`` (a name, or ``None`` for an unsteered row). Each recipe is
    checked against the model and keeps its position policy (``steerwise.compile``)."""
    return SteeringHandle.many(model, recipes, trace=trace)


@dataclass
class Recipe:
    """A fitted steering: a list of ``SiteSteering`` entries plus metadata.

    ``first_token``: the position policy (``steerwise.positions``): ``"steer"`` (every position,
    the meaning of recipes saved before the policy existed) or ``"skip"`` (the first real token
    of each sequence is left unsteered). ``fit`` sets it from ``FitOptions.first_token``."""

    model: ModelIdentity
    entries: list[SiteSteering]
    method: str
    gate: str
    default_strength: float = 1.0
    fit_info: dict[str, Any] = field(default_factory=dict)
    first_token: str = LEGACY_FIRST_TOKEN

    def __post_init__(self) -> None:
        self.first_token = check_first_token(self.first_token)

    # ---- applying --------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ``RecipeMismatchError`` naming every difference from the fitted model."""
        check_identity(self.model, model)

    def apply(
        self, model: nn.Module, strength: float | None = None, *, trace: bool = False
    ) -> SteeringHandle:
        """Install the steering on ``model``; use as ``with recipe.apply(model, 4.0): ...``."""
        s = self.default_strength if strength is None else strength
        return SteeringHandle(model, self, s, trace=trace)  # checks the model (compile step)

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
            "positions": {"first_token": self.first_token},
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
        return write_recipe_dir(target, tensors, self.to_json(), {CARD_NAME: card})

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Publish to the Hugging Face Hub with its model card (see ``steerwise.hub.push_to_hub``:
        ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, revision: str | None = None, **hub_kwargs: Any
    ) -> Recipe:
        """Load a recipe from a directory or a Hub repo id (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``: see ``steerwise.hub.resolve_recipe_dir``); anything
        malformed raises ``RecipeError`` naming the file and field.

        Every declared width and tensor shape is checked (against ``MAX_WIDTH`` and the
        safetensors header) before a tensor is read or a map is built."""
        from .hub import resolve_recipe_dir

        path = resolve_recipe_dir(directory, revision=revision, **hub_kwargs)
        config = read_recipe_config(path, FORMAT, FORMAT_VERSION, WHAT)
        file = path / CONFIG_NAME
        top = RecipeFields(file, config, known=TOP_KEYS)
        ident = top.identity("model")
        first_token = LEGACY_FIRST_TOKEN  # format 1 (no "positions"): every position is steered
        if "positions" in top.obj:
            pos = RecipeFields(file, top.get("positions", "object"), "positions",
                               known=POSITION_KEYS)
            first_token = pos.get("first_token", "string", LEGACY_FIRST_TOKEN)
            try:
                check_first_token(first_token)
            except ValueError as exc:
                pos.fail(pos.path("first_token"), str(exc).replace("first_token must", "must"))
        specs, expected = [], {}
        for i, raw in enumerate(top.get("entries", "array")):
            e = RecipeFields(file, raw, f"entries[{i}]", known=ENTRY_KEYS)
            site = top.site(e.get("site", "object"), e.path("site"))
            dim = e.width("dim", ident.hidden_size)
            parts = {}
            for part, key, build in (("map", "method", map_from_config),
                                     ("gate", "kind", gate_from_config)):
                p = RecipeFields(file, e.get(part, "object"), e.path(part), known=(key, "config"))
                name, options = p.get(key, "string"), p.get("config", "object", {})
                where = p.path("config")
                reference = build_on_meta(file, p.path(key), build, name, dim, {})
                check_option_kinds(file, options, reference.config(), where)
                meta = build_on_meta(file, where, build, name, dim, options)
                expected |= state_shapes(meta, f"entries.{i}.{part}.",
                                         f"{p.where} ({name!r}, dim {dim})")
                parts[part] = (build, name, options)
            scale = e.get("scale", "number")
            specs.append((site, dim, parts, scale, e.get("diagnostics", "object", {})))
        tensors = read_recipe_tensors(path / TENSORS_NAME, expected, WHAT)
        entries = []
        for i, (site, dim, parts, scale, diagnostics) in enumerate(specs):
            modules = {}
            for part, (build, name, options) in parts.items():
                module = build(name, dim, options)  # widths checked against the header above
                prefix = f"entries.{i}.{part}."
                module.load_state_dict(
                    {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                )
                modules[part] = module
            entries.append(SiteSteering(site, modules["map"], modules["gate"], scale, diagnostics))
        return cls(
            model=ident,
            entries=entries,
            method=top.get("method", "string"),
            gate=top.get("gate", "string"),
            default_strength=float(top.get("default_strength", "number", 1.0)),
            fit_info=top.get("fit", "object", {}),
            first_token=first_token,
        )
