"""Mixed precision on real models: the ILP's choice against uniform and random assignments.

    .venv/bin/python benchmarks/mixed_precision.py [--models det,rec] [--threads 2]

For PP-OCRv4 det (320x320) and rec (48x320), calibrated on the calibration split of
``tvmquant.datasets`` (scanned pages of scikit-image, rendered text lines) and scored on its
eval split against the float model's own outputs (det: mask IoU; rec: identical strings and
character accuracy), two scenarios, each at one budget:

A. latency: candidates float/int8/int4, ``--latency-budget`` (default 1.15x-int8);
B. size: candidates int8/int4, ``--size-budget`` (default 0.7x-int8).

Rows: the ILP's assignment for each ``--sensitivities`` measure (``kl-int8``: the change
from uniform int8 when the layer alone moves off int8, every quantized tensor simulated;
``kl``: only that layer quantized), the uniform assignments, and random assignments that
meet the same budget by the same tables (``--random`` seeds: a random order of layers, moved
to the cheaper or more precise precision one by one while the budget holds). Every row is
quantized (calibrated on the same samples) and compiled; the rows are then timed end to end
in alternating rounds (medians), and the latency table's prediction is printed next to the
measurement, also as a ratio of ratios to uniform int8 (which cancels the machine's drift
between the table's measurements and now). Writes ``benchmarks/mixed_precision.md`` and the
Pareto/sensitivity plots next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _score(kind, ds, ref, test) -> dict[str, float]:
    if kind == "det":
        return {"mask IoU": ds.det_mask_iou(ref, test),
                "boxes": ds.det_box_agreement(ref, test)}
    r, t = [ds.rec_text(x) for x in ref], [ds.rec_text(x) for x in test]
    return {"identical": ds.rec_agreement(r, t), "char acc": ds.rec_char_accuracy(r, t)}


def _random_feasible(names, order_rng, start, move, fits):
    """Start from ``start`` everywhere; in a random order, apply ``move`` while ``fits``."""
    a = dict.fromkeys(names, start)
    for n in order_rng.permutation(names):
        trial = dict(a, **{n: move})
        if fits(trial):
            a = trial
    return a


def run_model(kind: str, args, table_path: Path, lines: list[str]) -> None:
    from tvmquant.passes import canonicalize_pipeline

    import tvmquant
    from tvmquant import datasets as ds
    from tvmquant import mixed_precision as mp
    from tvmquant.frontend import load_onnx
    from tvmquant.mixed_precision import ilp
    from tvmquant.mixed_precision.latency import time_module
    from tvmquant.zoo import PPOCR_INPUT_SHAPES

    mod = load_onnx(ds.model_path(kind), PPOCR_INPUT_SHAPES[kind])[0]
    calib = ds.calibration_samples(kind, args.n_calib)
    evals = ds.model_inputs(kind, "eval", args.n_eval)
    target = tvmquant.resolve_target(args.target)
    table = mp.LatencyTable(table_path)

    def evaluate(config):
        q = tvmquant.quantize(mod, calib, config, progress=False)
        ex = tvmquant.build(q, target)
        return ex, [tvmquant.run(ex, [x])[0] for x in evals], q

    def interleaved_ms(executables, rounds=5):
        """Median ms of each, timed in alternating rounds (the VM drifts by up to 2x over
        minutes: rows timed one after another are not comparable)."""
        times = [[] for _ in executables]
        for _ in range(rounds):
            for i, ex in enumerate(executables):
                times[i].append(time_module(ex, [evals[0]], number=10, repeat=3))
        return [float(np.median(t)) for t in times]

    float_ex = tvmquant.build(canonicalize_pipeline()(mod), target)
    ref = [tvmquant.run(float_ex, [x])[0] for x in evals]
    scenarios = [("A", "latency", args.latency_budget, ("float", "int8", "int4")),
                 ("B", "size", args.size_budget, ("int8", "int4"))]
    measures = [m.strip() for m in args.sensitivities.split(",") if m.strip()]
    for tag, kind_budget, budget, precisions in scenarios:
        if tag not in args.scenarios.split(","):
            continue
        choices, search_s, first = {}, {}, None
        for measure in measures:
            t0 = time.time()
            r = mp.search(mod, calib, target, precisions=precisions, sensitivity=measure,
                          sensitivity_samples=args.sensitivity_samples,
                          int8_ms=None if first is None else
                          first.report["latency_ms"]["uniform_int8_measured"],
                          **{f"{kind_budget}_budget": budget}, latency_table=table,
                          cache=table_path.parent / "sensitivity.json", progress=False)
            search_s[measure] = time.time() - t0
            choices[measure] = r.assignment
            if measure == measures[0]:
                first = r
                mp.write_plots(r, HERE, f"{args.plot_prefix}-{kind}-{tag}")
        r = first
        names = list(r.assignment)
        limit = r.report["budgets"][0]["limit"]
        costs = {"latency": r.latency,
                 "size": {n: {p: row["weight_bytes"][p] for p in precisions}
                          for n, row in ((x["name"], x) for x in r.report["layers"])}}
        offset = r.rest_ms if kind_budget == "latency" else 0.0

        def fits(a, kind_budget=kind_budget, costs=costs, offset=offset, limit=limit):
            return ilp.total(a, costs[kind_budget], offset) <= limit

        rows = [(f"ILP ({m})", choices[m]) for m in measures]
        rows += [(f"uniform {p}", dict.fromkeys(names, p)) for p in precisions
                 if p != "float"]
        for seed in range(args.random):
            rng = np.random.default_rng(seed)
            if kind_budget == "latency":  # int8 everywhere, then float where it still fits
                a = _random_feasible(names, rng, "int8", "float", fits)
            else:  # int8 everywhere does not fit: int4 in random order until it does
                a = dict.fromkeys(names, "int8")
                for n in rng.permutation(names):
                    if fits(a):
                        break
                    a[n] = "int4"
            rows.append((f"random seed {seed}", a))
        lines.append(f"\n### {kind}, scenario {tag}: {kind_budget} budget {budget} "
                     f"(= {limit:.4g} {ilp.UNITS[kind_budget]}), candidates "
                     f"{'/'.join(precisions)}\n")
        took = ", ".join(f"{search_s[m]:.0f} s ({m})" for m in measures)
        lines.append(f"Search (latency table + sensitivity + ILP + build) took {took}; "
                     f"`{args.plot_prefix}-{kind}-{tag}-pareto.png`, "
                     f"`{args.plot_prefix}-{kind}-{tag}-sensitivity.png` "
                     f"({measures[0]}). Total sensitivity is by the {measures[0]} measure.\n")
        metric_keys = list(_score(kind, ds, ref[:1], ref[:1]))
        lines.append("| assignment | float/int8/int4 layers | weights MB | predicted ms | "
                     "measured ms | predicted / measured (vs int8) | within budget | "
                     "total sensitivity | " + " | ".join(metric_keys) + " |")
        lines.append("|---|---|---:|---:|---:|---:|---|---:|" + "---:|" * len(metric_keys))
        built = []
        for label, a in rows:
            ex, outs, q = evaluate(mp.assignment_config(a))
            # predicted as the pipeline runs it (a float layer may take a neighbour along)
            eff = mp.effective_assignment(a, q, r.latency)
            built.append((label, a, ex, _score(kind, ds, ref, outs), eff))
            _log(f"{label}: {built[-1][3]}")
        times = interleaved_ms([b[2] for b in built])
        int8_row = next(i for i, b in enumerate(built) if b[0] == "uniform int8")
        pred_int8 = ilp.total(built[int8_row][4], r.latency, r.rest_ms)
        for (label, a, _, metrics, eff), ms in zip(built, times):
            counts = "/".join(str(sum(1 for v in a.values() if v == p))
                              for p in ("float", "int8", "int4"))
            size = ilp.total(a, costs["size"]) / 1e6
            pred = ilp.total(eff, r.latency, r.rest_ms)
            # the table's prediction of the change from uniform int8, against the change
            # measured in the same rounds (drift between the table and now cancels)
            rel = (pred / pred_int8) / (ms / times[int8_row])
            sens = ilp.total(a, r.sensitivity)
            ok = "yes" if fits(a) else "no"
            lines.append(f"| {label} | {counts} | {size:.3f} | {pred:.2f} | {ms:.2f} | "
                         f"{pred / ms:.2f} ({rel:.2f}) | {ok} | {sens:.4g} | "
                         + " | ".join(f"{100 * metrics[k]:.1f}%" for k in metric_keys)
                         + " |")
            _log(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--target", default="x86-vnni")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-budget", default="1.15x-int8")
    parser.add_argument("--size-budget", default="0.7x-int8")
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--n-eval", type=int, default=None,
                        help="eval inputs per model (default: the whole eval split)")
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--sensitivity-samples", type=int, default=16,
                        help="calibration samples each sensitivity is measured on")
    parser.add_argument("--sensitivities", default="kl-int8,kl",
                        help="sensitivity measures, one ILP row each (default: kl-int8,kl)")
    parser.add_argument("--scenarios", default="A,B", help="A (latency), B (size)")
    parser.add_argument("--plot-prefix", default="mixed",
                        help="file name prefix of the plots (default: mixed)")
    parser.add_argument("--out", default=str(HERE / "mixed_precision.md"))
    parser.add_argument("--table", default=str(HERE / "records" / "latency.json"),
                        help="latency table (kept between runs)")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from tvmquant.io import atomic_write_bytes

    sys.path.insert(0, str(HERE))
    import fidelity

    n_eval = args.n_eval if args.n_eval is not None else "all"
    lines = ["# Mixed precision on PP-OCRv4: ILP against uniform and random assignments", "",
             f"Machine: {fidelity._cpu()}, "
             f"{os.cpu_count()} CPUs, {args.threads} threads, target `{args.target}`; "
             f"{args.n_calib} calibration and {n_eval} eval inputs per model "
             "(`tvmquant.datasets`). Fidelity is against the float model's own outputs. "
             "Regenerate: `.venv/bin/python benchmarks/mixed_precision.py`.", ""]
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        run_model(kind, args, Path(args.table), lines)
    atomic_write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
