"""Pareto fronts between toxicity and utility, and how to compare two of them.

A point *dominates* another when it is at least as good on both axes and strictly better on one.
The front of a set of points is the set of points no other point dominates, returned sorted by the
first axis. Toxicity is minimised; perplexity is minimised; MMLU accuracy is maximised.

To say "by how much" one front beats another we use the front as a step function: the best
(lowest) toxicity reachable within a utility budget, e.g. "toxicity at perplexity ≤ 1.2 × the
unsteered perplexity" (``best_within``); and the area between two such step curves over a
utility range (``front_gap``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(
    x: Sequence[float], y: Sequence[float], *, minimize_x: bool = True, minimize_y: bool = True
) -> list[int]:
    """Indices of the non-dominated points of (x, y), sorted by x (ascending).

    Duplicated points are all kept (neither dominates the other); NaN points are dropped.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xs.shape} and {ys.shape}")
    sx = xs if minimize_x else -xs
    sy = ys if minimize_y else -ys
    ok = np.flatnonzero(np.isfinite(sx) & np.isfinite(sy))
    # sort by x then y (both to minimise); sweep keeping points whose y beats all before
    order = ok[np.lexsort((sy[ok], sx[ok]))]
    front: list[int] = []
    best_y = np.inf
    i = 0
    while i < len(order):
        # group of points with identical x: only those with the group's minimal y can be on the
        # front, and only if that y beats every point with smaller x
        j = i
        while j < len(order) and sx[order[j]] == sx[order[i]]:
            j += 1
        group = order[i:j]
        gmin = sy[group].min()
        if gmin < best_y:
            front.extend(int(k) for k in group if sy[k] == gmin)
            best_y = gmin
        i = j
    return sorted(front, key=lambda k: (xs[k], ys[k]))


def is_dominated(p: tuple[float, float], q: tuple[float, float], *, minimize_x: bool = True,
                 minimize_y: bool = True) -> bool:
    """Whether point ``p`` is dominated by point ``q``."""
    px, py = (p[0] if minimize_x else -p[0]), (p[1] if minimize_y else -p[1])
    qx, qy = (q[0] if minimize_x else -q[0]), (q[1] if minimize_y else -q[1])
    return qx <= px and qy <= py and (qx < px or qy < py)


def best_within(
    toxicity: Sequence[float], utility: Sequence[float], budget: float, *, higher_is_better: bool
) -> float:
    """Lowest toxicity among points whose utility meets the budget (perplexity ≤ budget, or
    accuracy ≥ budget); NaN when no point does."""
    t = np.asarray(toxicity, dtype=np.float64)
    u = np.asarray(utility, dtype=np.float64)
    ok = (u >= budget) if higher_is_better else (u <= budget)
    ok &= np.isfinite(t)
    return float(t[ok].min()) if ok.any() else float("nan")


def front_gap(
    a: tuple[Sequence[float], Sequence[float]],
    b: tuple[Sequence[float], Sequence[float]],
    budgets: Sequence[float],
    *,
    higher_is_better: bool,
) -> np.ndarray:
    """Toxicity of front ``b`` minus front ``a`` at each utility budget (negative: b is better).
    Each front is given as (toxicity, utility) arrays of its points."""
    return np.array([
        best_within(b[0], b[1], u, higher_is_better=higher_is_better)
        - best_within(a[0], a[1], u, higher_is_better=higher_is_better)
        for u in budgets
    ])


def interpolate_front(
    toxicity: Sequence[float], utility: Sequence[float], at: float, *, higher_is_better: bool
) -> float:
    """Toxicity of the Pareto front of the points at utility ``at``, interpolating linearly
    between neighbouring front points; NaN outside the front's utility range."""
    t = np.asarray(toxicity, dtype=np.float64)
    u = np.asarray(utility, dtype=np.float64)
    idx = pareto_front(t, u, minimize_y=not higher_is_better)
    if not idx:
        return float("nan")
    fu, ft = u[idx], t[idx]
    order = np.argsort(fu, kind="stable")
    fu, ft = fu[order], ft[order]
    if at < fu[0] or at > fu[-1]:
        return float("nan")
    return float(np.interp(at, fu, ft))
