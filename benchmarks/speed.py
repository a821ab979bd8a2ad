"""PP-OCR latency, side by side in one run: tvmquant against ONNX Runtime, OpenVINO and TVM.

    .venv/bin/python benchmarks/speed.py                      # writes benchmarks/README.md
    .venv/bin/python benchmarks/speed.py --models det --det-sizes 320 --out /tmp/speed.md

For each model (PP-OCR mobile cls 1x3x48x192, PP-OCRv4 det 1x3x320x320 and 1x3x640x640,
PP-OCRv4 rec 1x3x48x320), batch 1, ``--threads`` threads (2 by default), every engine runs
the same real input (the first page/line of the eval split): warm-up, then ``--repeat``
runs; the table gives the median in milliseconds and the speed-up over ONNX Runtime fp32.
Engines (``--engines``):

- ``ort-fp32``, ``ort-int8`` (``quantize_static``, QDQ, per-channel, same calibration data),
  ``ov-fp32``, ``ov-int8`` (NNCF ``quantize``): the peers, as in ``fidelity.py``;
- ``tvm-fp32``: TVM's own ``tvm.compile`` of the float model (no schedules, untuned);
- ``tvm-fp32-sched``: the float model through tvmquant's build pipeline (fusion and the
  default CPU schedules of ``tvmquant.schedules.cpu``);
- ``tvmquant-int8``: the integer-only model with default schedules and the VNNI kernels;
- ``tvmquant-int8-tuned`` / ``tvm-fp32-tuned``: the same with MetaSchedule records from
  ``--records DIR`` (``DIR/<case>/int8``, ``DIR/<case>/fp32``, written by ``tvmquant tune``).

The kernel section measures ``vpdpbusd``'s peak on this CPU (``vnni_peak.py``) and, for the
largest integer convolutions and matmuls of each model, the fraction of it they reach
inside the model (timed by the VM's instrumentation hook, ``tvmquant.profiling``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ENGINES = ("ort-fp32", "ort-int8", "ov-fp32", "ov-int8", "tvm-fp32", "tvm-fp32-sched",
           "tvmquant-int8", "tvmquant-int8-tuned")
TITLES = {"ort-fp32": "ORT fp32"}


def _log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_ms(run, x: np.ndarray, repeat: int, budget_s: float) -> tuple[float, int]:
    """Median latency over ``repeat`` runs (fewer if they exceed ``budget_s``)."""
    for _ in range(3):
        run(x)
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < repeat and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), len(times)


def kernel_rows(case, tvm_engines, peak: float, top: int) -> list[str]:
    """The ``top`` largest VNNI kernels of the int8 model: GOP/s and % of the peak."""
    import tvmquant
    from tvmquant.profiling import profile_kernels

    q = tvm_engines._quantized(case)
    ex = tvmquant.build(q.mod, tvm_engines.target)
    rows = []
    for k in profile_kernels(ex, [case.eval[0]], repeat=10):
        if not k.name.startswith("tvmquant_x86_int8") or len(k.shapes) < 3:
            continue
        (data, _), (weight, _), (out, _) = k.shapes[0], k.shapes[1], k.shapes[-1]
        if len(data) == 4:  # conv: data N,C,H,W; weight [O/16, ceil(C/4)*KH*KW, 16, 4]
            khkw = weight[1] // -(-data[1] // 4)
            macs = int(np.prod(out)) * data[1] * khkw
            desc = f"conv {data[1]}->{out[1]} {round(khkw ** 0.5)}x{round(khkw ** 0.5)} " \
                   f"out {out[2]}x{out[3]}"
        else:  # dense: data M,K; out M,N
            macs = data[0] * data[1] * out[1]
            desc = f"matmul {data[0]}x{data[1]} . {data[1]}x{out[1]}"
        gops = 2 * macs / (k.ms / k.calls) / 1e6
        rows.append((macs, f"| {case.key} | {desc} | {2 * macs / 1e6:.1f} | "
                           f"{k.ms / k.calls * 1e3:.0f} | {gops:.0f} | {gops / peak:.0%} |"))
    return [r for _, r in sorted(rows, key=lambda t: -t[0])[:top]]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cls,det,rec")
    p.add_argument("--det-sizes", default="320,640")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", default="native", help="tvmquant target (see `tvmquant targets`)")
    p.add_argument("--records", type=Path, default=HERE / "records" / "znver4",
                   help="tuning records, DIR/<case>/{int8,fp32}")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--budget", type=float, default=15.0, help="seconds per engine and model")
    p.add_argument("--passes", type=int, default=3,
                   help="measure every engine this many times, in turns; keep each one's best")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--kernels", type=int, default=6, help="kernel rows per model")
    p.add_argument("--out", type=Path, default=HERE / "README.md")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool

    import fidelity
    import peers

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    cases = fidelity.build_cases([m.strip() for m in args.models.split(",")],
                                 [int(s) for s in args.det_sizes.split(",")], args.n_calib, 1)
    tvm_engines = fidelity.TvmEngines(args.target, "int8", args.records)
    table: dict[str, dict[str, tuple[float, int] | str]] = {c.key: {} for c in cases}
    runners: dict[tuple[str, str], object] = {}
    # Every engine of every case once per pass, each keeping its best median: this machine's
    # speed drifts by up to 2x over minutes, and a single pass compared engines measured in
    # different phases of it (ONNX Runtime fp32 on rec read 12.8 and 26.4 ms in two runs).
    for n_pass in range(1, args.passes + 1):
        for case in cases:
            for engine in engines:
                key = (case.key, engine)
                if isinstance(table[case.key].get(engine), str):
                    continue  # failed before
                try:
                    t0 = time.perf_counter()
                    if key not in runners:
                        if engine == "ort-fp32":
                            runners[key] = peers.ort_fp32(case.path, case.shape, args.threads)
                        else:
                            runners[key] = fidelity.make_engine(engine, case, args.threads,
                                                                tvm_engines)
                    prep = time.perf_counter() - t0
                    ms, n = median_ms(runners[key], case.eval[0], args.repeat, args.budget)
                    best = table[case.key].get(engine)
                    if best is None or ms < best[0]:
                        table[case.key][engine] = (ms, n)
                    # the engine's threads (ONNX Runtime's spin after each run) must not
                    # steal the cores of the next engine on a small machine: pause
                    gc.collect()
                    time.sleep(1.0)
                    _log(f"pass {n_pass} {case.key} {engine}: {ms:.2f} ms "
                         f"(prepared in {prep:.0f} s)")
                except Exception as exc:  # a missing peer or records: say so in the table
                    table[case.key][engine] = \
                        f"{type(exc).__name__}: {exc}".splitlines()[0][:90]
                    _log(f"{case.key} {engine}: FAILED {table[case.key][engine]}")
    runners.clear()
    gc.collect()

    peak = None
    kernels: list[str] = []
    if args.kernels and fidelity._cpu() and "avx512_vnni" in Path("/proc/cpuinfo").read_text():
        import vnni_peak

        peak = vnni_peak.measure_peak(args.threads)[0]
        for case in cases:
            if case.kind != "cls":
                kernels += kernel_rows(case, tvm_engines, peak, args.kernels)

    text = render(cases, engines, table, peak, kernels, args)
    print(text)
    fidelity.write_atomic(args.out, text)
    _log(f"wrote {args.out}")
    return 0


def _non_default_options(args) -> str:
    """The options of the command line above that were not their defaults."""
    extra = ""
    if args.engines != ",".join(ENGINES):
        extra += f" --engines {args.engines}"
    if args.out != HERE / "README.md":
        extra += f" --out {args.out}"
    return extra


def render(cases, engines, table, peak, kernels, args) -> str:
    title = {**fidelity_titles(), **TITLES}
    lines = [
        "# Benchmarks",
        "",
        "Latency of PP-OCR models, batch 1, every engine measured in the same run on the same",
        f"machine. Generated {datetime.datetime.now().isoformat(timespec='seconds')} by",
        f"`python benchmarks/speed.py --models {args.models} --det-sizes {args.det_sizes} "
        f"--threads {args.threads} --target {args.target} --passes {args.passes}"
        f"{_non_default_options(args)}`.",
        "",
        f"- Machine: {_machine()}, {args.threads} threads per engine.",
        f"- Software: {_versions()}.",
        f"- Median of up to {args.repeat} runs after warm-up (at most {args.budget:.0f} s per "
        f"engine and model), the best of {args.passes} passes over all engines in turn (the "
        "machine's speed drifts over minutes); the speed-up is over ONNX Runtime fp32 in the "
        "same run.",
        "- Fidelity of the quantized engines against float: `fidelity.md` (same peers, same "
        "calibration data).",
        "",
        "## End to end: median ms (speed-up over ORT fp32)",
        "",
        "| engine | " + " | ".join(c.key for c in cases) + " |",
        "|---|" + "---:|" * len(cases),
    ]
    for engine in engines:
        cells = []
        for case in cases:
            res = table[case.key].get(engine)
            ref = table[case.key].get("ort-fp32")
            if isinstance(res, tuple):
                ratio = (f" ({ref[0] / res[0]:.2f}x)" if isinstance(ref, tuple) and
                         engine != "ort-fp32" else "")
                cells.append(f"{res[0]:.2f}{ratio}")
            elif res and "no tuning records" in res:
                cells.append("not tuned")
            else:
                cells.append(f"n/a: {res}" if res else "-")
        lines.append(f"| {title.get(engine, engine)} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios between the int8 engines (same run):", ""]
    for case in cases:
        row = table[case.key]
        best = [e for e in ("tvmquant-int8-tuned", "tvmquant-int8")
                if isinstance(row.get(e), tuple)]
        if not best:
            continue
        ours = row[best[0]][0]
        parts = [f"{row[p][0] / ours:.2f}x {title.get(p, p)}" for p in
                 ("ort-fp32", "ort-int8", "ov-fp32", "ov-int8", "tvm-fp32")
                 if isinstance(row.get(p), tuple)]
        lines.append(f"- {case.key}: {title.get(best[0])} runs " + ", ".join(parts)
                     + " as fast as each (below 1x: slower).")
    if peak:
        lines += [
            "",
            "## Kernels: the largest integer layers against the VNNI peak",
            "",
            f"Measured `vpdpbusd` peak on this CPU, {args.threads} threads: {peak:.0f} GOP/s "
            "(`vnni_peak.py`: a register-only loop, 2 ops per u8*s8 product). Each layer is "
            "timed inside the model (default schedules; the instrumentation hook adds a few "
            "microseconds per call, so small layers read low).",
            "",
            "| model | layer | MOP | us | GOP/s | % of peak |",
            "|---|---|---:|---:|---:|---:|",
            *kernels,
        ]
    return "\n".join(lines) + "\n"


def fidelity_titles() -> dict[str, str]:
    import fidelity

    return fidelity.ENGINE_TITLES


def _machine() -> str:
    import fidelity

    return f"{fidelity._cpu()} ({os.cpu_count()} logical CPUs)"


def _versions() -> str:
    import fidelity

    return fidelity._versions()


if __name__ == "__main__":
    sys.exit(main())
