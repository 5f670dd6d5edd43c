"""The three learned interventions of activation scaling (Stoehr et al., 2024).

Each intervention acts on ``S`` hook sites (e.g. the attention and MLP outputs of every layer)
and rewrites the activation ``h`` (a d-vector) of every token:

``ActivScalar``  ``h̃ = h · (1 + β·α[s, p])`` — one scalar per site ``s`` and prompt position ``p``;
``SteerVec``     ``h̃ = h + β·v[s, p]``       — one d-vector per site and position;
``DynScalar``    ``h̃ = h · (1 + β·α)`` with ``α = w[s]·h (+ b[s])`` — one d-vector (and bias) per
                 site, shared by all positions, so it applies to prompts of any length.

All parameters start at 0, where every intervention is the identity. β is the direction knob:
+1 is trained to flip the prediction to the wrong token, −1 to restore/strengthen the correct one;
any real β can be used at inference.

Positions of ``ActivScalar``/``SteerVec`` are aligned at the *end* of the prompt: with
``n_positions = P``, parameter column ``P − 1`` acts on the last prompt token (the one whose
next-token prediction is steered), ``P − 2`` on the one before, and so on. For the fixed-length
prompts of the paper this is the ordinary position index; shorter (left-padded) prompts use the
last columns; longer ones are an error. Tokens generated after the prompt are left alone (there
is no parameter for them). ``DynScalar`` acts on every token, prompt or generated.

An intervention computes in float32; the hook (``steerwise.scaling.hooks``) casts back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..sites import Site

INTERVENTIONS: dict[str, type[ScalingIntervention]] = {}


def register_intervention(cls: type[ScalingIntervention]) -> type[ScalingIntervention]:
    INTERVENTIONS[cls.method] = cls
    return cls


class PromptTooLongError(ValueError):
    """A prompt longer than the positions a positional intervention was trained for."""


class ScalingIntervention(nn.Module):
    """Base class: parameters for ``len(sites)`` sites of width ``dim``."""

    method: ClassVar[str] = ""
    positional: ClassVar[bool] = False

    def __init__(self, sites: Sequence[Site], dim: int) -> None:
        super().__init__()
        if not sites:
            raise ValueError("an intervention needs at least one site")
        self.sites = list(sites)
        self.dim = int(dim)

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    # ---- the map ---------------------------------------------------------------------------
    def transform(self, index: int, h: Tensor, beta: Tensor, columns: Tensor | None) -> Tensor:
        """The intervened activation for site ``index``.

        ``h``: float32 (batch, tokens, d); ``beta``: float32 (batch,) (one β per row);
        ``columns``: for positional interventions, the parameter column of every token (tokens,)
        with −1 for tokens without a parameter (generated ones); ``None`` otherwise.
        """
        raise NotImplementedError

    def scalars(self, index: int, h: Tensor, columns: Tensor | None) -> Tensor:
        """The per-token quantity a heat map shows: α (scalars) or ‖v‖ (vectors); (batch, tokens)."""
        raise NotImplementedError

    # ---- bookkeeping -----------------------------------------------------------------------
    def l1(self) -> Tensor:
        """‖θ‖₁ over every learned parameter (the minimality term before λ_M)."""
        return sum(p.abs().sum() for p in self.parameters())  # type: ignore[return-value]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def n_nonzero(self, tol: float = 0.0) -> int:
        """Parameters with ``|θ| > tol``."""
        return int(sum((p.detach().abs() > tol).sum().item() for p in self.parameters()))

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def empty(cls, sites: Sequence[Site], dim: int, config: dict[str, Any]) -> ScalingIntervention:
        return cls(sites, dim, **config)

    def check_length(self, n_tokens: int) -> None:
        """Raise ``PromptTooLongError`` if a prompt of ``n_tokens`` tokens cannot be steered."""


class _Positional(ScalingIntervention):
    positional = True

    def __init__(self, sites: Sequence[Site], dim: int, n_positions: int) -> None:
        super().__init__(sites, dim)
        if int(n_positions) < 1:
            raise ValueError(f"n_positions must be >= 1, got {n_positions}")
        self.n_positions = int(n_positions)

    def config(self) -> dict[str, Any]:
        return {"n_positions": self.n_positions}

    def check_length(self, n_tokens: int) -> None:
        if n_tokens > self.n_positions:
            raise PromptTooLongError(
                f"a prompt of {n_tokens} tokens is longer than the {self.n_positions} positions "
                f"this {self.method} intervention was trained for; positional interventions only "
                "apply to prompts of at most that length (use --method dynscalar for prompts of "
                "any length)"
            )

    @staticmethod
    def _gather(table: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``table`` (positions, ...) for ``columns`` (tokens,), zero where column < 0."""
        valid = columns >= 0
        rows = table[columns.clamp_min(0)]
        shape = (-1,) + (1,) * (rows.ndim - 1)
        return rows * valid.to(rows.dtype).view(shape), valid


@register_intervention
class ActivScalar(_Positional):
    """``h · (1 + β·α[s, p])``: one scalar per site and position."""

    method = "activscalar"

    def __init__(self, sites: Sequence[Site], dim: int, n_positions: int) -> None:
        super().__init__(sites, dim, n_positions)
        self.alpha = nn.Parameter(torch.zeros(len(self.sites), self.n_positions))

    def transform(self, index, h, beta, columns):
        assert columns is not None
        a, _ = self._gather(self.alpha[index], columns)  # (tokens,)
        factor = 1.0 + beta.view(-1, 1) * a.view(1, -1)  # (batch, tokens)
        return h * factor.unsqueeze(-1)

    def scalars(self, index, h, columns):
        assert columns is not None
        a, _ = self._gather(self.alpha[index], columns)
        return a.view(1, -1).expand(h.shape[0], -1)


@register_intervention
class SteerVec(_Positional):
    """``h + β·v[s, p]``: one vector per site and position."""

    method = "steervec"

    def __init__(self, sites: Sequence[Site], dim: int, n_positions: int) -> None:
        super().__init__(sites, dim, n_positions)
        self.vectors = nn.Parameter(torch.zeros(len(self.sites), self.n_positions, self.dim))

    def transform(self, index, h, beta, columns):
        assert columns is not None
        v, _ = self._gather(self.vectors[index], columns)  # (tokens, d)
        return h + beta.view(-1, 1, 1) * v.unsqueeze(0)

    def scalars(self, index, h, columns):
        assert columns is not None
        v, _ = self._gather(self.vectors[index], columns)
        return v.norm(dim=-1).view(1, -1).expand(h.shape[0], -1)


@register_intervention
class DynScalar(ScalingIntervention):
    """``h · (1 + β·α)`` with ``α = w[s]·h (+ b[s])``: a linear function of the activation."""

    method = "dynscalar"

    def __init__(self, sites: Sequence[Site], dim: int, bias: bool = True) -> None:
        super().__init__(sites, dim)
        self.bias = bool(bias)
        self.weight = nn.Parameter(torch.zeros(len(self.sites), self.dim))
        if self.bias:
            self.offset = nn.Parameter(torch.zeros(len(self.sites)))
        else:
            self.register_parameter("offset", None)

    def config(self) -> dict[str, Any]:
        return {"bias": self.bias}

    def _alpha(self, index: int, h: Tensor) -> Tensor:
        a = h @ self.weight[index]  # (batch, tokens)
        if self.offset is not None:
            a = a + self.offset[index]
        return a

    def transform(self, index, h, beta, columns):
        return h * (1.0 + beta.view(-1, 1) * self._alpha(index, h)).unsqueeze(-1)

    def scalars(self, index, h, columns):
        return self._alpha(index, h)


def make_intervention(
    method: str, sites: Sequence[Site], dim: int, *, n_positions: int | None = None,
    bias: bool = True,
) -> ScalingIntervention:
    """A zero-initialised intervention of ``method`` (see ``INTERVENTIONS``)."""
    if method not in INTERVENTIONS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(INTERVENTIONS)}")
    cls = INTERVENTIONS[method]
    if cls.positional:
        if n_positions is None:
            raise ValueError(f"{method} needs n_positions (the prompt length in tokens)")
        return cls(sites, dim, n_positions)  # type: ignore[call-arg]
    return cls(sites, dim, bias=bias)  # type: ignore[call-arg]
