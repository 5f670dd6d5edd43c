"""The end-to-end training loop shared by LinEAS maps and E2E-DSAS gates.

Steered source texts run through the frozen model; the loss is the mean over sites of the
per-dimension W2 distance between the steered, mean-pooled source activations and the target's
(``steerwise.maps.lineas.w2_per_dim``), plus, with learned gates, ``γ`` times the control term
``mean_l ‖T̃_l(z_c) − z_c‖₂`` on control texts. Adam with cosine decay; LinEAS maps take a
proximal step after each Adam step (``l1``, ``group_l1``). Who calls it: ``LinEASMap.train``
(maps learned ungated) and ``E2EFitter.train`` (gates learned, with the maps when they are
LinEAS), both through ``steerwise.fit``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .activations import (
    check_statistic_lengths,
    ensure_pad_token,
    forward_kwargs,
    max_model_length,
    pad_batch,
    pool,
    statistics_mask,
    tokenize,
)
from .gates.base import NoGate
from .maps.lineas import LinEASMap, LinEASOptions, prox_step, w2_per_dim
from .steering import SiteSteering


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


def train_end_to_end(
    model: nn.Module,
    tokenizer,
    entries: Sequence[Any],
    source: Sequence[str],
    target_acts: dict[str, Tensor],
    control: Sequence[str] | None = None,
    options: LinEASOptions | None = None,
    *,
    gamma: float = 0.0,
    max_length: int | None = None,
    progress: bool = True,
    sink_free: bool = True,
) -> dict[str, Any]:
    """Train every parameter of the entries' maps and gates; the model stays frozen.

    ``target_acts[site.name]`` holds the mean-pooled (unsteered) target activations. Entries
    whose gate has parameters (E2E) are trained with their gate, the others without a gate
    (a LinEAS map is learned ungated; offline gates are applied afterwards). ``gamma``: the
    weight of the control term (learned gates only). Returns a summary (losses on the full sets
    before/after, per-step history, sparsity, seconds). ``sink_free``: the pooled means of the
    loss leave each text's first real token (the attention sink) out, as the fit's statistics do.
    """
    from .hooks import SteeringHandle  # here: at module level, import order would matter

    opts = options or LinEASOptions()
    opts.check()
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative (got {gamma})")
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
    use_control = learn_gates and gamma > 0 and control is not None and len(control) > 0

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
                        loss = loss + gamma * ctrl
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"the loss became {float(loss)} at step {step}: lower the learning rate"
                        )
                    loss.backward()
                    lr_now = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    if lineas_maps and (opts.l1 > 0 or opts.group_l1 > 0):
                        prox_step(lineas_maps, lr_now, opts.l1, opts.group_l1)
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
        "options": {**opts.to_json(), **({"gamma": gamma} if learn_gates else {})},
    }
    if lineas_maps:
        dims = [m.active_dims() for m in lineas_maps]
        info["active_dims"] = int(sum(dims))
        info["total_dims"] = int(sum(m.omega.numel() for m in lineas_maps))
        info["active_layers"] = int(sum(1 for d in dims if d > 0))
        info["total_layers"] = len(dims)
    return info
