"""The compile step: recipes → what every backend runs.

``compile_steering({"name": recipe_or_entries, ...}, model_info)`` does, once, everything that
sits between fitted recipes and the kernel (``steerwise.kernel``), for every backend alike (the
HF hooks, the server, vLLM, diffusion):

- checks that each recipe was fitted for the model (``steerwise.identity.check_identity``; the
  model is an ``nn.Module`` or a ``ModelIdentity``, so vLLM, which reads its model's config,
  uses the same check) and can be applied by a plain backend (``Recipe.check_applicable``);
- links gates that share state (CAST's condition and follower sites);
- groups the entries by site and builds, per site, one ``SiteStack`` of the R recipes
  (``build_stack``; a recipe that does not steer a site has a zero row), refusing a recipe that
  steers a site twice or recipes that disagree on a site's width;
- records which recipes steer which site, which gates run outside the kernel, and each recipe's
  position policy (``steerwise.positions``).

What a backend cannot run is refused by ``check_backend(compiled, backend)``, one function with
one message per requirement: a ``Backend`` states whether it runs external (stateful) gates and
which sites it can hook. A new backend routes tokens (each token's recipe index and strength,
strength 0 at a skipped first token) and calls the kernel per site; nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .gates.base import Gate
from .identity import ModelIdentity, RecipeMismatchError, check_identity
from .kernel import SiteStack, build_stack
from .positions import LEGACY_FIRST_TOKEN, check_first_token
from .sites import Site
from .steering import SiteSteering


@dataclass
class CompiledSite:
    """One steered site: the entry of each recipe there (``None`` where a recipe does not steer
    it), their stack, and the recipes whose gate runs outside the kernel."""

    site: Site
    entries: list[SiteSteering | None]
    dim: int
    external: list[tuple[int, Gate]]  # (recipe index, gate) of gates run outside the kernel
    live: bool  # trainable tensors: rebuild the stack every call so gradients reach them
    stack: SiteStack

    @property
    def recipes(self) -> frozenset[int]:
        """The indices of the recipes that steer this site."""
        return frozenset(r for r, e in enumerate(self.entries) if e is not None)

    def build(self) -> SiteStack:
        """A fresh stack from the entries' current tensors (what ``live`` sites do per call)."""
        return build_stack(
            [None if e is None else (e.map.affine(), e.gate.linear_form(), e.scale)
             for e in self.entries],
            self.dim,
        )

    def to(self, device: torch.device | str) -> CompiledSite:
        """Move the entries and the stack to ``device`` (in place; returns ``self``)."""
        for e in self.entries:
            if e is not None:
                e.to(device)
        self.stack = self.stack.to(device)
        return self


@dataclass
class CompiledSteering:
    """Recipes compiled for one model: names (in recipe-index order), entries, per-site stacks and
    position policies. Built by ``compile_steering``."""

    names: list[str]
    recipes: list[list[SiteSteering]]
    first_token: list[str]  # per recipe: "steer" | "skip" (steerwise.positions)
    gates: list[str]  # per recipe: the recipe's gate name (for messages)
    sites: list[CompiledSite] = field(default_factory=list)

    @property
    def entries(self) -> list[SiteSteering]:
        return [e for entries in self.recipes for e in entries]

    @property
    def skip_first(self) -> list[bool]:
        """Per recipe: whether its first real token of each sequence gets strength 0."""
        return [p == "skip" for p in self.first_token]

    @property
    def skips_first(self) -> bool:
        """Whether any recipe leaves the first token unsteered (backends do no per-call position
        work otherwise)."""
        return "skip" in self.first_token

    @property
    def needs_external(self) -> bool:
        """Whether a gate runs outside the kernel (it needs the per-call context)."""
        return any(s.external for s in self.sites)

    def sites_of(self, name: str) -> set[str]:
        """The names of the sites recipe ``name`` steers."""
        return {e.site.name for e in self.recipes[self.names.index(name)]}


def compile_steering(
    recipes: Mapping[str, Any],
    model_info: nn.Module | ModelIdentity | None = None,
) -> CompiledSteering:
    """Compile ``{name: Recipe or [SiteSteering, ...]}`` for one model (see the module doc).

    Recipes are checked against ``model_info`` (a model or its ``ModelIdentity``; ``None``: no
    check) and keep their position policy; a bare list of entries has no identity to check and
    steers every position. Several recipes are keyed by name; a lone recipe may be named ``""``
    (its errors then carry no name)."""
    if not recipes:
        raise ValueError("give at least one recipe")
    names, lists, policies, gates = [], [], [], []
    ident: ModelIdentity | None = None
    for name, value in recipes.items():
        name = str(name)
        label = f"recipe {name!r}: " if name else ""
        if hasattr(value, "entries"):  # a Recipe
            if model_info is not None:
                if ident is None:
                    ident = (model_info if isinstance(model_info, ModelIdentity)
                             else ModelIdentity.of(model_info))
                try:
                    check_identity(value.model, ident)
                except RecipeMismatchError as exc:
                    raise RecipeMismatchError(f"{label}{exc}") from None
            value.check_applicable()
            entries = list(value.entries)
            policy = check_first_token(getattr(value, "first_token", LEGACY_FIRST_TOKEN),
                                       f"{label}first_token")
            gate = str(value.gate)
        else:
            entries = list(value)
            policy = LEGACY_FIRST_TOKEN
            gate = entries[0].gate.kind if entries else "none"
        names.append(name)
        lists.append(entries)
        policies.append(policy)
        gates.append(gate)
    compiled = CompiledSteering(names, lists, policies, gates)
    for entries in lists:  # gates that share state (CAST) find their partners
        for entry in entries:
            link = getattr(entry.gate, "link", None)
            if callable(link):
                link(entries)
    by_site: dict[str, tuple[Site, list[SiteSteering | None]]] = {}
    for r, entries in enumerate(lists):
        for entry in entries:
            slot = by_site.setdefault(entry.site.name, (entry.site, [None] * len(lists)))
            if slot[1][r] is not None:
                raise ValueError(f"a recipe steers site {entry.site.name!r} twice")
            slot[1][r] = entry
    for site, entries in by_site.values():
        compiled.sites.append(_compile_site(site, entries))
    return compiled


def _compile_site(site: Site, entries: list[SiteSteering | None]) -> CompiledSite:
    real = [e for e in entries if e is not None]
    dim = real[0].dim
    for e in real:
        if e.dim != dim:
            raise ValueError(f"site {site.name!r}: recipes disagree on its width ({e.dim} vs {dim})")
    live = any(p.requires_grad for e in real for p in (*e.map.parameters(), *e.gate.parameters()))
    external = [(r, e.gate) for r, e in enumerate(entries)
                if e is not None and e.gate.linear_form().kind == "external"]
    with torch.no_grad():
        stack = build_stack(
            [None if e is None else (e.map.affine(), e.gate.linear_form(), e.scale)
             for e in entries], dim)
    return CompiledSite(site, entries, dim, external, live, stack)


# ---- what a backend can run ---------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """What a backend runs, for ``check_backend``.

    ``external_gates``: whether it runs gates that compute outside the kernel and keep
    per-sequence state (CAST, prefix-mean DSAS); where not, ``external_reason`` says why (after
    the backend's name) and ``remedy`` what to do. ``site_problem(site, dim)``: why the backend
    cannot hook a site, or ``None`` when it can (``None``: every site)."""

    name: str
    external_gates: bool = True
    external_reason: str = "does not run them"
    remedy: str = ""
    site_problem: Callable[[Site, int], str | None] | None = None


HF_HOOKS = Backend("the HF hooks")


def check_backend(compiled: CompiledSteering, backend: Backend) -> None:
    """Raise a ValueError naming the recipe, the site and the reason for the first thing in
    ``compiled`` that ``backend`` cannot run."""
    for name, entries, gate in zip(compiled.names, compiled.recipes, compiled.gates):
        label = f"recipe {name!r}" if name else "the recipe"
        for e in entries:
            if backend.site_problem is not None:
                problem = backend.site_problem(e.site, e.dim)
                if problem:
                    raise ValueError(f"{label}, site {e.site.name!r}: {problem}")
            if not backend.external_gates and e.gate.linear_form().kind == "external":
                remedy = f" {backend.remedy}" if backend.remedy else ""
                raise ValueError(
                    f"{label} uses a {gate!r} gate ({type(e.gate).__name__}) at site "
                    f"{e.site.name!r}, which runs outside the kernel: it decides once per "
                    f"sequence and keeps that decision in per-batch state; {backend.name} "
                    f"{backend.external_reason}. Use a recipe fitted with --gate dsas, "
                    f"dsas-adaptive, e2e or none{remedy}"
                )


def as_recipe_map(recipes: Mapping[str, Any] | Sequence[SiteSteering] | Any) -> dict[str, Any]:
    """``{name: recipe}`` from a mapping, or ``{"": x}`` from one recipe or list of entries."""
    if isinstance(recipes, Mapping):
        return {str(k): v for k, v in recipes.items()}
    return {"": recipes}
