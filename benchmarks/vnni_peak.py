"""VNNI peak and the int8 dense kernel's speed on this CPU.

    .venv/bin/python benchmarks/vnni_peak.py [--quick] [--no-relax]

    .venv/bin/python benchmarks/vnni_peak.py --threads 2   # 1 and 2 threads (default: all)

1. ``vpdpbusd`` peak: a TIR kernel keeping ``NACC`` independent zmm accumulators in registers,
   each updated by one ``vpdpbusd`` per loop iteration (no memory traffic in the loop), on 1
   and 2 threads. GOP/s counts 2 ops (multiply + add) per u8 x s8 product: 128 per
   ``vpdpbusd zmm``.
2. tvmquant's dense kernel (``tvmquant.schedules.x86.int8_dense``, pre-packed weights) on
   1024^3, 512^3 and 1x4096x4096 (batch-1 GEMV), checked bit-exact against NumPy first, on 1
   and N threads, as a fraction of the peak at the same thread count; next to NumPy float32
   ``np.matmul`` (BLAS) and TVM's untuned ``relax.op.matmul(out_dtype="int32")`` (N threads).
3. tvmquant's conv2d kernel (bias + requantization to uint8 fused) on six PP-OCR/ResNet-like
   layers, NCHW in/out and NCHW16c in/out, also checked exact first.

Timings are the best of many repeats (``time_evaluator`` / ``perf_counter``): on a shared
machine the best run is the one least disturbed by other processes; the median is printed for
the peak. The reference N-thread peak is max(measured, N x the 1-thread peak): when another
process holds a core, the N-thread peak loop (whose time is its slowest thread's) reads low.
Each thread count runs in its own process (TVM's pool size is fixed at runtime start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# TVM's CPU thread pool defaults to half the logical CPUs on x86 (it assumes hyper-threading):
# 1 thread on a 2-vCPU machine, and its size is fixed when the runtime starts (resizing it
# later with runtime.config_threadpool proved unreliable), so every thread count is measured
# in a child process started with TVM_NUM_THREADS set.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import tvm
from tvm.script import tirx as T
from tvmquant.schedules.x86 import int8_dense as dense

TARGET = dense.default_target()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _has_vnni() -> bool:
    try:
        return "avx512_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def peak_kernel(nthreads: int, nacc: int):
    """``nacc`` independent vpdpbusd chains per thread, ``iters`` loop iterations."""
    n16 = nacc * 16

    @T.prim_func(s_tir=True)
    def peak(
        A: T.Buffer((64,), "uint8"),
        B: T.Buffer((64,), "int8"),
        C: T.Buffer((nthreads, n16), "int32"),
        iters: T.int32,
    ):
        T.func_attr({"global_symbol": "main"})
        for t in T.parallel(nthreads):
            with T.sblock("thread"):
                acc = T.sblock_alloc_buffer((n16,), "int32", scope="local")
                for j in T.unroll(nacc):
                    acc[T.ramp(j * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
                # operands loaded once, as immutable values: the loop touches no memory
                va: T.let = A[T.ramp(0, 1, 64)]
                vb: T.let = B[T.ramp(0, 1, 64)]
                for _it in range(iters):
                    for j in T.unroll(nacc):
                        acc[T.ramp(j * 16, 1, 16)] = T.call_llvm_pure_intrin(
                            "int32x16",
                            "llvm.x86.avx512.vpdpbusd.512",
                            acc[T.ramp(j * 16, 1, 16)],
                            va,
                            vb,
                        )
                for j in T.unroll(nacc):
                    C[t, T.ramp(j * 16, 1, 16)] = acc[T.ramp(j * 16, 1, 16)]

    return tvm.IRModule({"main": peak})


def measure_peak(nthreads: int, nacc: int = 12, iters: int = 20_000, repeat: int = 200):
    ex = tvm.compile(peak_kernel(nthreads, nacc), TARGET)
    asm = ex.mod.inspect_source("asm")
    assert "vpdpbusd" in asm, "peak kernel lost its vpdpbusd"
    a = tvm.runtime.tensor(np.full(64, 3, np.uint8))
    b = tvm.runtime.tensor(np.full(64, -2, np.int8))
    c = tvm.runtime.tensor(np.zeros((nthreads, nacc * 16), np.int32))
    ex.mod["main"](a, b, c, iters)
    assert (c.numpy() == 4 * 3 * -2 * iters).all(), "peak kernel computed the wrong sums"
    r = ex.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat)(a, b, c, iters)
    ops = 2 * 64 * nacc * iters * nthreads
    return ops / min(r.results) / 1e9, ops / float(np.median(r.results)) / 1e9


def _rand_inputs(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    return a, w


def measure_dense(m, n, k, repeat=30):
    a, w = _rand_inputs(m, n, k)
    ex = dense.build_int8_dense(m, n, k)
    args = [tvm.runtime.tensor(a), tvm.runtime.tensor(dense.pack_weight(w, "NK")),
            tvm.runtime.tensor(np.zeros((m, n), np.int32))]
    ex.mod["main"](*args)
    ref = a.astype(np.int64) @ w.astype(np.int64).T
    if not np.array_equal(args[-1].numpy(), ref):
        raise AssertionError(f"dense kernel {m}x{n}x{k} is NOT exact: refusing to time it")
    number = max(1, int(2e8 // (2 * m * n * k)))
    r = ex.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args)
    ops = 2 * m * n * k
    return ops / min(r.results) / 1e9, ops / float(np.median(r.results)) / 1e9


def measure_numpy(m, n, k, repeat=30):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    np.matmul(a, b)
    number = max(1, int(2e8 // (2 * m * n * k)))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            np.matmul(a, b)
        times.append((time.perf_counter() - t0) / number)
    ops = 2 * m * n * k
    return ops / min(times) / 1e9, ops / float(np.median(times)) / 1e9


def measure_relax_untuned(m, n, k, repeat=3):
    """TVM's default legalized ``matmul(u8, s8, out_dtype=int32)``, no schedule, no tuning."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "uint8"))
    y = relax.Var("y", relax.TensorType((k, n), "int8"))
    with bb.function("main", [x, y]):
        out = bb.emit(relax.op.matmul(x, y, out_dtype="int32"))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    a, w = _rand_inputs(m, n, k)
    args = [tvm.runtime.tensor(a), tvm.runtime.tensor(np.ascontiguousarray(w.T))]
    got = vm["main"](*args).numpy()
    if not np.array_equal(got, a.astype(np.int64) @ w.astype(np.int64).T):
        raise AssertionError("untuned relax matmul is not exact")
    r = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat)(*args)
    ops = 2 * m * n * k
    return ops / min(r.results) / 1e9, ops / float(np.median(r.results)) / 1e9


def measure_conv(case, data_layout, out_layout, repeat=30):
    """tvmquant's conv kernel with the fused requantization epilogue (uint8 out), exact first."""
    from tvmquant.schedules.x86 import int8_conv2d as conv

    from tvmquant.numerics import dyadic

    n, c, h, w, o, kh, kw, s = case
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    bias = rng.integers(-(2**16), 2**16, o).astype(np.int32)
    d = dyadic(rng.uniform(1e-4, 1e-3, o))
    rq = dense.Requant(3, 0, 255, "uint8")
    ex = conv.build_int8_conv2d(n, c, h, w, o, kh, kw, s, data_layout=data_layout,
                                out_layout=out_layout, bias=True, requant=rq)
    oh, ow = conv.conv_output_size(h, w, kh, kw, s)
    xin = x if data_layout == "NCHW" else conv.pack_input(x, 16)
    oshape = (n, o, oh, ow) if out_layout == "NCHW" else (n, -(-o // 16), oh, ow, 16)
    args = [tvm.runtime.tensor(v) for v in (xin, conv.pack_conv_weight(wt), bias,
                                            d.m0.astype(np.int32), d.shift.astype(np.int32),
                                            np.zeros(oshape, np.uint8))]
    ex.mod["main"](*args)
    got = args[-1].numpy()
    if out_layout != "NCHW":
        got = conv.unpack_output(got, o)
    acc = conv.conv2d_reference(x, wt, s).astype(np.int32)
    ref = dense.epilogue_reference(acc, bias, d.m0, d.shift, rq, axis=1)
    if not np.array_equal(got, ref):
        raise AssertionError(f"conv kernel {case} is NOT exact: refusing to time it")
    ops = 2 * n * o * oh * ow * c * kh * kw
    number = max(1, int(1e8 // ops))
    r = ex.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args)
    return ops / min(r.results) / 1e9


CONV_CASES = [  # n, c, h, w (padded), o, kh, kw, stride: PP-OCR / ResNet-like layers
    (1, 16, 80, 80, 64, 1, 1, 1),
    (1, 96, 40, 40, 96, 1, 1, 1),
    (1, 32, 162, 162, 32, 3, 3, 1),
    (1, 64, 58, 58, 64, 3, 3, 1),
    (1, 128, 57, 57, 128, 3, 3, 2),
    (1, 256, 14, 14, 256, 1, 1, 1),
]
DENSE_SHAPES = [(1024, 1024, 1024), (512, 512, 512), (1, 4096, 4096)]


def worker(opts) -> dict:
    """All measurements at this process's thread count (TVM_NUM_THREADS, fixed at start)."""
    nth = int(os.environ["TVM_NUM_THREADS"])
    rep = 8 if opts.quick else 40
    res = {"threads": nth, "peak": measure_peak(nth, repeat=5 * rep), "dense": {}, "conv": {}}
    for m, n, k in DENSE_SHAPES:
        key = f"{m}x{n}x{k}"
        row = {"tvmquant": measure_dense(m, n, k, repeat=rep)}
        if opts.baselines:
            row["numpy"] = measure_numpy(m, n, k, repeat=rep)
            if not opts.no_relax:
                row["relax"] = measure_relax_untuned(m, n, k, repeat=2 if opts.quick else 3)
        res["dense"][key] = row
    if not opts.no_conv:
        for case in CONV_CASES:
            res["conv"][",".join(map(str, case))] = [
                measure_conv(case, "NCHW", "NCHW", repeat=rep),
                measure_conv(case, "NCHW16c", "NCHW16c", repeat=rep),
            ]
    return res


def _spawn(nthreads: int, opts, baselines: bool) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(nthreads))
    cmd = [sys.executable, __file__, "--worker"]
    cmd += ["--quick"] * opts.quick + ["--no-relax"] * opts.no_relax + ["--no-conv"] * opts.no_conv
    cmd += ["--baselines"] * baselines
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-relax", action="store_true", help="skip TVM's untuned matmul")
    ap.add_argument("--no-conv", action="store_true", help="skip the conv2d rows")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="the multi-thread count (default: all logical CPUs)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--baselines", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if not _has_vnni():
        raise SystemExit("this CPU has no avx512_vnni (per /proc/cpuinfo): nothing to measure")
    if opts.worker:  # TVM's pool size is fixed when the runtime starts: one process per count
        print(json.dumps(worker(opts)))
        return
    print(f"CPU: {_cpu_name()}, {os.cpu_count()} logical CPUs; TVM {tvm.__version__}; "
          f"target {TARGET}")
    try:
        load = open("/proc/loadavg").read().split()[:3]
        print(f"load average before the run: {' '.join(load)} (other processes disturb timings)")
    except OSError:
        pass
    threads = sorted({1, opts.threads})
    runs = {t: _spawn(t, opts, baselines=(t == opts.threads)) for t in threads}
    # Reference peak per thread count: the measured one, or t x the 1-thread peak when other
    # processes kept the t-thread measurement lower (t cores cannot do less than that).
    one = runs[1]["peak"][0]
    peaks = {t: max(runs[t]["peak"][0], t * one) for t in threads}
    multi = runs[opts.threads]

    print("\n## vpdpbusd peak (register-only loop, 12 accumulators per thread)\n")
    print("| threads | best GOP/s | median GOP/s | reference peak used below |")
    print("|---:|---:|---:|---:|")
    for t in threads:
        print(f"| {t} | {runs[t]['peak'][0]:.0f} | {runs[t]['peak'][1]:.0f} | {peaks[t]:.0f} |")

    print("\n## dense u8·s8→s32 (pre-packed weights), best of repeats; % of the reference peak "
          "at the same thread count\n")
    head = " | ".join(f"tvmquant VNNI {t} thr GOP/s (% peak)" for t in threads)
    print(f"| M x N x K | {head} | NumPy f32 matmul {opts.threads} thr GFLOP/s | "
          f"TVM untuned int8 matmul {opts.threads} thr GOP/s |")
    print("|---|" + "---:|" * (len(threads) + 2))
    for m, n, k in DENSE_SHAPES:
        key = f"{m}x{n}x{k}"
        cells = [f"{runs[t]['dense'][key]['tvmquant'][0]:.0f} "
                 f"({100 * runs[t]['dense'][key]['tvmquant'][0] / peaks[t]:.0f}%)"
                 for t in threads]
        row = multi["dense"][key]
        rel = f"{row['relax'][0]:.1f}" if "relax" in row else "-"
        print(f"| {key} | {' | '.join(cells)} | {row['numpy'][0]:.0f} | {rel} |")
    g = multi["dense"]["1x4096x4096"]["tvmquant"][0]
    print(f"\nGEMV 1x4096x4096 reads 16 MiB of packed weights per call: {g / 2:.0f} GB/s at "
          f"{g:.0f} GOP/s ({opts.threads} threads): bound by memory (L3 here), not by vpdpbusd.")

    if not opts.no_conv:
        print("\n## conv2d u8·s8 + bias + requant → u8, GOP/s (% of the reference peak at "
              "that thread count)\n")
        head = " | ".join(f"NCHW→NCHW {t} thr | NCHW16c→NCHW16c {t} thr" for t in threads)
        print(f"| N,C,H,W (padded) → O, KHxKW/stride | {head} |")
        print("|---|" + "---:|" * (2 * len(threads)))
        for case in CONV_CASES:
            n, c, h, w, o, kh, kw, s = case
            cells = []
            for t in threads:
                a, b = runs[t]["conv"][",".join(map(str, case))]
                cells += [f"{a:.0f} ({100 * a / peaks[t]:.0f}%)",
                          f"{b:.0f} ({100 * b / peaks[t]:.0f}%)"]
            print(f"| {n},{c},{h},{w} → {o}, {kh}x{kw}/{s} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
