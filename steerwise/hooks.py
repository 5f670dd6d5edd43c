"""The one place that touches torch hooks.

``SteeringHandle`` installs one hook per steered site plus a pre-hook on the model itself that
records the attention mask and whether the call starts a new sequence. Hooks are made by a
factory so each binds its own site's map and gate; the handle owns all mutable state (strength,
traces), so nothing is global and two handles never share anything. Use it as a context manager
(hooks are removed on exit, also when the body raises) or call ``remove()`` yourself.

Per token and per site the hook computes, in float32, ``t' = t + λ · a_l · h_l(t) · δ_l(t)``
(λ = global strength, a_l = the site's scale, h_l = gate, δ_l = the map's ``delta``) and casts
back to the activation's dtype. When ``λ · a_l`` is 0 the activation is returned untouched, so
strength 0 is bit-identical to the unsteered model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .gates.base import Gate, NoGate, StepContext
from .maps.base import SteeringMap
from .sites import Site, SiteError, describe_sites, model_type


class SiteSteering(nn.Module):
    """One steered site: where (``site``), how (``map``), when (``gate``), and a layer scale."""

    def __init__(
        self,
        site: Site,
        steering_map: SteeringMap,
        gate: Gate | None = None,
        scale: float = 1.0,
        diagnostics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.site = site
        self.map = steering_map
        self.gate = gate if gate is not None else NoGate()
        self.scale = float(scale)
        self.diagnostics = dict(diagnostics or {})

    @property
    def dim(self) -> int:
        """Feature width of the site, read off the map's tensors."""
        for t in self.map.state_dict().values():
            return int(t.shape[-1])
        raise ValueError(f"map {self.map.method!r} has no tensors to tell its width")


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


def is_prefill(kwargs: dict) -> bool:
    """Whether a model call starts a sequence: no KV cache, or an empty one."""
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()) == 0
    return past is None


class HookHandle:
    """The life cycle every hook owner shares: module lookup, removal, context manager.

    Subclasses register their hooks into ``self._handles``; ``remove()`` (also on ``with`` exit,
    whether or not the body raised) takes every one of them off the model.
    """

    model: nn.Module
    _handles: list[Any]

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

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class SteeringHandle(HookHandle):
    """Installed steering hooks; a context manager. ``strength`` may be changed at any time."""

    def __init__(
        self,
        model: nn.Module,
        entries: Sequence[SiteSteering],
        strength: float = 1.0,
        *,
        trace: bool = False,
    ) -> None:
        self.model = model
        self.entries = list(entries)
        self.strength = float(strength)
        self.trace_enabled = trace
        self._ctx = StepContext()
        self._handles: list[Any] = []
        self._trace: dict[str, list[Tensor]] = {}
        self._masks: list[Tensor | None] = []
        self._install()

    # ---- life cycle -------------------------------------------------------------------------
    def _install(self) -> None:
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)
            )
            fallback = next(self.model.parameters()).device
            for entry in self.entries:  # gates that share state (CAST) find their partners
                link = getattr(entry.gate, "link", None)
                if callable(link):
                    link(self.entries)
            for entry in self.entries:
                module = self._get_module(entry.site)
                entry.to(_module_device(module, fallback))
                if entry.site.io == "input":
                    h = module.register_forward_pre_hook(self._make_input_hook(entry))
                else:
                    h = module.register_forward_hook(self._make_output_hook(entry))
                self._handles.append(h)
        except BaseException:
            self.remove()
            raise

    # ---- hooks -----------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
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
        self._ctx = StepContext(attention_mask=mask, is_prefill=prefill)
        if prefill:
            for entry in self.entries:
                entry.gate.reset()
            if self.trace_enabled:
                self._trace = {}
                self._masks = []
        if self.trace_enabled:
            self._masks.append(mask.detach().cpu() if mask is not None else None)

    def _steer(self, entry: SiteSteering, gate_fn, delta_fn, x: Tensor) -> Tensor | None:
        """The steered activation, or None to leave it untouched.

        ``gate_fn``/``delta_fn`` are the entry's ``gate.forward`` and ``map.delta``, bound once by
        the hook factory: this runs for every site at every decoding step, where attribute look-ups
        through ``nn.Module.__getattr__`` and module-call machinery cost more than the gate itself.
        """
        channel_dim = entry.site.channel_dim
        moved = channel_dim not in (-1, x.ndim - 1)
        t = x.float()
        if moved:
            t = t.movedim(channel_dim, -1)
        coef = self.strength * entry.scale
        gate = None
        if coef != 0.0 or self.trace_enabled:
            gate = gate_fn(t, self._ctx)
        if self.trace_enabled:
            shown = torch.ones(t.shape[:-1], device=t.device) if gate is None else gate
            self._trace.setdefault(entry.site.name, []).append(
                (shown * entry.scale).detach().float().cpu()
            )
        if coef == 0.0:
            return None
        delta = delta_fn(t)
        if gate is None:
            out = torch.add(t, delta, alpha=coef)
        else:  # one fused kernel: t + coef · gate · delta
            out = torch.addcmul(t, gate.unsqueeze(-1), delta, value=coef)
        if moved:
            out = out.movedim(-1, channel_dim)
        return out.to(x.dtype)

    def _make_output_hook(self, entry: SiteSteering):
        index = entry.site.tuple_index
        gate_fn, delta_fn = entry.gate.forward, entry.map.delta

        what = f"site {entry.site.name!r}"

        def steer(x: Tensor) -> Tensor | None:
            return self._steer(entry, gate_fn, delta_fn, x)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return rewrite_output(output, index, steer, what)

        return hook

    def _make_input_hook(self, entry: SiteSteering):
        gate_fn, delta_fn = entry.gate.forward, entry.map.delta

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"site {entry.site.name!r}: the module got no positional tensor")
            new = self._steer(entry, gate_fn, delta_fn, args[0])
            return None if new is None else (new, *args[1:])

        return pre_hook

    # ---- traces ----------------------------------------------------------------------------
    def gate_trace(self) -> tuple[list[str], Tensor, Tensor | None]:
        """(site names, values (batch, tokens, sites), mask (batch, tokens) or None).

        Values are ``a_l · h_l(t)``, the per-token multiplier of the strength, for every forward
        call since the last prefill (prompt tokens, then one column per generated token).
        """
        if not self.trace_enabled:
            raise RuntimeError("this handle was created without trace=True")
        names = [e.site.name for e in self.entries if e.site.name in self._trace]
        if not names:
            raise RuntimeError("nothing traced yet: run the model inside the context first")
        cols = [torch.cat(self._trace[n], dim=1) for n in names]
        values = torch.stack(cols, dim=-1)
        mask = None
        if self._masks and all(m is not None for m in self._masks):
            mask = torch.cat([m for m in self._masks if m is not None], dim=1)
        return names, values, mask
