"""The HF backend: steering hooks on a transformers (or diffusers) model.

``SteeringHandle`` runs what ``steerwise.compile`` made of one or several recipes: one hook per
steered site, plus a pre-hook on the model itself, installed only when something needs the
per-call context (a gate that runs outside the kernel, a trace, a recipe that leaves the first
token unsteered), which records the attention mask and whether the call starts a new sequence.
Hooks are made by a factory so each binds its own site; the handle owns all mutable state
(strengths, routing, per-sequence gate state, traces), so nothing is global and two handles never
share anything. Use it as a context manager (hooks are removed on exit, also when the body raises)
or call ``remove()`` yourself. (Other hook owners share ``HookHandle``'s life cycle: the scaling
interventions, LinEAS training's activation taps, diffusion's timestep switch.)

The arithmetic is ``steerwise.kernel.steer``: per token and per site, in float32,
``t' = t + λ · a_l · h_l(t) · δ_l(t)``, cast back to the activation's dtype. A handle holds one
recipe (``SteeringHandle(model, recipe_or_entries, strength)``, what ``Recipe.apply`` returns) or
several (``SteeringHandle.many``), in which case each row of the batch gets its own recipe and
strength (``route``). Strength 0 is bit-identical to the unsteered model, and a handle whose
strengths are all 0 costs one Python check per hooked call. A recipe whose position policy is
``first_token="skip"`` (``steerwise.positions``) gets strength 0 at the first real position of
each row in a call that starts a sequence (the first position whose attention mask is 1).

**Threads and contexts.** Hooks sit on modules that every caller of the model shares, so a
handle acts only inside the context (``contextvars``) that created it: the thread that applied
a recipe sees its steering; another thread's forward pass on the same model is unsteered, and
two threads with two recipes each get their own. Asyncio tasks inherit their creator's context.
To use a handle from another thread, enter ``handle.activate()`` there. Inside a
``torch.compile``d model the check is skipped (a compiled graph cannot read contextvars, and its
guards fix the steering it was traced with): give each thread its own compiled model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import count
from typing import Any

import torch
from torch import Tensor, nn

from .compile import CompiledSite, CompiledSteering, as_recipe_map, compile_steering
from .gates.base import StepContext
from .kernel import steer
from .positions import first_token_keep
from .sites import Site, SiteError, describe_sites, model_type
from .steering import SiteSteering

__all__ = ["HookHandle", "SiteSteering", "SteeringHandle", "check_strength", "find_cache",
           "is_prefill", "rewrite_output"]


def _module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return fallback


def _first_tensor_index(seq: Sequence[Any]) -> int:
    for i, x in enumerate(seq):
        if isinstance(x, Tensor):
            return i
    raise TypeError("no tensor in the module's output tuple")


def rewrite_output(
    output: Any, tuple_index: int | None, rewrite: Callable[[Tensor], Tensor | None], what: str
) -> Any:
    """A module output with its activation replaced by ``rewrite(activation)``.

    The activation is the output itself, or element ``tuple_index`` of a tuple/list output (the
    first tensor when ``None``). ``rewrite`` returning ``None`` leaves the output untouched.
    """
    if isinstance(output, Tensor):
        new = rewrite(output)
        return output if new is None else new
    if isinstance(output, (tuple, list)):
        i = _first_tensor_index(output) if tuple_index is None else tuple_index
        new = rewrite(output[i])
        if new is None:
            return output
        items = list(output)
        items[i] = new
        return type(output)(items) if isinstance(output, tuple) else items
    raise TypeError(f"{what}: cannot rewrite an output of type {type(output).__name__}")


# ---- when a sequence starts ---------------------------------------------------------------------
CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.24 passes `cache`, older versions `past_key_values`


def find_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache object of a model call, whatever keyword carries it (``None`` if none)."""
    for key in CACHE_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    for value in kwargs.values():  # a future rename: recognise the cache by its interface
        if hasattr(value, "get_seq_length"):
            return value
    return None


def is_prefill(kwargs: Mapping[str, Any]) -> bool:
    """Whether a model call starts a sequence: its KV cache holds no token yet.

    Reads the cache under any keyword (``cache``, ``past_key_values``, or any argument with
    ``get_seq_length``); without a cache object, the call's ``cache_position`` tells (0 first);
    with neither, every call is a whole sequence (no cache is used).
    """
    cache = find_cache(kwargs)
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length()) == 0
        try:  # legacy tuple cache: ((key, value), ...) with keys (batch, heads, seq, dim)
            return int(cache[0][0].shape[-2]) == 0
        except (IndexError, TypeError, AttributeError):
            return False
    position = kwargs.get("cache_position")
    if isinstance(position, Tensor) and position.numel():
        return int(position.reshape(-1)[0]) == 0
    return True


# ---- which handles act in this context -----------------------------------------------------------
_ACTIVE: ContextVar[frozenset[int]] = ContextVar("steerwise_active_handles", default=frozenset())
_IDS = count(1)


def check_strength(value: float, what: str = "strength") -> float:
    """``value`` as a float, or a ValueError naming it when it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v}")
    return v


class HookHandle:
    """The life cycle every hook owner shares: module lookup, removal, context manager, and the
    context the hooks act in (the one that created the handle; see ``activate``).

    Subclasses call ``_activate()`` once their hooks are in, check ``in_context()`` at the top
    of every hook, and register their hooks into ``self._handles``; ``remove()`` (also on
    ``with`` exit, whether or not the body raised) takes every one of them off the model.
    """

    model: nn.Module
    _handles: list[Any]
    _id: int = 0

    def _activate(self) -> None:
        self._id = next(_IDS)
        _ACTIVE.set(_ACTIVE.get() | {self._id})

    def in_context(self) -> bool:
        """Whether this handle acts in the current thread/context."""
        return self._id in _ACTIVE.get()

    @contextmanager
    def activate(self) -> Iterator[Any]:
        """Make the handle act in the current context too (e.g. another thread) while inside."""
        token = _ACTIVE.set(_ACTIVE.get() | {self._id})
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def _get_module(self, site: Site) -> nn.Module:
        try:
            return self.model.get_submodule(site.module)
        except AttributeError:
            kinds = "; ".join(f"{k}: {v}" for k, v in describe_sites(self.model).items())
            raise SiteError(
                f"site {site.name!r} (module {site.module!r}) does not exist in this "
                f"{model_type(self.model)} model; named sites of layer 0 are: {kinds}"
            ) from None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _ACTIVE.set(_ACTIVE.get() - {self._id})

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class SteeringHandle(HookHandle):
    """Installed steering hooks; a context manager.

    One recipe: ``SteeringHandle(model, recipe, strength)`` (a ``Recipe``, checked against the
    model, or a list of ``SiteSteering`` entries, which steers every position); ``strength`` may be
    changed at any time. Several: ``SteeringHandle.many(model, {"name": recipe, ...})`` then,
    before each batch, ``route(["name", None, ...], [4.0, 0.0, ...])`` gives each row its recipe
    (``None``: unsteered) and strength. ``SteeringHandle.compiled`` installs what
    ``steerwise.compile.compile_steering`` already made.
    """

    def __init__(
        self,
        model: nn.Module,
        entries: Any,
        strength: float = 1.0,
        *,
        trace: bool = False,
    ) -> None:
        value = check_strength(strength)  # before any hook goes in
        self._setup(model, compile_steering(as_recipe_map(entries), model), trace)
        self.strength = value

    @classmethod
    def many(
        cls, model: nn.Module, recipes: Mapping[str, Any], *, trace: bool = False
    ) -> SteeringHandle:
        """Several recipes (``Recipe``s or lists of entries) on one model, each row of a batch
        routed to one of them (``route``); every row is unsteered until routed."""
        if not recipes:
            raise ValueError("give at least one recipe")
        return cls.compiled(model, compile_steering({str(k): v for k, v in recipes.items()},
                                                    model), trace=trace)

    @classmethod
    def compiled(
        cls, model: nn.Module, compiled: CompiledSteering, *, trace: bool = False
    ) -> SteeringHandle:
        """Install compiled recipes (``compile_steering``); every row is unsteered until routed
        (one recipe named ``""``: set ``strength``)."""
        self = cls.__new__(cls)
        self._setup(model, compiled, trace)
        self._strength = 0.0
        return self

    def _setup(self, model: nn.Module, compiled: CompiledSteering, trace: bool) -> None:
        self.model = model
        self.compiled_steering = compiled
        self.names = list(compiled.names)
        self.entries = compiled.entries
        self._tracing = trace
        self._root_hook: Any = None
        self._ctx = StepContext()
        self._handles: list[Any] = []
        self._trace: dict[str, list[Tensor]] = {}
        self._masks: list[Tensor | None] = []
        self._strength = 0.0
        self._rows: tuple[Tensor, Tensor] | None = None  # (strength (B,), recipe index (B,))
        self._row_cache: dict[torch.device, tuple[Tensor, ...]] = {}
        self._steering = False
        # the position policy: per-call work only when a recipe leaves the first token unsteered
        self._skip_first = compiled.skips_first
        self._skip_rows = compiled.skip_first  # per recipe
        self._first: Tensor | None = None  # (batch, tokens) 0 at first positions, this call
        self._first_cache: dict[torch.device, Tensor] = {}
        self._slots: list[CompiledSite] = []
        self._install()

    # ---- what to steer with ------------------------------------------------------------------
    @property
    def strength(self) -> float:
        """The strength of every row (one-recipe handles)."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        if len(self.names) > 1:
            raise ValueError("this handle holds several recipes: give each row its own with route()")
        self._strength = check_strength(value)
        self._rows = None
        self._steering = self._strength != 0.0

    def route(self, recipes: Sequence[str | None], strengths: Sequence[float]) -> None:
        """Per batch row: the recipe (a name given to ``many``, or ``None`` = unsteered) and the
        strength. Applies to every forward call until the next ``route``."""
        if len(recipes) != len(strengths):
            raise ValueError(f"{len(recipes)} recipes but {len(strengths)} strengths")
        index, values = [], []
        for row, (name, s) in enumerate(zip(recipes, strengths)):
            s = check_strength(s, f"strength of row {row}")
            if name is None:
                index.append(0)
                values.append(0.0)
                continue
            if name not in self.names:
                raise KeyError(f"unknown recipe {name!r}; this handle holds: "
                               f"{', '.join(map(repr, self.names))}")
            index.append(self.names.index(name))
            values.append(s)
        self._rows = (torch.tensor(values, dtype=torch.float32), torch.tensor(index))
        self._row_cache = {}
        self._steering = any(v != 0.0 for v in values)

    def _row_tensors(self, batch: int, device: torch.device) -> tuple[Tensor, ...]:
        """(strength (B,), recipe index (B,), and with a skipping recipe: skips first (B,))."""
        rows = self._rows
        if rows is None:
            raise RuntimeError("this handle holds several recipes: call route() before running")
        if rows[0].shape[0] != batch:
            raise ValueError(
                f"route() gave {rows[0].shape[0]} rows but the model runs a batch of {batch}"
            )
        cached = self._row_cache.get(device)
        if cached is None:
            cached = (rows[0].to(device), rows[1].to(device))
            if self._skip_first:
                skips = torch.tensor(self._skip_rows)[rows[1]]
                cached += (skips.to(device),)
            self._row_cache[device] = cached
        return cached

    # ---- life cycle -------------------------------------------------------------------------
    def _install(self) -> None:
        try:
            fallback = next(self.model.parameters()).device
            for slot in self.compiled_steering.sites:
                module = self._get_module(slot.site)
                slot.to(_module_device(module, fallback))
                self._slots.append(slot)
                if slot.site.io == "input":
                    h = module.register_forward_pre_hook(self._make_input_hook(slot))
                else:
                    h = module.register_forward_hook(self._make_output_hook(slot))
                self._handles.append(h)
            # the per-call context (mask, sequence start, gate state) only matters to gates that
            # run outside the kernel, to traces and to a first-token policy: without them, no
            # pre-hook at all
            if self._tracing or self._skip_first or any(slot.external for slot in self._slots):
                self._install_root_hook()
        except BaseException:
            self.remove()
            raise
        self._activate()

    def _install_root_hook(self) -> None:
        if self._root_hook is None:
            self._root_hook = self.model.register_forward_pre_hook(self._root_pre_hook,
                                                                   with_kwargs=True)
            self._handles.append(self._root_hook)

    @property
    def trace_enabled(self) -> bool:
        """Whether gate values are recorded (``gate_trace``); may be switched on and off."""
        return self._tracing

    @trace_enabled.setter
    def trace_enabled(self, value: bool) -> None:
        self._tracing = bool(value)
        if self._tracing and self._handles:
            self._install_root_hook()

    # ---- hooks -----------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.in_context():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cur = ids.shape[1] if isinstance(ids, Tensor) and ids.ndim >= 2 else None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2 and cur is not None:
            mask = mask[:, -cur:]
        else:
            mask = None
        prefill = is_prefill(kwargs)
        self._ctx = StepContext(attention_mask=mask, is_prefill=prefill,
                                state={} if prefill else self._ctx.state)
        if self._skip_first:
            self._first, self._first_cache = None, {}
            if prefill:
                if cur is None:
                    raise ValueError(
                        "a recipe leaves the first token unsteered (first_token='skip'), but this "
                        "model call has no input_ids or inputs_embeds of shape (batch, tokens) "
                        "to find each row's first position in")
                self._first = first_token_keep(mask, int(ids.shape[0]), cur, ids.device)
        if prefill:
            for entry in self.entries:
                entry.gate.reset()
            if self.trace_enabled:
                self._trace = {}
                self._masks = []
        if self.trace_enabled:
            self._masks.append(mask.detach().cpu() if mask is not None else None)

    def _first_keep(self, slot: CompiledSite, t: Tensor, skips: Tensor | None) -> Tensor:
        """(batch, tokens): 0 where the first token of a row whose recipe skips it sits."""
        keep = self._first_cache.get(t.device)
        if keep is None:
            keep = self._first_cache[t.device] = self._first.to(t.device)  # type: ignore[union-attr]
        if tuple(t.shape[:-1]) != tuple(keep.shape):
            raise ValueError(
                f"site {slot.site.name!r}: a recipe leaves the first token unsteered "
                f"(first_token='skip'), which needs (batch, tokens, features) activations; this "
                f"site has shape {tuple(t.shape)} for {tuple(keep.shape)} tokens")
        if skips is not None:  # several recipes: only rows whose recipe skips
            keep = torch.where(skips.view(-1, 1), keep, torch.ones((), device=t.device))
        return keep

    def _steer(self, slot: CompiledSite, x: Tensor) -> Tensor | None:
        """The steered activation, or None to leave it untouched."""
        if not torch.compiler.is_compiling() and self._id not in _ACTIVE.get():
            return None  # (a compiled graph cannot read contextvars: see the module docstring)
        channel_dim = slot.site.channel_dim
        moved = channel_dim not in (-1, x.ndim - 1)
        if moved:
            x = x.movedim(channel_dim, -1)
        t = x.float()
        stack = slot.build() if slot.live else slot.stack
        index = None
        skips = None
        strength: Tensor | float = self._strength
        if self._rows is not None or len(self.names) > 1:
            rows = self._row_tensors(t.shape[0], t.device)
            strength, index = rows[0], rows[1]
            shape = (t.shape[0],) + (1,) * (t.ndim - 2)
            strength, index = strength.view(shape), index.view(shape)
            if self._skip_first:
                skips = rows[2]
        keep = None
        if self._skip_first and self._first is not None:  # a prefill: first tokens get 0
            keep = self._first_keep(slot, t, skips)
            strength = strength * keep
        external = None
        if slot.external:
            external = self._external(slot, t, index)
        out, gate = steer(t, stack, strength, index, external, with_gate=self.trace_enabled)
        if gate is not None:
            gate = gate.detach().float().expand(t.shape[:-1])
            if keep is not None:  # the multiplier of the strength there is 0
                gate = gate * keep
            self._trace.setdefault(slot.site.name, []).append(gate.cpu())
        if not self._steering:
            return None
        if moved:
            out = out.movedim(-1, channel_dim)
        return out.to(x.dtype)

    def _external(self, slot: CompiledSite, t: Tensor, index: Tensor | None) -> Tensor:
        """Per-token values of the gates that run outside the kernel, each on its own rows."""
        ext = None
        for r, gate in slot.external:
            v = gate(t, self._ctx)
            v = torch.ones(t.shape[:-1], device=t.device) if v is None else v.float()
            if index is None:
                return v
            v = torch.where(index == r, v, torch.zeros((), device=t.device))
            ext = v if ext is None else ext + v
        return ext  # type: ignore[return-value]

    def _make_output_hook(self, slot: CompiledSite):
        index = slot.site.tuple_index
        what = f"site {slot.site.name!r}"

        def steer_output(x: Tensor) -> Tensor | None:
            return self._steer(slot, x)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self._steering and not self.trace_enabled:
                return output
            return rewrite_output(output, index, steer_output, what)

        return hook

    def _make_input_hook(self, slot: CompiledSite):
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self._steering and not self.trace_enabled:
                return None
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"site {slot.site.name!r}: the module got no positional tensor")
            new = self._steer(slot, args[0])
            return None if new is None else (new, *args[1:])

        return pre_hook

    # ---- traces ----------------------------------------------------------------------------
    def clear_trace(self) -> None:
        """Forget what was traced so far: the next ``gate_trace`` covers only later calls (a
        server whose rows join and leave reads one forward call at a time)."""
        self._trace, self._masks = {}, []

    def gate_trace(self) -> tuple[list[str], Tensor, Tensor | None]:
        """(site names, values (batch, tokens, sites), mask (batch, tokens) or None).

        Values are ``a_l · h_l(t)``, the per-token multiplier of the strength, for every forward
        call since the last prefill (prompt tokens, then one column per generated token). With
        several recipes, each row's values come from its own recipe (0 at sites it does not
        steer).
        """
        if not self.trace_enabled:
            raise RuntimeError("this handle was created without trace=True")
        names = [s.site.name for s in self._slots if s.site.name in self._trace]
        if not names:
            raise RuntimeError("nothing traced yet: run the model inside the context first")
        cols = [torch.cat(self._trace[n], dim=1) for n in names]
        values = torch.stack(cols, dim=-1)
        mask = None
        if self._masks and all(m is not None for m in self._masks):
            mask = torch.cat([m for m in self._masks if m is not None], dim=1)
        return names, values, mask
