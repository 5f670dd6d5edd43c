"""The steering arithmetic, once, for every backend (HF hooks, the server, vLLM, diffusion).

A fitted steering is compiled, per site, into a ``SiteStack``: the tensors of R recipes side by
side. For activations ``x`` of any leading shape (last dim d) and, per token, a strength ``λ`` and
a recipe index ``r``, ``steer`` computes

    x' = x + λ · a[r] · h[r](x) · δ[r](x)

with ``a`` the layer scales, ``h`` the gates and ``δ(x) = T(x; 1) − x`` the maps, all in one
canonical form:

- map: ``δ(x) = m(x) ⊙ (A ⊙ x + b)`` — additive maps (CAA, ITI, Mean-AcT) have ``A = 0``, affine
  maps (Linear-AcT, LinEAS) ``A = ω − 1``; ``m(x) = 1[lo ≤ x ≤ hi]`` per dimension where a map
  restricts itself to the source support (AcT), else 1;
- gate: ``h(x) = f(w·x + c)`` with ``f`` ∈ {1 (ungated or a constant DSAS layer), sigmoid (DSAS,
  DSAS-adaptive, E2E-sigmoid), relu (E2E-ReLU)}, or an *external* per-token value computed by a
  stateful gate outside the kernel (CAST's per-row decision, diffusion's runtime gates).

``steer`` has no Python control flow on tensor values: the choices it makes (are there affine
maps? supports? several gate kinds? one recipe or several?) are static attributes of the stack,
fixed when it is built. So it runs under ``torch.compile(fullgraph=True)``, and a token with
strength 0 (or "no recipe": strength 0) is plain arithmetic. When the strength is a tensor, tokens
whose coefficient is 0 get ``x`` back exactly (``torch.where``), so strength 0 is bit-identical
to the unsteered activation for every row of a mixed batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# gate functions f of the canonical form, by code
GATE_ONE, GATE_SIGMOID, GATE_RELU, GATE_EXTERNAL = 0, 1, 2, 3
GATE_CODES = {"one": GATE_ONE, "sigmoid": GATE_SIGMOID, "relu": GATE_RELU,
              "external": GATE_EXTERNAL}


@dataclass
class AffineMap:
    """``δ(x) = m(x) ⊙ (a ⊙ x + b)``; ``a is None`` for additive maps, ``lo``/``hi`` (per-dimension
    support bounds) ``None`` when the map is not restricted to a support."""

    b: Tensor
    a: Tensor | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None


@dataclass
class LinearGate:
    """``h(x) = f(w·x + c)`` with ``f`` one of ``"one"``, ``"sigmoid"``, ``"relu"``, or
    ``"external"`` (the value comes from outside the kernel)."""

    kind: str
    w: Tensor | None = None
    c: Tensor | None = None


@dataclass
class SiteStack:
    """The tensors of R recipes at one site (float32, one device), plus static flags.

    Shapes: ``b``, ``a``, ``lo``, ``hi``, ``w``: (R, d); ``c``, ``scale``: (R,);
    ``mix``: (R, 4), one-hot of each recipe's gate code. ``a``/``lo``/``hi`` are ``None`` when no
    recipe needs them; ``kinds`` is the set of gate codes present.
    """

    b: Tensor
    w: Tensor
    c: Tensor
    scale: Tensor
    mix: Tensor
    kinds: frozenset[int]
    a: Tensor | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None

    def __post_init__(self) -> None:
        # static plan, read by ``steer`` (Python values, never tensor values: compile-friendly)
        self.single = int(self.b.shape[0]) == 1
        self.linear = bool(self.kinds & {GATE_SIGMOID, GATE_RELU})
        self.code = min(self.kinds) if len(self.kinds) == 1 else -1
        self.scale0 = float(self.scale[0]) if self.single and not self.scale.requires_grad else None

        def first(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[0]

        self.row = (first(self.w), first(self.c), first(self.b), first(self.a), first(self.lo),
                    first(self.hi), first(self.scale))

    @property
    def n_recipes(self) -> int:
        return int(self.b.shape[0])

    @property
    def dim(self) -> int:
        return int(self.b.shape[1])

    @property
    def needs_external(self) -> bool:
        return GATE_EXTERNAL in self.kinds

    def to(self, device: torch.device | str) -> SiteStack:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return SiteStack(b=mv(self.b), w=mv(self.w), c=mv(self.c), scale=mv(self.scale),  # type: ignore[arg-type]
                         mix=mv(self.mix), kinds=self.kinds, a=mv(self.a), lo=mv(self.lo),  # type: ignore[arg-type]
                         hi=mv(self.hi))


def build_stack(
    parts: Sequence[tuple[AffineMap, LinearGate, float] | None], dim: int
) -> SiteStack:
    """Stack R recipes' (map, gate, layer scale) at one site; ``None`` = the recipe does not
    steer this site (a zero row: scale 0, map 0)."""
    if not parts:
        raise ValueError("a site stack needs at least one recipe")
    zeros = torch.zeros(dim)
    bs, as_, los, his, ws, cs, scales, codes = [], [], [], [], [], [], [], []
    for p in parts:
        if p is None:
            p = (AffineMap(zeros), LinearGate("one"), 0.0)
        m, g, scale = p
        for name, t in (("b", m.b), ("a", m.a), ("lo", m.lo), ("hi", m.hi), ("w", g.w)):
            if t is not None and t.shape[-1] != dim:
                raise ValueError(f"site stack: {name} has width {t.shape[-1]}, expected {dim}")
        if g.kind not in GATE_CODES:
            raise ValueError(f"unknown gate form {g.kind!r}; known: {', '.join(GATE_CODES)}")
        bs.append(m.b.float().reshape(dim))
        as_.append(None if m.a is None else m.a.float().reshape(dim))
        los.append(None if m.lo is None else m.lo.float().reshape(dim))
        his.append(None if m.hi is None else m.hi.float().reshape(dim))
        ws.append(zeros if g.w is None else g.w.float().reshape(dim))
        cs.append(torch.zeros(()) if g.c is None else torch.as_tensor(g.c).float().reshape(()))
        scales.append(torch.as_tensor(float(scale)) if not isinstance(scale, Tensor)
                      else scale.float().reshape(()))
        codes.append(GATE_CODES[g.kind])
    fill_a = [zeros if t is None else t for t in as_]
    inf = torch.full((dim,), torch.inf)
    fill_lo = [-inf if t is None else t for t in los]
    fill_hi = [inf if t is None else t for t in his]
    code = torch.tensor(codes)
    return SiteStack(
        b=torch.stack(bs),
        w=torch.stack(ws),
        c=torch.stack(cs),
        scale=torch.stack(scales),
        mix=torch.nn.functional.one_hot(code, 4).float(),
        kinds=frozenset(codes),
        a=None if all(t is None for t in as_) else torch.stack(fill_a),
        lo=None if all(t is None for t in los) else torch.stack(fill_lo),
        hi=None if all(t is None for t in his) else torch.stack(fill_hi),
    )


def _gate_fn(code: int, z: Tensor | None, external: Tensor | None, lead: torch.Size,
             like: Tensor) -> Tensor:
    if code == GATE_SIGMOID:
        return torch.sigmoid(z)  # type: ignore[arg-type]
    if code == GATE_RELU:
        return torch.relu(z)  # type: ignore[arg-type]
    if code == GATE_EXTERNAL:
        if external is None:
            raise ValueError("this site stack has an external gate: pass its per-token values")
        return external.to(like.dtype).expand(lead)
    return torch.ones(lead, dtype=like.dtype, device=like.device)


def steer(
    x: Tensor,
    stack: SiteStack,
    strength: Tensor | float,
    index: Tensor | None = None,
    external: Tensor | None = None,
    *,
    with_gate: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(x', g)``: the steered activation (dtype of ``x``) and the per-token gate ``a[r]·h[r](x)``
    (``None`` when ``with_gate=False``).

    ``x``: (..., d). ``strength``: a float for every token, or a tensor broadcastable to
    ``x.shape[:-1]``. ``index``: the recipe of each token, a long tensor broadcastable to
    ``x.shape[:-1]`` (``None`` only for a stack of one recipe). ``external``: per-token gate
    values (broadcastable to ``x.shape[:-1]``) for stacks with an external gate. Computed in
    float32. A float ``strength`` skips the exact-zero selection (a caller with strength 0 has
    nothing to compute); with a tensor strength, tokens whose coefficient is 0 keep ``x`` exactly.
    """
    t = x.float()
    if stack.single and stack.scale0 is not None and not isinstance(strength, Tensor):
        return _steer_one(t, stack, float(strength), external, with_gate, x.dtype)
    coef, delta, g = steer_terms(t, stack, strength, index, external)
    if isinstance(strength, Tensor):
        out = torch.where(coef != 0, torch.addcmul(t, coef, delta), t)
    else:
        out = torch.addcmul(t, coef, delta)
    return out.to(x.dtype), g if with_gate else None


def _steer_one(t: Tensor, stack: SiteStack, strength: float, external: Tensor | None,
               with_gate: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """One recipe, one strength for every token: the hot path of the HF hooks, fewest kernels."""
    w, c, b, a, lo, hi, _ = stack.row
    k = strength * stack.scale0  # type: ignore[operator]
    delta = b if a is None else torch.addcmul(b, a, t)  # type: ignore[arg-type]
    if lo is not None and hi is not None:
        delta = delta * ((t >= lo) & (t <= hi)).to(t.dtype)
    code = stack.code
    if code == GATE_ONE:
        out = torch.add(t, delta, alpha=k)
        g = torch.full(t.shape[:-1], stack.scale0, device=t.device) if with_gate else None  # type: ignore[arg-type]
        return out.to(dtype), g
    if code == GATE_EXTERNAL:
        h = _gate_fn(code, None, external, t.shape[:-1], t)
    else:
        z = torch.matmul(t, w) + c  # type: ignore[arg-type]
        h = torch.sigmoid(z) if code == GATE_SIGMOID else torch.relu(z)
    out = torch.addcmul(t, h.unsqueeze(-1), delta, value=k)
    return out.to(dtype), (h * stack.scale0 if with_gate else None)


def steer_terms(
    t: Tensor,
    stack: SiteStack,
    strength: Tensor | float,
    index: Tensor | None = None,
    external: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(coef, delta, g)`` with ``x' = x + coef · delta`` for float32 activations ``t`` (..., d):
    ``coef = λ · a[r] · h[r](t)`` with shape (..., 1), ``delta = δ[r](t)`` (broadcastable to
    ``t``), ``g = a[r] · h[r](t)`` (...,). For backends that add the steering to another tensor
    than the one the gate reads (vLLM's decoder layers return ``(hidden, residual)``: the gate
    reads their sum, the update goes to ``hidden``); keep ``coef == 0`` tokens exact with
    ``torch.where(coef != 0, ...)`` as ``steer`` does."""
    lead = t.shape[:-1]
    if stack.single:
        w, c, b, a, lo, hi, scale = stack.row
        z = torch.matmul(t, w) + c if stack.linear else None  # type: ignore[arg-type]
        g = _gate_fn(stack.code, z, external, lead, t) * scale
    else:
        if index is None:
            raise ValueError(f"a stack of {stack.n_recipes} recipes needs a per-token recipe index")
        idx = index.expand(lead)
        z = None
        if stack.linear:
            z_all = torch.matmul(t, stack.w.T) + stack.c  # (..., R)
            z = z_all.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        if stack.code >= 0:
            h = _gate_fn(stack.code, z, external, lead, t)
        else:
            mix = stack.mix[idx]  # (..., 4) one-hot of each token's gate form
            kinds = sorted(stack.kinds)
            h = mix[..., kinds[0]] * _gate_fn(kinds[0], z, external, lead, t)
            for k in kinds[1:]:
                h = h + mix[..., k] * _gate_fn(k, z, external, lead, t)
        g = h * stack.scale[idx]
        b = stack.b[idx]
        a = None if stack.a is None else stack.a[idx]
        lo = None if stack.lo is None else stack.lo[idx]
        hi = None if stack.hi is None else stack.hi[idx]
    delta = b if a is None else torch.addcmul(b, a, t)
    if lo is not None and hi is not None:
        delta = delta * ((t >= lo) & (t <= hi)).to(t.dtype)
    if isinstance(strength, Tensor):
        coef = (g * strength.to(t.dtype)).unsqueeze(-1)
    else:
        coef = (g * float(strength)).unsqueeze(-1)
    return coef, delta, g
