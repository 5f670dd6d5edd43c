"""E2E-DSAS gates: per-layer gates learned end to end together with the steering maps.

``g_l(z) = sigmoid(a_l·z + c_l)`` (sigmoid variant, default) or ``relu(a_l·z + c_l)`` (ReLU
variant), with ``a_l`` (d,) and ``c_l`` (scalar) trainable ``nn.Parameter``s, saved and loaded
with the recipe. Their kind's fitter (``E2EFitter``) starts them from the offline DSAS fit and
trains them with the maps through the model in the loop LinEAS uses (``steerwise.training``),
with the loss ``W2(steered S, T) + γ·mean_l ‖T̃_l(z_c) − z_c‖`` so they learn to open on source
text and stay shut on control text.

Initialisation [choice]: from the offline DSAS gate of the layer (default) — the sigmoid variant
takes its folded ``(ŵ, b̂)`` as is; the ReLU variant takes the tangent of the sigmoid at 0,
``relu(ŵ·z/4 + b̂/4 + 1/2)``, which matches the DSAS gate near its decision boundary and is 0
where the DSAS logit is below −2 — or from zero (``a = 0``, ``c = 0`` / ``1/2``: 0.5
everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..kernel import LinearGate
from ..options import Options, non_negative_float, option
from .base import Gate, GateFit, GateFitter, StepContext, register_gate, register_gate_fitter

ACTIVATIONS = ("sigmoid", "relu")
INITS = ("dsas", "zero")


@dataclass
class E2EOptions(Options):
    """Options of E2E-DSAS gates (the training loop's own are ``FitOptions.lineas``)."""

    activation: Literal["sigmoid", "relu"] = option(
        "sigmoid", "E2E-DSAS gate non-linearity", flag="--e2e-gate", choices=ACTIVATIONS)
    init: Literal["dsas", "zero"] = option(
        "dsas", "E2E-DSAS gate initialisation: the offline DSAS fit, or zeros",
        flag="--e2e-init", choices=INITS)
    gamma: float = option(1.0, "E2E-DSAS control-term weight γ", type=non_negative_float)

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"E2E gate activation (--e2e-gate) must be 'sigmoid' or 'relu' "
                             f"(got {self.activation!r})")
        if self.init not in INITS:
            raise ValueError(f"E2E gate init (--e2e-init) must be 'dsas' or 'zero' "
                             f"(got {self.init!r})")
        if self.gamma < 0:
            raise ValueError(f"E2E gamma must be non-negative (got {self.gamma})")


@register_gate
class E2EGate(Gate):
    kind = "e2e"

    def __init__(
        self, weight: Tensor, bias: Tensor, activation: Literal["sigmoid", "relu"] = "sigmoid"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown E2E gate activation {activation!r}; choose from {ACTIVATIONS}")
        self.activation = activation
        self.weight = nn.Parameter(weight.detach().float().reshape(-1).clone())
        self.bias = nn.Parameter(bias.detach().float().reshape(()).clone())

    def forward(self, t: Tensor, ctx: StepContext) -> Tensor:
        z = t @ self.weight + self.bias
        return torch.sigmoid(z) if self.activation == "sigmoid" else torch.relu(z)

    def linear_form(self) -> LinearGate:
        return LinearGate(self.activation, self.weight, self.bias)

    def config(self) -> dict[str, Any]:
        return {"activation": self.activation}

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> E2EGate:
        return cls(torch.zeros(dim), torch.zeros(()), config.get("activation", "sigmoid"))

    @classmethod
    def init(
        cls, dim: int, activation: str = "sigmoid", dsas_weight: Tensor | None = None,
        dsas_bias: Tensor | float | None = None,
    ) -> E2EGate:
        """A gate started from a DSAS gate's folded ``(ŵ, b̂)``, or from zero when omitted."""
        if dsas_weight is None:
            bias = 0.5 if activation == "relu" else 0.0
            return cls(torch.zeros(dim), torch.tensor(bias), activation)  # type: ignore[arg-type]
        w = dsas_weight.detach().float()
        b = torch.as_tensor(dsas_bias, dtype=torch.float32)
        if activation == "relu":
            return cls(w / 4.0, b / 4.0 + 0.5, "relu")
        return cls(w, b, activation)  # type: ignore[arg-type]


@register_gate_fitter
class E2EFitter(GateFitter):
    """E2E-DSAS: gates started from the offline DSAS fit (``FitOptions.dsas``) or zero, then
    trained end to end with the maps (``train``: the loop of ``steerwise.training``)."""

    kind = "e2e"
    Options = E2EOptions
    options_field = "e2e"
    trains_end_to_end = True

    def cv_folds(self, opts) -> int:
        return opts.dsas.cv_folds

    def poolings(self, opts) -> set[str]:
        return {"tokens"} if opts.dsas.needs_tokens else set()

    def fit(self, sites, acts_s, acts_c, opts) -> GateFit:
        from .dsas import fit_dsas_gates

        e2e = self.options(opts)
        e2e.check()
        dsas, diags = fit_dsas_gates(sites, acts_s, acts_c, opts.dsas)
        from_dsas = e2e.init == "dsas"
        gates: dict[str, Gate] = {
            n: E2EGate.init(int(g.weight.numel()), e2e.activation,
                            g.weight if from_dsas else None, g.bias if from_dsas else None)
            for n, g in dsas.items()
        }
        return GateFit(gates, {n: 1.0 for n in gates}, diags)

    def train(self, ctx, entries) -> dict[str, Any]:
        """The gates (and LinEAS maps) trained through the model, with the control term."""
        from ..training import train_end_to_end

        opts = ctx.options
        return train_end_to_end(ctx.model, ctx.tokenizer, entries, ctx.source,
                                ctx.target_means(), ctx.control, opts.lineas,
                                gamma=self.options(opts).gamma, max_length=opts.max_length,
                                progress=ctx.progress, sink_free=opts.sink_free)

    def finish(self, entries, fitted, acts_s, acts_c, ctx):
        with torch.no_grad():
            for e in entries:
                if isinstance(e.gate, E2EGate) and acts_c is not None:
                    ctx = StepContext()
                    e.diagnostics["gate_mean_source"] = float(
                        e.gate(acts_s[e.site.name]["mean"], ctx).mean())
                    e.diagnostics["gate_mean_control"] = float(
                        e.gate(acts_c[e.site.name]["mean"], ctx).mean())
        return entries
