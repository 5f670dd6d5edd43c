"""Installing a scaling intervention on a model: a context manager, like ``steerwise.hooks``
(and, like it, acting only in the thread/context that installed it).

``ScalingHandle(model, intervention, beta)`` adds one forward hook per site (made by a factory,
so each binds its own site index) plus a pre-hook on the model that records whether the call is a
prefill (no KV cache yet) and how many tokens it carries — positional interventions need the
token index. Hooks compute in float32 and cast back to the activation's dtype, work under
autograd (training backpropagates through them), and are always removed on exit, also when the
body raises. ``beta`` is a float (0 leaves the model bit-identical) or a (batch,) tensor giving
each row its own β (training runs β = +1 and β = −1 in one batch this way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks import HookHandle, _module_device, is_prefill, rewrite_output
from ..sites import Site, SiteError
from .interventions import ScalingIntervention


class ScalingHandle(HookHandle):
    """Installed intervention hooks; ``beta`` may be changed between calls."""

    def __init__(
        self,
        model: nn.Module,
        intervention: ScalingIntervention,
        beta: float | Tensor = 1.0,
        *,
        trace: bool = False,
    ) -> None:
        self.model = model
        self.intervention = intervention
        self.beta = beta
        self.trace_enabled = trace
        self.traces: dict[str, Tensor] = {}
        self._prefill = True
        self._handles: list[Any] = []
        self._install()

    # ---- life cycle -------------------------------------------------------------------------
    def _install(self) -> None:
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)
            )
            fallback = next(self.model.parameters()).device
            modules = [self._get_module(s) for s in self.intervention.sites]
            self.intervention.to(_module_device(modules[0], fallback))
            for index, (site, module) in enumerate(zip(self.intervention.sites, modules)):
                if site.io == "input":
                    raise SiteError(
                        f"site {site.name!r} steers a module input; activation scaling acts on "
                        "module outputs (attn, mlp, residual or a 're:' regex site)"
                    )
                self._handles.append(module.register_forward_hook(self._make_hook(index, site)))
        except BaseException:
            self.remove()
            raise
        self._activate()

    # ---- hooks -----------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.in_context():
            return
        prefill = is_prefill(kwargs)
        self._prefill = prefill
        if prefill:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            if isinstance(ids, Tensor) and ids.ndim >= 2:
                self.intervention.check_length(int(ids.shape[1]))
            if self.trace_enabled:
                self.traces = {}

    def _columns(self, n_tokens: int, device: torch.device) -> Tensor | None:
        iv = self.intervention
        if not iv.positional:
            return None
        if not self._prefill:  # generated tokens: no parameter for them
            return torch.full((n_tokens,), -1, dtype=torch.long, device=device)
        iv.check_length(n_tokens)
        p = iv.n_positions  # type: ignore[attr-defined]
        return torch.arange(p - n_tokens, p, device=device)

    def _beta(self, batch: int, device: torch.device) -> Tensor | None:
        beta = self.beta
        if isinstance(beta, Tensor):
            b = beta.to(device=device, dtype=torch.float32).reshape(-1)
            if b.numel() == 1:
                return b.expand(batch)
            if b.numel() != batch:
                raise ValueError(f"beta has {b.numel()} values for a batch of {batch} rows")
            return b
        if float(beta) == 0.0:
            return None
        return torch.full((batch,), float(beta), device=device)

    def _apply(self, index: int, site: Site, x: Tensor) -> Tensor | None:
        if x.ndim != 3:
            raise TypeError(
                f"site {site.name!r}: expected a (batch, tokens, d) activation, got shape "
                f"{tuple(x.shape)}"
            )
        t = x.float()
        columns = self._columns(t.shape[1], t.device)
        if self.trace_enabled:
            self.traces[site.name] = (
                self.intervention.scalars(index, t, columns).detach().float().cpu()
            )
        beta = self._beta(t.shape[0], t.device)
        if beta is None:
            return None
        return self.intervention.transform(index, t, beta, columns).to(x.dtype)

    def _make_hook(self, index: int, site: Site):
        tuple_index = site.tuple_index

        what = f"site {site.name!r}"

        def intervene(x: Tensor) -> Tensor | None:
            return self._apply(index, site, x)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self.in_context():
                return output
            return rewrite_output(output, tuple_index, intervene, what)

        return hook

    # ---- traces ----------------------------------------------------------------------------
    def scalar_map(self, sites: Sequence[Site] | None = None) -> Tensor:
        """(batch, sites, tokens): the traced α (or ‖v‖) of the last prefill, per site."""
        if not self.trace_enabled:
            raise RuntimeError("this handle was created without trace=True")
        names = [s.name for s in (sites or self.intervention.sites)]
        missing = [n for n in names if n not in self.traces]
        if missing:
            raise RuntimeError(f"nothing traced for {missing[:3]}: run the model inside the context")
        return torch.stack([self.traces[n] for n in names], dim=1)
