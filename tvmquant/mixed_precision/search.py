"""The mixed-precision search: sensitivity + measured latency -> ILP -> quantized model.

:func:`search` runs the whole HAWQ-V3-style loop on a float model and its calibration data:

1. quantize and measure the uniform int8 model end to end on the target;
2. measure each layer's latency per candidate precision (:mod:`.latency`, a cached table);
   ``rest`` = the int8 model's time minus its int8 layers (everything that is not a layer);
3. each layer's sensitivity per precision (:mod:`.sensitivity`, ``kl`` or ``hessian``);
4. solve the ILP under the budgets (:mod:`.ilp`), and sweep the latency budget for the
   Pareto front;
5. quantize with the chosen per-layer config, build it, and measure it end to end: the
   table's prediction is reported next to the measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ..calibration.runner import check_sample, input_signature
from ..config import QuantConfig, get_preset
from ..targets import resolve_target
from . import ilp
from .latency import LatencyTable, measure_latencies, target_key, time_module
from .layers import PRECISIONS, anchor_layers, assignment_config, attach_qparams
from .sensitivity import (
    SensitivityCache,
    cache_key,
    hessian_sensitivity,
    hutchinson_traces,
    kl_sensitivity,
    measured_sensitivity,
)
from .simulate import AssignmentSimulator, assignment_sensitivity

logger = logging.getLogger(__name__)

SENSITIVITIES = ("kl", "kl-int8", "measured", "hessian")
LATENCY_NOISE = 0.05
"""Relative difference between two measured layer latencies taken as noise, not a saving."""


@dataclass
class MixedPrecisionResult:
    """What :func:`search` found (``report`` is JSON-serialisable)."""

    assignment: dict[str, str]
    config: QuantConfig
    quantized: Any  # QuantizedModel of the chosen config
    executable: Any  # its compiled module
    sensitivity: dict[str, dict[str, float]]
    latency: dict[str, dict[str, float]]
    rest_ms: float
    predicted_ms: float
    measured_ms: float | None
    uniform: dict[str, dict[str, float]]
    pareto: list[dict] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def _simulator(q8, sources, target) -> AssignmentSimulator:
    return AssignmentSimulator(q8.float_mod, q8.config, q8.ranges, sources, target=target)


def effective_assignment(assignment: dict[str, str], quantized,
                         latency: dict[str, dict[str, float]] | None = None) -> dict[str, str]:
    """``assignment`` as ``quantized`` (its QuantizedModel) runs it: a layer the pipeline left
    in float (a float neighbour took away the integer rule of its add or clip) is float,
    where ``latency`` has a float time for it."""
    fell = {f["name"] for f in quantized.report.get("float_layers", [])}
    return {n: "float" if n in fell and (latency is None or "float" in latency.get(n, {}))
            else p for n, p in assignment.items()}


def _uniform(layers, precision):
    return {name: precision for name in layers}


def search(
    mod: tvm.IRModule,
    calibration_data: Iterable[dict],
    target="x86-vnni",
    *,
    latency_budget: str | float | None = None,
    size_budget: str | float | None = None,
    bops_budget: str | float | None = None,
    precisions: Sequence[str] = PRECISIONS,
    sensitivity: str = "kl",
    sensitivity_samples: int = 4,
    base: QuantConfig | None = None,
    latency_table: LatencyTable | str | Path | None = None,
    cache: str | Path | None = None,
    database=None,
    pareto_points: int = 16,
    measure: bool = True,
    progress: bool = True,
    hessian_vectors: int = 32,
    rpc=None,
    int8_ms: float | None = None,
) -> MixedPrecisionResult:
    """Choose each layer's precision under budgets; returns the quantized, compiled choice.

    Parameters
    ----------
    mod : IRModule
        The float model (weights as constants).
    calibration_data : iterable of {input: ndarray}
        Calibration samples; the first ``sensitivity_samples`` also measure sensitivity.
    target : str, dict or Target
        Where latencies are measured and the result compiled.
    latency_budget, size_budget, bops_budget : str or float, optional
        ``"0.8x-int8"`` (relative to the uniform assignment named), or absolute (``"12ms"``,
        ``"4MB"``, ``"2G"``; plain numbers are ms, bytes, BOPs). At least one.
    precisions : sequence of str
        Candidates per layer, among ``float``, ``int8``, ``int4``.
    sensitivity : ``"kl"``, ``"kl-int8"``, ``"measured"`` or ``"hessian"``
        ZeroQ-style output divergence with only that layer quantized (``kl``, one compiled
        float module); the change from uniform int8 when that layer alone moves off int8,
        with every tensor the integer graph quantizes simulated (``kl-int8``, one compiled
        module, :mod:`.simulate`); the same change through the real pipeline, one
        calibration and build per layer and precision (``measured``: slow); or HAWQ-V2's
        Hessian trace times the weight perturbation (Hutchinson, ``hessian_vectors``
        vectors). Whichever it is, a layer's sensitivities are made monotone in precision
        (:func:`~.ilp.monotone`), and candidates no cheaper than a less sensitive one of
        the same layer (latencies within ``LATENCY_NOISE``) are dropped before the ILP
        unless that leaves the budgets infeasible (:func:`~.ilp.prune_dominated`). For a
        static config, the chosen assignment's divergence is simulated as a whole too
        (``report["simulated_divergence"]``, next to uniform int8's).
    latency_table : LatencyTable or path, optional
        The table of measured layer latencies to use and extend (e.g.
        ``~/.cache/tvmquant/latency.json``); in memory if not given.
    cache : path, optional
        JSON file caching sensitivities per model and data.
    database : optional
        Tuned records (``tvmquant tune``) used for every build.
    measure : bool
        Build and time the chosen model (the check of the latency prediction). The
        prediction is of the assignment as the pipeline runs it
        (:func:`effective_assignment`: a layer a float neighbour took along is float,
        ``report["knock_on_float"]``); the ILP itself sees each layer alone.
    rpc : tvmquant.tuning.RPCDevice, optional
        Measure every latency (layers and whole models) on the device behind TVM's RPC
        tracker instead of this machine; ``target`` must then describe that device.
    int8_ms : float, optional
        The uniform int8 model's end-to-end time on the target if already measured (a
        previous search's ``report["latency_ms"]["uniform_int8_measured"]``): two searches
        then share one baseline, and so one meaning of a relative budget.
    """
    from ..api import build, quantize

    budget_texts = {"latency": latency_budget, "size": size_budget, "bops": bops_budget}
    if all(v is None for v in budget_texts.values()):
        raise ValueError("give at least one budget: latency_budget, size_budget or "
                         "bops_budget (e.g. latency_budget='0.8x-int8')")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or "int8" not in precisions:
        raise ValueError(f"precisions must include int8 and be among {PRECISIONS}, got "
                         f"{list(precisions)}")
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    base = base or get_preset("int8")
    tgt = resolve_target(target)
    remote = None
    if rpc is not None:
        from ..tuning import connect_rpc

        remote = connect_rpc(rpc)
    samples = list(calibration_data)
    if not samples:
        raise ValueError("mixed precision needs calibration samples (none given)")
    # 1. uniform int8 end to end
    q8 = quantize(mod, samples, base, progress=progress)
    float_mod = q8.float_mod
    signature = input_signature(float_mod)
    inputs = check_sample(samples[0], signature, 0)
    sources = attach_qparams(anchor_layers(float_mod), q8)
    if not sources:
        raise ValueError("the model has no conv2d/matmul layer with constant weights to "
                         "choose a precision for")
    names = [s.info.name for s in sources]
    e_int8 = int8_ms if int8_ms is not None else time_module(
        build(q8, tgt, database=database), inputs, remote=remote)

    # 2. layer latencies
    table = latency_table if isinstance(latency_table, LatencyTable) else \
        LatencyTable(latency_table)
    lat = measure_latencies(sources, precisions, tgt, table, database=database,
                            progress=progress, remote=remote,
                            device_key=rpc.key if rpc is not None else None)
    # (a layer that the uniform int8 model runs in float anyway is float there, and in the
    # ILP: its other candidates do not exist)
    forced = {n for n, p in effective_assignment(_uniform(names, "int8"), q8, lat).items()
              if p == "float"}
    rest = e_int8 - sum(lat[n]["float" if n in forced else "int8"] for n in names)

    # 3. sensitivity
    sens_cache = SensitivityCache(cache)
    sim = None
    # spread over the calibration data (splits are often ordered: the first pages of det's
    # calibration split have no text at all, and a blank page measures nothing)
    step = max(1, len(samples) // sensitivity_samples)
    sens_samples = samples[::step][:sensitivity_samples]
    if sensitivity == "measured":
        sens = measured_sensitivity(mod, names, samples, sens_samples, precisions, base=base,
                                    target=tgt, progress=progress, cache=sens_cache)
    elif sensitivity == "kl-int8":
        sim = _simulator(q8, sources, tgt)
        sens = assignment_sensitivity(
            sim, sens_samples, precisions, progress=progress, cache=sens_cache,
            key="sim-" + cache_key(float_mod, samples + sens_samples, {
                "precisions": list(precisions), "config": repr(base),
                "sensitivity_samples": len(sens_samples)}))
    elif sensitivity == "kl":
        sens = kl_sensitivity(float_mod, sources, sens_samples, precisions, target=tgt,
                              progress=progress, cache=sens_cache)
    else:
        traces = hutchinson_traces(float_mod, sources, sens_samples, vectors=hessian_vectors,
                                   target=tgt, progress=progress)
        sens = hessian_sensitivity(traces, sources, precisions)
    sens = ilp.monotone({n: {p: float(sens[n].get(p, 0.0)) for p in precisions}
                         for n in names}, PRECISIONS)
    sens = {n: {"float": row["float"]} if n in forced else row for n, row in sens.items()}

    # 4. ILP
    info = {s.info.name: s.info for s in sources}
    costs = {"latency": lat,
             "size": {n: {p: info[n].size_bytes(p) for p in precisions} for n in names},
             "bops": {n: {p: info[n].bops(p) for p in precisions} for n in names}}
    offsets = {"latency": rest}
    uniform = {}
    for p in precisions:
        a = {n: "float" if n in forced else p for n in names}
        uniform[p] = {kind: ilp.total(a, costs[kind], offsets.get(kind, 0.0))
                      for kind in ilp.KINDS} | {"sensitivity": ilp.total(a, sens)}
    budgets = [ilp.parse_budget(kind, text, {p: uniform[p][kind] for p in precisions})
               for kind, text in budget_texts.items() if text is not None]
    # a candidate no cheaper than a less sensitive one (latencies within their noise) is
    # dropped first: int4 weights that save nothing on compute-bound kernels are not taken
    # to pay for float layers; if that leaves no feasible assignment, all candidates count
    pruned = ilp.prune_dominated(sens, costs, [b.kind for b in budgets],
                                 {"latency": LATENCY_NOISE}, PRECISIONS)
    try:
        assignment = ilp.solve(pruned, costs, budgets, offsets)
    except ilp.InfeasibleBudget:
        assignment = ilp.solve(sens, costs, budgets, offsets)
    lat_budget = [b for b in budgets if b.kind == "latency"]
    others = [b for b in budgets if b.kind != "latency"]
    lo = rest + sum(min(lat[n][p] for p in sens[n]) for n in names)  # the fastest one
    hi = max(uniform[p]["latency"] for p in precisions)
    limits = np.geomspace(lo * 1.0001, hi * 1.0001, pareto_points)  # dense where it is tight
    front = ilp.pareto_sweep(sens, costs, "latency", limits, offsets, extra=others)

    # the whole assignment's divergence, simulated (the ILP adds per-layer changes up)
    simulated = None
    if not base.dynamic:
        sim = sim or _simulator(q8, sources, tgt)
        sim_inputs, sim_refs = sim.prepare(sens_samples)
        simulated = {"chosen": sim.divergence(sim_inputs, sim_refs, assignment),
                     "uniform_int8": sim.divergence(sim_inputs, sim_refs, {})}

    # 5. the chosen model
    config = assignment_config(assignment, base)
    # (calibrated again: a layer left in float changes which tensors are quantized, and a
    # tensor that only a lookup table reads gets a different observer than one a float
    # layer reads)
    qmix = quantize(mod, samples, config, progress=False)
    ex = build(qmix, tgt, database=database)
    measured = time_module(ex, inputs, remote=remote) if measure else None
    # predicted as it runs: a float layer may take a neighbour's integer rule with it (the
    # ILP does not know that: a layer alone in float is what the table measured)
    effective = effective_assignment(assignment, qmix, lat)
    predicted = ilp.total(effective, lat, rest)
    counts = {p: sum(1 for v in assignment.values() if v == p) for p in precisions}
    report = {
        "target": target_key(tgt),
        "budgets": [{"kind": b.kind, "limit": b.limit} for b in budgets],
        "sensitivity_measure": sensitivity,
        "assignment": assignment,
        "counts": counts,
        "knock_on_float": sorted(n for n, p in effective.items() if p != assignment[n]),
        "latency_ms": {"predicted": predicted, "measured": measured,
                       "error": None if not measured else (predicted - measured) / measured,
                       "rest": rest, "uniform_int8_measured": e_int8},
        "size_bytes": ilp.total(assignment, costs["size"]),
        "bops": ilp.total(assignment, costs["bops"]),
        "total_sensitivity": ilp.total(assignment, sens),
        "simulated_divergence": simulated,
        "uniform": uniform,
        "layers": [{"name": n, "op": info[n].op, "input_shape": list(info[n].input_shape),
                    "weight_shape": list(info[n].weight_shape), "macs": info[n].macs,
                    "precision": assignment[n], "latency_ms": lat[n],
                    "weight_bytes": costs["size"][n], "bops": costs["bops"][n],
                    "sensitivity": sens[n]} for n in names],
        "pareto": [{"latency_ms": p["cost"], "sensitivity": p["sensitivity"],
                    "counts": {k: sum(1 for v in p["assignment"].values() if v == k)
                               for k in precisions}} for p in front],
        "latency_budget_ms": lat_budget[0].limit if lat_budget else None,
    }
    return MixedPrecisionResult(assignment, config, qmix, ex, sens, lat, rest, predicted,
                                measured, uniform, front, report)


def write_plots(result: MixedPrecisionResult, folder: str | Path, stem: str = "mixed"
                ) -> list[Path]:
    """``STEM-sensitivity.png`` and ``STEM-pareto.png`` in ``folder``."""
    from .plots import pareto_plot, sensitivity_bars

    folder = Path(folder)
    measure = result.report.get("sensitivity_measure", "kl")
    title = ("per-layer sensitivity: change from uniform int8" if measure in
             ("kl-int8", "measured") else f"per-layer sensitivity ({measure})")
    out = [sensitivity_bars(result.sensitivity, folder / f"{stem}-sensitivity.png", title)]
    uniform = {p: (u["latency"], u["sensitivity"]) for p, u in result.uniform.items()}
    out.append(pareto_plot(result.pareto, folder / f"{stem}-pareto.png", uniform=uniform,
                           chosen=(result.predicted_ms,
                                   result.report["total_sensitivity"])))
    return out


def random_assignments(layers: Sequence[str], precisions: Sequence[str], n: int, seed: int = 0
                       ) -> list[dict[str, str]]:
    """``n`` uniformly random assignments (baselines for benchmarks)."""
    rng = np.random.default_rng(seed)
    return [{name: str(rng.choice(list(precisions))) for name in layers} for _ in range(n)]


__all__ = ["MixedPrecisionResult", "random_assignments", "search", "write_plots"]
