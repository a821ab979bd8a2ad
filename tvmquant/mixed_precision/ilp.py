"""Choosing one precision per layer: an integer linear program (``scipy.optimize.milp``).

Variables ``x[l, p]`` in {0, 1}, one per layer and candidate precision, with
``sum_p x[l, p] = 1``. The objective is the total sensitivity ``sum Omega[l, p] x[l, p]``;
each budget is a linear constraint ``offset + sum cost[l, p] x[l, p] <= limit`` (latency:
the offset is the measured time of everything that is not a chosen layer; size and BOPs:
no offset). Ties in sensitivity go to the cheaper assignment (a second solve).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

KINDS = ("latency", "size", "bops")
UNITS = {"latency": "ms", "size": "bytes", "bops": "BOPs"}


class InfeasibleBudget(ValueError):
    """No assignment meets the budgets."""


@dataclass(frozen=True)
class Budget:
    """``offset + sum of the chosen layers' costs <= limit`` for one cost kind."""

    kind: str
    limit: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"budget kind must be one of {KINDS}, got {self.kind!r}")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}
_LAT_UNITS = {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3}
_BOPS_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_budget(kind: str, text: str | float, reference: Mapping[str, float]) -> Budget:
    """``"0.8x-int8"`` (relative to the uniform assignment named), ``"12ms"``, ``"4MB"``,
    ``"3.5G"`` or a plain number (ms, bytes, BOPs).

    ``reference`` maps a precision name to that uniform assignment's total for ``kind``.
    """
    if isinstance(text, (int, float)):
        return Budget(kind, float(text))
    s = text.strip().lower()
    m = re.fullmatch(r"([0-9.]+(?:e[-+]?[0-9]+)?)x-([a-z0-9]+)", s)
    if m:
        ref = m.group(2)
        if ref not in reference:
            raise ValueError(f"budget {text!r}: relative budgets name one of "
                             f"{', '.join(sorted(reference))} (e.g. 0.8x-int8)")
        return Budget(kind, float(m.group(1)) * reference[ref])
    m = re.fullmatch(r"([0-9.]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)", s)
    units = {"latency": _LAT_UNITS, "size": _SIZE_UNITS, "bops": _BOPS_UNITS}[kind]
    if not m or m.group(2) not in units:
        raise ValueError(f"cannot read {kind} budget {text!r}: use e.g. 0.8x-int8 or "
                         f"a number with one of the units {', '.join(u for u in units if u)}")
    return Budget(kind, float(m.group(1)) * units[m.group(2)])


def solve(sensitivity: Mapping[str, Mapping[str, float]],
          costs: Mapping[str, Mapping[str, Mapping[str, float]]],
          budgets: Sequence[Budget], offsets: Mapping[str, float] | None = None
          ) -> dict[str, str]:
    """The assignment ``{layer: precision}`` of least total sensitivity within the budgets.

    ``sensitivity[layer][precision]``; ``costs[kind][layer][precision]`` for every budget's
    kind; a layer's candidates are the precisions present in all of them.
    """
    offsets = dict(offsets or {})
    layers = list(sensitivity)
    cands = {}
    for layer in layers:
        ps = [p for p in sensitivity[layer]
              if all(p in costs[b.kind].get(layer, {}) for b in budgets)]
        if not ps:
            raise ValueError(f"layer {layer!r} has no precision with every cost measured")
        cands[layer] = ps
    index = [(layer, p) for layer in layers for p in cands[layer]]
    n = len(index)
    obj = np.array([sensitivity[layer][p] for layer, p in index], dtype=np.float64)
    rows = np.zeros((len(layers), n))
    pos = {layer: i for i, layer in enumerate(layers)}
    for j, (layer, _) in enumerate(index):
        rows[pos[layer], j] = 1
    constraints = [LinearConstraint(rows, 1, 1)]
    for b in budgets:
        row = np.array([costs[b.kind][layer][p] for layer, p in index])
        constraints.append(LinearConstraint(row[None, :], -np.inf,
                                            b.limit - offsets.get(b.kind, 0.0)))
    bounds, integrality = Bounds(0, 1), np.ones(n)
    res = milp(obj, constraints=constraints, integrality=integrality, bounds=bounds)
    if res.status == 2 or res.x is None:
        lows = []
        for b in budgets:
            best = offsets.get(b.kind, 0.0) + sum(
                min(costs[b.kind][layer][p] for p in cands[layer]) for layer in layers)
            lows.append(f"{b.kind} <= {b.limit:.6g} {UNITS[b.kind]} (the least any "
                        f"assignment reaches is {best:.6g})")
        raise InfeasibleBudget("no per-layer precision assignment meets the budget: " +
                               "; ".join(lows))
    if res.status != 0:
        raise RuntimeError(f"the ILP solver stopped: {res.message}")
    if budgets:
        # Among the least-sensitive assignments, the cheapest (first budget's kind): a second
        # solve with the sensitivity held at its optimum.
        best = float(obj @ np.round(res.x))
        tie = np.array([costs[budgets[0].kind][layer][p] for layer, p in index])
        hold = LinearConstraint(obj[None, :], -np.inf, best + 1e-9 * max(abs(best), 1e-12))
        res2 = milp(tie, constraints=[*constraints, hold], integrality=integrality,
                    bounds=bounds)
        if res2.status == 0 and res2.x is not None:
            res = res2
    chosen = {}
    for j, (layer, p) in enumerate(index):
        if res.x[j] > 0.5:
            chosen[layer] = p
    return chosen


def monotone(sensitivity: Mapping[str, Mapping[str, float]], order: Sequence[str],
             reference: str = "int8") -> dict[str, dict[str, float]]:
    """Sensitivities made monotone in precision, anchored at ``reference``.

    ``order`` lists precisions from the most to the least precise. A less precise candidate
    is not credited with less error than a more precise one of the same layer (it costs at
    least the reference's, and at least every more precise one's), and a more precise one
    with more: measured that way, the difference is sampling noise, and an ILP that sums
    such "free" int4 layers (each alone a little better than int8 on a few samples) breaks
    the model.
    """
    out = {}
    for layer, row in sensitivity.items():
        ps = [p for p in order if p in row]
        new = dict(row)
        if reference in row:
            i = ps.index(reference)
            for a, b in zip(ps[i:], ps[i + 1:]):  # less precise: running max
                new[b] = max(new[b], new[a])
            for a, b in zip(ps[i::-1], ps[i - 1::-1] if i else []):  # more precise: min
                new[b] = min(new[b], new[a])
        else:
            for a, b in itertools.pairwise(ps):
                new[b] = max(new[b], new[a])
        out[layer] = new
    return out


def prune_dominated(sensitivity: Mapping[str, Mapping[str, float]],
                    costs: Mapping[str, Mapping[str, Mapping[str, float]]],
                    kinds: Sequence[str], tolerance: Mapping[str, float] | None = None,
                    order: Sequence[str] = ("float", "int8", "int4")
                    ) -> dict[str, dict[str, float]]:
    """Drop each layer's candidates that another candidate dominates: no more sensitive and
    no more costly in any of ``kinds`` (within ``tolerance[kind]``, relative: latencies are
    measured, and a saving inside their noise is not one). Of equally sensitive candidates
    the more precise (earlier in ``order``) is kept first; then what another kept candidate
    dominates exactly goes too. Returns the pruned sensitivity
    table (:func:`solve` takes a layer's candidates from it)."""
    tolerance = dict(tolerance or {})
    out = {}
    for layer, row in sensitivity.items():
        keep: dict[str, float] = {}
        # least sensitive (then most precise) first: a candidate goes if one kept before it
        # is as cheap in every kind, within the tolerance
        rank = {p: (order.index(p) if p in order else len(order)) for p in row}
        for p in sorted(row, key=lambda p: (row[p], rank[p])):
            if not any(all(costs[k][layer][q] <= costs[k][layer][p] * (1 + tolerance.get(k, 0.0))
                           for k in kinds) for q in keep):
                keep[p] = row[p]

        def dominates(q, p):  # Pareto, exactly: no worse anywhere, better somewhere
            pairs = [(keep[q], keep[p])] + [(costs[k][layer][q], costs[k][layer][p])
                                            for k in kinds]
            return all(a <= b for a, b in pairs) and any(a < b for a, b in pairs)

        out[layer] = {p: v for p, v in keep.items() if not any(dominates(q, p) for q in keep)}
    return out


def total(assignment: Mapping[str, str], table: Mapping[str, Mapping[str, float]],
          offset: float = 0.0) -> float:
    """``offset + sum table[layer][assignment[layer]]``."""
    return offset + float(sum(table[layer][p] for layer, p in assignment.items()))


def pareto_sweep(sensitivity, costs, kind: str, limits: Sequence[float],
                 offsets: Mapping[str, float] | None = None,
                 extra: Sequence[Budget] = ()) -> list[dict]:
    """Solve at each limit of one budget kind; the non-dominated points, cheapest first."""
    offsets = dict(offsets or {})
    points = []
    for limit in limits:
        try:
            a = solve(sensitivity, costs, [Budget(kind, limit), *extra], offsets)
        except InfeasibleBudget:
            continue
        points.append({"limit": float(limit), "assignment": a,
                       "cost": total(a, costs[kind], offsets.get(kind, 0.0)),
                       "sensitivity": total(a, sensitivity)})
    points.sort(key=lambda p: (p["cost"], p["sensitivity"]))
    front, best = [], np.inf
    for p in points:
        if p["sensitivity"] < best - 1e-15:
            front.append(p)
            best = p["sensitivity"]
    return front


__all__ = ["Budget", "InfeasibleBudget", "monotone", "pareto_sweep", "parse_budget",
           "prune_dominated", "solve", "total"]
