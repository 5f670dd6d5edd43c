"""A recipe's default strength chosen on held-out text, and its strength relative to the model.

λ has no meaning of its own: a map's vector is as long as the fitted difference of means, and
how far a model tolerates a push depends on its activation norms (Gemma 3 270M breaks at
λ = 0.25 where the 6.8 M testbed needs λ ≈ 1-2). ``fit`` with ``default_strength="auto"``
therefore stores a strength chosen by a stated rule (docs/algorithms.md, "Default strength"):

    the largest λ whose steered perplexity on held-out benign texts (target and control texts
    the maps and gates were not fitted on) is at most (1 + budget) × the unsteered perplexity.

``search_strength`` finds it on a log scale: the unsteered perplexity, then λ = 1 and steps by a
factor of 4 up (while within the budget, up to ``strength_max``) or down (while over it) until
the crossing is bracketed, then bisection in log space until the bracket's ratio is at most
``TOLERANCE`` (or the evaluations run out). The answer is the bracket's lower end, a probed λ
that is within the budget, cut to 3 significant digits. The search assumes the perplexity crosses the limit once; every
probe is recorded, so a user sees where it did not.

``relative_strength`` reads a fitted recipe's strength in the model's own units: the steering
norm at the default strength, λ · a_l · ‖δ(mean source)‖, over the median norm of the layer's
token activations (``token_norm_median``, measured on the source texts at fit time).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .activations import (
    ensure_pad_token,
    forward_kwargs,
    max_model_length,
    pad_batch,
    statistics_mask,
    tokenize,
)
from .sites import Site

AUTO = "auto"
START = 1.0  # the first steered λ probed
STEP = 4.0  # bracketing steps by this factor
TOLERANCE = 1.1  # bisection stops when the bracket's upper end is at most this × its lower end
MIN_STRENGTH = 1e-4  # the search gives up below this λ (no steering within the budget)


def check_default_strength(value: Any) -> float | str:
    """A finite number or ``"auto"``; anything else raises ``ValueError``."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"default_strength must be a number or 'auto', got {value!r}") \
                from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"default_strength must be a finite number or 'auto', got {value!r}")
    return float(value)


def strength_value(text: str) -> float | str:
    """Command-line type of ``--strength``: a finite number or ``auto``."""
    import argparse

    try:
        return check_default_strength(text)
    except ValueError:
        try:
            float(text)  # a number, but NaN or infinite
            what = "a finite number"
        except ValueError:
            what = "a finite number or 'auto'"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def check_search_options(budget: Any, holdout: Any, strength_max: Any, evals: Any) -> None:
    """The search's options, checked (one ``ValueError`` naming the option)."""
    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    if number("strength_budget", budget) <= 0:
        raise ValueError(f"strength_budget must be > 0 (a relative perplexity rise, e.g. 0.05 "
                         f"for +5 %), got {budget!r}")
    if not 0 < number("strength_holdout", holdout) < 1:
        raise ValueError(f"strength_holdout must be a share strictly between 0 and 1, "
                         f"got {holdout!r}")
    if number("strength_max", strength_max) <= 0:
        raise ValueError(f"strength_max must be > 0, got {strength_max!r}")
    if isinstance(evals, bool) or not isinstance(evals, int) or evals < 2:
        raise ValueError(f"strength_evals must be an integer >= 2, got {evals!r}")


def split_held_out(texts: list[str], share: float, seed: int, name: str
                   ) -> tuple[list[str], list[str]]:
    """``(kept, held_out)``: ``round(share · n)`` texts (at least 1) drawn with ``seed`` are held
    out; the rest keep their order. Raises ``ValueError`` when nothing would be left to fit."""
    n = len(texts)
    k = max(1, round(share * n))
    if k >= n:
        raise ValueError(
            f"holding out {share:g} of the {n} {name} texts (strength_holdout, to choose the "
            f"default strength) leaves none to fit on; give more texts, a smaller "
            f"strength_holdout, or strength_texts")
    gen = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=gen)[:k].tolist())
    return ([t for i, t in enumerate(texts) if i not in held],
            [t for i, t in enumerate(texts) if i in held])


@dataclass
class StrengthSearch:
    """What ``search_strength`` found: the chosen λ and every probe, in the order probed."""

    strength: float
    budget: float
    base_perplexity: float
    limit: float  # (1 + budget) × base_perplexity
    probes: list[dict[str, float]] = field(default_factory=list)  # {"strength", "perplexity"}
    bracket: list[float | None] = field(default_factory=list)  # [within, over]
    capped: bool = False  # strength_max itself stayed within the budget
    n_texts: int = 0
    n_tokens: int = 0
    seconds: float = 0.0
    rule: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def search_strength(
    model: nn.Module,
    tokenizer,
    recipe,
    texts: Sequence[str],
    *,
    budget: float = 0.05,
    strength_max: float = 64.0,
    evals: int = 10,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> StrengthSearch:
    """The largest λ (on a log grid refined by bisection) whose steered perplexity of ``texts``
    stays within ``(1 + budget)`` × the unsteered one; ``evals`` steered evaluations at most."""
    from .eval.perplexity import text_perplexity

    check_search_options(budget, 0.5, strength_max, evals)
    t0 = time.perf_counter()

    def ppl(strength: float):
        was_training = model.training
        model.eval()
        try:
            return text_perplexity(model, tokenizer, texts, recipe if strength else None,
                                   strength or None, max_length=max_length,
                                   batch_size=batch_size, progress=progress)
        finally:
            model.train(was_training)

    base = ppl(0.0)
    limit = base.perplexity * (1.0 + budget)
    probes: list[dict[str, float]] = []

    def within(strength: float) -> bool:
        p = ppl(strength).perplexity
        probes.append({"strength": strength, "perplexity": p})
        return math.isfinite(p) and p <= limit

    lo: float | None = None  # largest probed λ within the budget below the crossing
    hi: float | None = None  # smallest probed λ over the budget
    capped = False
    lam = min(START, strength_max)
    while len(probes) < evals:
        if within(lam):
            lo = lam
            if hi is not None:
                break
            if lam >= strength_max:
                capped = True
                break
            lam = min(lam * STEP, strength_max)
        else:
            hi = lam
            if lo is not None or lam / STEP < MIN_STRENGTH:
                break
            lam = lam / STEP
    while lo is not None and hi is not None and hi / lo > TOLERANCE and len(probes) < evals:
        mid = math.sqrt(lo * hi)
        if within(mid):
            lo = mid
        else:
            hi = mid
    if lo is None:
        warnings.warn(
            f"no probed strength down to {min(p['strength'] for p in probes):.3g} keeps the "
            f"held-out perplexity within +{budget:.1%} of the unsteered {base.perplexity:.4g}: "
            f"the default strength is set to 0 (unsteered); give a larger strength_budget or "
            f"choose a strength by hand")
    rule = (f"largest λ with held-out perplexity ≤ (1 + {budget:g}) × unsteered "
            f"({limit:.4g} = {1 + budget:g} × {base.perplexity:.4g}), log-scale search")
    return StrengthSearch(
        strength=round_down(lo) if lo else 0.0, budget=float(budget), base_perplexity=base.perplexity,
        limit=limit, probes=probes, bracket=[lo, hi], capped=capped, n_texts=len(texts),
        n_tokens=base.n_tokens, seconds=time.perf_counter() - t0, rule=rule,
    )


def round_down(value: float, digits: int = 3) -> float:
    """``value`` > 0 cut (not rounded) to ``digits`` significant digits: still within the
    budget when the perplexity rises with λ."""
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.floor(value / scale + 1e-9) * scale:.{digits}g}")


@torch.no_grad()
def median_token_norms(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    sites: Sequence[Site],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    sink_free: bool = True,
) -> dict[str, float]:
    """Per site, the median L2 norm of the token activations of ``texts`` (real tokens only;
    the first one, the attention sink, left out when ``sink_free``). One forward pass."""
    ensure_pad_token(tokenizer)
    rows = tokenize(tokenizer, texts, max_length or max_model_length(model, tokenizer))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    norms: dict[str, list[Tensor]] = {s.name: [] for s in sites}
    state: dict[str, Tensor] = {}

    def make_hook(site: Site):
        def store(x: Tensor) -> None:
            keep = state["mask"].to(x.device) != 0
            norms[site.name].append(x.float().norm(dim=-1)[keep].cpu())

        if site.io == "input":
            return lambda module, args: store(args[0])
        return lambda module, args, output: store(
            output if isinstance(output, Tensor) else output[site.tuple_index or 0])

    handles = []
    was_training = model.training
    model.eval()
    try:
        for s in sites:
            module = model.get_submodule(s.module)
            register = (module.register_forward_pre_hook if s.io == "input"
                        else module.register_forward_hook)
            handles.append(register(make_hook(s)))
        for i in range(0, len(order), batch_size):
            batch = [rows[j] for j in order[i:i + batch_size]]
            ids, mask = pad_batch(batch, tokenizer.pad_token_id, device)
            state["mask"] = statistics_mask(mask, sink_free)
            model(**forward_kwargs(model, ids, mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, parts in norms.items():
        values = torch.cat(parts) if parts else torch.empty(0)
        out[name] = float(values.median()) if len(values) else float("nan")
    return out


def relative_strength(row: dict[str, Any], strength: float) -> float | None:
    """λ · a_l · ‖δ(mean source)‖ / median token norm for one site's diagnostics row (``None``
    when the fit did not record the norms: recipes fitted before they were measured)."""
    delta, norm = row.get("delta_norm"), row.get("token_norm_median")
    if not isinstance(delta, (int, float)) or not isinstance(norm, (int, float)) or not norm > 0:
        return None
    return abs(strength) * float(row.get("scale", 1.0)) * float(delta) / float(norm)


def search_summary(info: dict[str, Any]) -> str:
    """One line on a stored search (``fit_info["strength"]``): the chosen λ, the rule's numbers,
    the probes and the time."""
    probes = ", ".join(f"{p['strength']:.3g} → {p['perplexity']:.4g}" for p in info["probes"])
    capped = " (the cap strength_max; the search went no higher)" if info.get("capped") else ""
    return (f"default strength λ = {info['strength']:.3g}{capped}: the largest λ found with "
            f"held-out perplexity ≤ {info['limit']:.4g} (unsteered {info['base_perplexity']:.4g} "
            f"+{info['budget']:.1%}) on {info['n_texts']} texts, {info['n_tokens']} tokens; "
            f"probed λ → perplexity: {probes}; {len(info['probes']) + 1} evaluations, "
            f"{info['seconds']:.1f} s")
