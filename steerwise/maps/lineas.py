"""LinEAS: per-layer affine maps trained jointly, end to end through the (frozen) model.

Each steered site l gets ``T_l(t) = ω_l⊙t + β_l`` (init ω = 1, β = 0), i.e. in the engine's gated
form ``delta(t) = ω_l⊙t + β_l − t``. All layers are trained together: a batch of source texts
runs through the model *with the steering installed* (so a layer sees the effect of the layers
before it and gradients flow through the model), the steered activations are mean-pooled per
text, and the loss is the mean over sites of the per-dimension 1-D Wasserstein-2 distance to
the (unsteered) target activations — sort both samples per dimension, then MSE. Adam
(lr 1e-3, betas (0.9, 0.9)), cosine decay to 1e-6, 1,000 steps, batch 4 by default.

Sparsity (optional): after every Adam step a proximal step pulls the maps towards identity —
soft-thresholding of (ω − 1) and β (L1, ``l1``) and/or group soft-thresholding of each layer's
whole (ω − 1, β) (``group_l1``, sparse-group lasso with the L1 part). How many dimensions and
layers stay active is reported.

The same loop trains E2E-DSAS gates (``steerwise.gates.e2e``): every trainable parameter of the
entries' maps and gates is optimised, and with learned gates a control term
``γ · mean_l ‖T̃_l(z_c) − z_c‖₂`` over mean-pooled control texts keeps the gates shut on C. A
fixed (offline) map with E2E gates trains only the gates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..activations import (
    check_statistic_lengths, ensure_pad_token, forward_kwargs, max_model_length, pad_batch, pool,
    statistics_mask, tokenize,
)
from ..gates.base import NoGate
from ..kernel import AffineMap
from .base import SteeringMap, register_map


@register_map
class LinEASMap(SteeringMap):
    """``delta(t) = ω⊙t + β − t`` with trainable ``omega`` and ``beta`` (identity at init)."""

    method = "lineas"
    end_to_end = True  # fitted by steerwise.fit through the model, not from pooled activations

    def __init__(self, omega: Tensor, beta: Tensor) -> None:
        super().__init__()
        self.omega = nn.Parameter(omega.detach().float().reshape(-1).clone())
        self.beta = nn.Parameter(beta.detach().float().reshape(-1).clone())

    @classmethod
    def identity(cls, dim: int) -> LinEASMap:
        return cls(torch.ones(dim), torch.zeros(dim))

    def affine(self) -> AffineMap:
        return AffineMap(b=self.beta, a=self.omega - 1.0)

    def active_dims(self) -> int:
        """Dimensions whose map is not the identity (ω ≠ 1 or β ≠ 0)."""
        with torch.no_grad():
            return int(((self.omega != 1.0) | (self.beta != 0.0)).sum())

    @classmethod
    def empty(cls, dim: int, config: dict[str, Any]) -> LinEASMap:
        return cls.identity(dim)

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, **_: Any) -> LinEASMap:
        raise TypeError(
            "LinEAS is trained end to end through the model: use steerwise.fit(model, tok, "
            "source, control, target, method='lineas') rather than LinEASMap.fit"
        )


@dataclass
class LinEASOptions:
    """End-to-end training options (LinEAS maps and E2E-DSAS gates).

    ``e2e_gate``: ``"sigmoid"`` or ``"relu"`` gate activation; ``e2e_init``: ``"dsas"`` (start
    from the offline DSAS gates) or ``"zero"``; ``gamma``: weight of the control term.
    """

    steps: int = 1000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.9)
    final_lr: float = 1e-6
    batch_size: int = 4
    l1: float = 0.0
    group_l1: float = 0.0
    gamma: float = 1.0
    e2e_gate: str = "sigmoid"
    e2e_init: str = "dsas"
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.lr <= 0 or self.final_lr < 0:
            raise ValueError("lr must be positive and final_lr non-negative")
        if min(self.l1, self.group_l1, self.gamma) < 0:
            raise ValueError("l1, group_l1 and gamma must be non-negative")
        if self.e2e_gate not in ("sigmoid", "relu"):
            raise ValueError(f"e2e_gate must be 'sigmoid' or 'relu' (got {self.e2e_gate!r})")
        if self.e2e_init not in ("dsas", "zero"):
            raise ValueError(f"e2e_init must be 'dsas' or 'zero' (got {self.e2e_init!r})")


def w2_per_dim(x: Tensor, y: Tensor) -> Tensor:
    """Mean over dimensions of the 1-D Wasserstein-2 (squared) distance of equal-size samples.

    ``x``, ``y``: (n, d). Sorting each column pairs the quantiles; the MSE is W2².
    """
    if x.shape != y.shape:
        raise ValueError(f"W2 needs equal sample counts and widths: {tuple(x.shape)} vs {tuple(y.shape)}")
    return (torch.sort(x, dim=0).values - torch.sort(y, dim=0).values).pow(2).mean()


class _Stop(Exception):
    """Raised once the deepest steered site is captured: the rest of the model is not needed."""


class _Capture:
    """Hooks that pool each site's activation before (optional) and after its steering.

    Installed *after* the SteeringHandle, the "after" hooks see the steered tensor; the "before"
    hooks are prepended so they see it untouched.
    """

    def __init__(self, model: nn.Module, entries: Sequence[Any], before: bool,
                 sink_free: bool = True) -> None:
        self.mask: Tensor | None = None
        self.sink_free = sink_free
        self.after: dict[str, Tensor] = {}
        self.before: dict[str, Tensor] = {}
        self.names = [e.site.name for e in entries]
        self._handles = []
        try:
            for e in entries:
                module = model.get_submodule(e.site.module)
                self._handles.append(self._register(module, e.site, self.after, prepend=False))
                if before:
                    self._handles.append(self._register(module, e.site, self.before, prepend=True))
        except BaseException:
            self.remove()
            raise

    def _register(self, module: nn.Module, site: Any, store: dict[str, Tensor], prepend: bool):
        def keep(x: Tensor) -> None:
            if site.channel_dim not in (-1, x.ndim - 1):
                x = x.movedim(site.channel_dim, -1).flatten(1, -2)
            store[site.name] = pool(x, self.mask, "mean")  # type: ignore[arg-type]
            if not prepend and len(self.after) == len(self.names):
                raise _Stop

        if site.io == "input":
            return module.register_forward_pre_hook(lambda m, args: keep(args[0]), prepend=prepend)

        def hook(m, args, output):
            x = output if isinstance(output, Tensor) else output[site.tuple_index or 0]
            keep(x)

        return module.register_forward_hook(hook, prepend=prepend)

    def run(self, model: nn.Module, ids: Tensor, mask: Tensor) -> None:
        self.mask = statistics_mask(mask, self.sink_free)  # pooled without the attention sink
        self.after.clear()
        self.before.clear()
        try:
            model(**forward_kwargs(model, ids, mask), use_cache=False)
        except _Stop:
            pass
        missing = [n for n in self.names if n not in self.after]
        if missing:
            raise RuntimeError(f"sites never ran during the forward pass: {', '.join(missing)}")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _prox(maps: Sequence[LinEASMap], lr: float, l1: float, group_l1: float) -> None:
    """Proximal steps towards identity: soft-threshold (ω−1, β), then per-layer group shrink."""
    with torch.no_grad():
        for m in maps:
            u, b = m.omega - 1.0, m.beta.clone()
            if l1 > 0:
                u = torch.sign(u) * torch.clamp(u.abs() - lr * l1, min=0.0)
                b = torch.sign(b) * torch.clamp(b.abs() - lr * l1, min=0.0)
            if group_l1 > 0:
                norm = torch.sqrt(u.pow(2).sum() + b.pow(2).sum())
                tau = lr * group_l1 * math.sqrt(u.numel() + b.numel())
                factor = torch.clamp(1.0 - tau / norm, min=0.0) if norm > 0 else norm * 0
                u, b = u * factor, b * factor
            m.omega.copy_(1.0 + u)
            m.beta.copy_(b)


def train_end_to_end(
    model: nn.Module,
    tokenizer,
    entries: Sequence[Any],
    source: Sequence[str],
    target_acts: dict[str, Tensor],
    control: Sequence[str] | None = None,
    options: LinEASOptions | None = None,
    *,
    max_length: int | None = None,
    progress: bool = True,
    sink_free: bool = True,
) -> dict[str, Any]:
    """Train every parameter of the entries' maps and gates; the model stays frozen.

    ``target_acts[site.name]`` holds the mean-pooled (unsteered) target activations. Entries
    whose gate has parameters (E2E) are trained with their gate, the others without a gate
    (a LinEAS map is learned ungated; offline gates are applied afterwards). Returns a summary
    (losses on the full sets before/after, per-step history, sparsity, seconds). ``sink_free``:
    the pooled means of the loss leave each text's first real token (the attention sink) out, as
    the fit's statistics do.
    """
    from ..hooks import SiteSteering, SteeringHandle

    opts = options or LinEASOptions()
    opts.check()
    started = time.perf_counter()
    learn_gates = any(True for e in entries for _ in e.gate.parameters())
    train_entries = [
        SiteSteering(e.site, e.map, e.gate if learn_gates else NoGate(), 1.0) for e in entries
    ]
    params = [p for e in train_entries for p in (*e.map.parameters(), *e.gate.parameters())]
    if not params:
        raise ValueError("nothing to train: no LinEAS map and no E2E gate among the entries")
    for e in entries:
        if e.site.name not in target_acts:
            raise ValueError(f"no target activations for site {e.site.name!r}")
    use_control = learn_gates and opts.gamma > 0 and control is not None and len(control) > 0

    ensure_pad_token(tokenizer)
    limit = max_length or max_model_length(model, tokenizer)
    rows_s = tokenize(tokenizer, list(source), limit)
    rows_c = tokenize(tokenizer, list(control), limit) if use_control else []
    check_statistic_lengths(rows_s, "source", sink_free)
    check_statistic_lengths(rows_c, "control", sink_free)
    device = next(model.parameters()).device
    targets = {n: t.to(device).float() for n, t in target_acts.items()}
    n_t = min(len(t) for t in targets.values())
    batch = max(1, min(opts.batch_size, len(rows_s), n_t))
    gen = torch.Generator().manual_seed(opts.seed)
    lineas_maps = [e.map for e in train_entries if isinstance(e.map, LinEASMap)]
    for p in params:
        p.requires_grad_(True)

    def batch_of(rows: list[list[int]], idx: Tensor) -> tuple[Tensor, Tensor]:
        return pad_batch([rows[int(i)] for i in idx], tokenizer.pad_token_id, device)

    def full_w2(capture: _Capture) -> float:
        """W2 loss of all source texts against equally many target rows (fixed subsample)."""
        g = torch.Generator().manual_seed(opts.seed + 1)
        pooled: dict[str, list[Tensor]] = {n: [] for n in capture.names}
        with torch.no_grad():
            for i in range(0, len(rows_s), 16):
                idx = torch.arange(i, min(i + 16, len(rows_s)))
                capture.run(model, *batch_of(rows_s, idx))
                for n in capture.names:
                    pooled[n].append(capture.after[n])
        k = min(len(rows_s), n_t)
        total = 0.0
        for n in capture.names:
            s = torch.cat(pooled[n])
            s = s[torch.randperm(len(s), generator=g)[:k].to(device)]
            t = targets[n][torch.randperm(len(targets[n]), generator=g)[:k].to(device)]
            total += float(w2_per_dim(s, t))
        return total / len(capture.names)

    saved_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False)
    model.eval()
    history: list[float] = []
    try:
        with SteeringHandle(model, train_entries, 1.0):
            capture = _Capture(model, train_entries, before=use_control, sink_free=sink_free)
            try:
                loss_initial = full_w2(capture)
                optimizer = torch.optim.Adam(params, lr=opts.lr, betas=tuple(opts.betas))
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                    optimizer, T_max=opts.steps, eta_min=opts.final_lr
                )
                bar = tqdm(range(opts.steps), desc="lineas" if not learn_gates else "e2e-dsas",
                           disable=not progress, leave=False)
                for step in bar:
                    optimizer.zero_grad(set_to_none=True)
                    idx = torch.randperm(len(rows_s), generator=gen)[:batch]
                    capture.run(model, *batch_of(rows_s, idx))
                    w2 = torch.stack([
                        w2_per_dim(
                            capture.after[n],
                            targets[n][torch.randperm(len(targets[n]), generator=gen)[:batch].to(device)],
                        )
                        for n in capture.names
                    ]).mean()
                    loss = w2
                    ctrl = None
                    if use_control:
                        cidx = torch.randperm(len(rows_c), generator=gen)[:batch]
                        capture.run(model, *batch_of(rows_c, cidx))
                        ctrl = torch.stack([
                            (capture.after[n] - capture.before[n]).norm(dim=-1).mean()
                            for n in capture.names
                        ]).mean()
                        loss = loss + opts.gamma * ctrl
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"the loss became {float(loss)} at step {step}: lower the learning rate"
                        )
                    loss.backward()
                    lr_now = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    if lineas_maps and (opts.l1 > 0 or opts.group_l1 > 0):
                        _prox(lineas_maps, lr_now, opts.l1, opts.group_l1)
                    schedule.step()
                    history.append(float(loss.detach()))
                    if step % 10 == 0 or step == opts.steps - 1:
                        post = {"loss": f"{history[-1]:.4g}"}
                        if ctrl is not None:
                            post["ctrl"] = f"{float(ctrl.detach()):.3g}"
                        bar.set_postfix(post)
                loss_final = full_w2(capture)
            finally:
                capture.remove()
    finally:
        for p, g in zip(model.parameters(), saved_grad):
            p.requires_grad_(g)
        model.train(was_training)
        for p in params:
            p.grad = None

    info: dict[str, Any] = {
        "trained": "maps+gates" if learn_gates and lineas_maps else ("gates" if learn_gates else "maps"),
        "steps": opts.steps,
        "batch_size": batch,
        "w2_initial": loss_initial,
        "w2_final": loss_final,
        "loss_first_10": sum(history[:10]) / len(history[:10]),
        "loss_last_10": sum(history[-10:]) / len(history[-10:]),
        "seconds": time.perf_counter() - started,
        "options": opts.to_json(),
    }
    if lineas_maps:
        dims = [m.active_dims() for m in lineas_maps]
        info["active_dims"] = int(sum(dims))
        info["total_dims"] = int(sum(m.omega.numel() for m in lineas_maps))
        info["active_layers"] = int(sum(1 for d in dims if d > 0))
        info["total_layers"] = len(dims)
    return info
