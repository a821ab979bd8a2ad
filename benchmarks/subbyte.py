"""Below 8 bits, measured: sub-byte weight GEMV and bit-serial popcount dense vs int8 and fp32.

    .venv/bin/python benchmarks/subbyte.py [--threads 2] [--out benchmarks/subbyte.md]

Every kernel is first checked exact against NumPy on the inputs it is timed with. Rows:

1. Batch-1 matmul of an LLM-like shape, 1x4096 . 4096x4096: weights int8 / int4 / int2 in the
   same VNNI GEMV kernel (``tvmquant.schedules.x86.subbyte_gemv``), plus tvmquant's int8 dense
   kernel and NumPy fp32 (BLAS). Timed twice: with the weights hot in cache (one matrix, as
   ``time_evaluator`` does), and cold (rotating over 12 different matrices, 48-192 MB, so
   each call streams its weights from memory as successive LLM layers do).
2. Dense layers on popcount (``bitserial_dense``): binary (XNOR), ternary, 2-bit x 2-bit,
   against tvmquant's int8 VNNI dense and fp32 (NumPy BLAS and TVM with tvmquant's default
   schedule) on the same shapes: a 3x3 convolution of 64->64 channels on 56x56 pixels as
   its im2col matmul (3136 x 576 . 576 x 64; the im2col itself is not timed) and a fully
   connected 1x4096 . 4096x4096.
3. A whole 3x3 convolution (64->64 channels, 56x56): bit-serial (packing im2col + popcount
   dense; binary XNOR, binary x ternary, unipolar few-bit) against tvmquant's int8 VNNI
   convolution, fp32 TVM (tvmquant's default schedule) and fp32 ONNX Runtime (MLAS, the
   hand-tuned fp32 baseline).
4. Weight bytes per precision.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _best_us(f, args, number=20, repeat=7) -> float:
    import tvm

    t = f.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args)
    return float(np.median(t.results)) * 1e6


def _cold_us(func, a, weights, out, rounds=15) -> float:
    for w in weights:
        func(a, w, out)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for w in weights:
            func(a, w, out)
        times.append((time.perf_counter() - t0) / len(weights))
    return float(np.median(times)) * 1e6


def gemv_rows(target, rng) -> list[str]:
    import tvm
    from tvmquant.schedules.x86 import int8_dense
    from tvmquant.schedules.x86 import subbyte_gemv as sb

    m, n, k = 1, 4096, 4096
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    ta = tvm.runtime.tensor(a)
    rows, base_hot, base_cold = [], None, None
    for bits in (8, 4, 2):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        ws = [rng.integers(lo, hi + 1, (n, k)).astype(np.int8) for _ in range(12)]
        packed = [tvm.runtime.tensor(sb.pack_subbyte(w, bits)) for w in ws]
        func = tvm.compile(sb.subbyte_gemv(m, n, k, bits), target).mod
        out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
        func["main"](ta, packed[0], out)
        assert np.array_equal(out.numpy(), sb.gemv_reference(a, ws[0])), f"w{bits} wrong"
        hot = _best_us(func, [ta, packed[0], out])
        cold = _cold_us(func["main"], ta, packed, out)
        base_hot, base_cold = base_hot or hot, base_cold or cold
        mb = packed[0].numpy().nbytes / 2**20
        rows.append(f"| w{bits}a8 GEMV (tvmquant, VNNI) | {mb:.0f} MiB | {hot:.0f} | "
                    f"{base_hot / hot:.2f}x | {cold:.0f} | {base_cold / cold:.2f}x |")
    # tvmquant's general int8 dense kernel and fp32 BLAS on the same shape
    w8 = rng.integers(-128, 128, (n, k)).astype(np.int8)
    ex = int8_dense.build_int8_dense(m, n, k, target=target)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    wd = tvm.runtime.tensor(int8_dense.pack_weight(w8, "NK"))
    ex.mod["main"](ta, wd, out)
    assert np.array_equal(out.numpy(), (a.astype(np.int64) @ w8.T.astype(np.int64)))
    hot = _best_us(ex.mod, [ta, wd, out])
    rows.append(f"| int8 dense (tvmquant, VNNI, general kernel) | 16 MiB | {hot:.0f} | "
                f"{base_hot / hot:.2f}x | - | - |")
    af, wf = a.astype(np.float32), [w.astype(np.float32) for w in (w8,)]
    t = []
    for _ in range(50):
        t0 = time.perf_counter()
        af @ wf[0].T
        t.append(time.perf_counter() - t0)
    hot = float(np.median(t)) * 1e6
    rows.append(f"| fp32 (NumPy BLAS) | 64 MiB | {hot:.0f} | {base_hot / hot:.2f}x | - | - |")
    return rows


def _tvm_fp32_dense(m, n, k, target):
    import tvm
    from tvm import relax
    from tvmquant.schedules.pipeline import build

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    return relax.VirtualMachine(build(bb.get(), target), tvm.cpu())


def bitserial_rows(target, rng) -> list[str]:
    import tvm
    from tvmquant.schedules.x86 import bitserial_dense as bs
    from tvmquant.schedules.x86 import int8_dense

    rows = []
    for label, (m, n, k) in (("3x3 conv 64->64 @56x56 (im2col GEMM)", (3136, 64, 576)),
                             ("fully connected 1x4096x4096", (1, 4096, 4096))):
        times = {}
        # int8 VNNI
        a8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
        w8 = rng.integers(-128, 128, (n, k)).astype(np.int8)
        ex = int8_dense.build_int8_dense(m, n, k, target=target)
        args = [tvm.runtime.tensor(a8), tvm.runtime.tensor(int8_dense.pack_weight(w8, "NK")),
                tvm.runtime.tensor(np.zeros((m, n), np.int32))]
        ex.mod["main"](*args)
        assert np.array_equal(args[2].numpy(), a8.astype(np.int64) @ w8.T.astype(np.int64))
        times["int8"] = _best_us(ex.mod, args, number=5)
        # fp32: BLAS and TVM (default schedules)
        af, wf = a8.astype(np.float32), w8.astype(np.float32).T.copy()
        t = []
        for _ in range(20):
            t0 = time.perf_counter()
            af @ wf
            t.append(time.perf_counter() - t0)
        times["blas"] = float(np.median(t)) * 1e6
        vm = _tvm_fp32_dense(m, n, k, target)
        xs = [tvm.runtime.tensor(af), tvm.runtime.tensor(wf)]
        times["tvm"] = float(np.median(vm.time_evaluator("main", tvm.cpu(), number=3,
                                                          repeat=5)(*xs).results)) * 1e6
        # popcount kernels
        for name, mode, abits, wbits in (("binary (xnor)", "xnor", 1, 1),
                                         ("ternary weights", "ternary", 1, 2),
                                         ("2-bit x 2-bit", "unipolar", 2, 2)):
            if mode == "unipolar":
                a, w = rng.integers(0, 4, (m, k)), rng.integers(-2, 2, (n, k))
                ap, wp = bs.encode(a, mode, 2), bs.encode(w, mode, 2)
            else:
                a = rng.choice([-1, 1], (m, k))
                w = rng.choice([-1, 0, 1] if mode == "ternary" else [-1, 1], (n, k))
                ap = bs.encode(a, "xnor")
                wp = bs.encode(w, "ternary-weight" if mode == "ternary" else "xnor")
            ex = tvm.compile(bs.bitserial_dense(m, n, k, mode=mode, abits=abits,
                                                wbits=wbits), target)
            args = [tvm.runtime.tensor(ap), tvm.runtime.tensor(wp),
                    tvm.runtime.tensor(np.zeros((m, n), np.int32))]
            ex.mod["main"](*args)
            assert np.array_equal(args[2].numpy(), bs.reference(a, w)), f"{name} wrong"
            times[name] = _best_us(ex.mod, args, number=5)
        for key, title in (("blas", "fp32 (NumPy BLAS)"),
                           ("tvm", "fp32 (TVM, tvmquant default schedule)"),
                           ("int8", "int8 (tvmquant VNNI)"),
                           ("binary (xnor)", "binary, XNOR + popcount"),
                           ("ternary weights", "ternary weights, popcount"),
                           ("2-bit x 2-bit", "2-bit x 2-bit bit-serial")):
            us = times[key]
            rows.append(f"| {label} | {title} | {us:.0f} | {times['blas'] / us:.2f}x | "
                        f"{times['tvm'] / us:.2f}x | {times['int8'] / us:.2f}x |")
    return rows


def bitserial_conv_rows(target, rng, fp32_trials: int = 0) -> list[str]:
    """A whole 3x3 convolution 64->64 on 56x56 (pad 1): packing im2col + popcount dense
    against tvmquant's int8 VNNI direct convolution and fp32 TVM (default schedules)."""
    import tvm
    from tvm import relax
    from tvmquant.schedules.pipeline import build
    from tvmquant.schedules.x86 import bitserial_dense as bs
    from tvmquant.schedules.x86 import int8_conv2d as ic

    n, c, h, w, o, k = 1, 64, 56, 56, 64, 3
    rows_, red = n * h * w, c * k * k
    times = {}
    a8 = rng.integers(0, 256, (n, c, h + 2, w + 2)).astype(np.uint8)  # (padded input)
    w8 = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    ex = ic.build_int8_conv2d(n, c, h + 2, w + 2, o, k, k, 1, target=target)
    args = [tvm.runtime.tensor(a8), tvm.runtime.tensor(ic.pack_conv_weight(w8)),
            tvm.runtime.tensor(np.zeros((n, o, h, w), np.int32))]
    ex.mod["main"](*args)
    times["int8"] = _best_us(ex.mod, args, number=5)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, c, h, w), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(
                x, relax.const(w8.astype(np.float32)), padding=1)))
        bb.emit_func_output(out)
    fp32_mod = bb.get()
    vm = relax.VirtualMachine(build(fp32_mod, target), tvm.cpu())
    xf = tvm.runtime.tensor(rng.normal(0, 1, (n, c, h, w)).astype(np.float32))
    times["fp32"] = float(np.median(vm.time_evaluator("main", tvm.cpu(), number=3,
                                                       repeat=5)(xf).results)) * 1e6
    if fp32_trials:  # MetaSchedule (XGBoost cost model) on this conv, resumable work dir
        from tvmquant.tuning import records_database, tune

        work = HERE / "records" / f"fp32-conv3x3-{target.attrs.get('mcpu', 'cpu')}"
        tune(fp32_mod, target, work, trials=fp32_trials, progress=False, end_to_end=False)
        tuned = relax.VirtualMachine(build(fp32_mod, target,
                                           database=records_database(work)), tvm.cpu())
        want = vm["main"](xf).numpy()
        assert np.allclose(tuned["main"](xf).numpy(), want, rtol=1e-4, atol=1e-3 *
                           np.abs(want).max()), "tuned fp32 conv wrong"
        times["fp32 tuned"] = float(np.median(tuned.time_evaluator(
            "main", tvm.cpu(), number=3, repeat=5)(xf).results)) * 1e6
    times["fp32 ort"] = _ort_conv_us(w8.astype(np.float32), xf.numpy())
    from tvmquant.schedules.x86.dispatch_subbyte import padding_correction, sign_planes

    cases = [("a1w2 nhwc", "unipolar", 1, 2, "nhwc"), ("a1w2 im2col", "unipolar", 1, 2, "im2col"),
             ("a2w2 nhwc", "unipolar", 2, 2, "nhwc"), ("xnor nhwc", "xnor", 1, 1, "nhwc"),
             ("ternary nhwc", "ternary", 1, 2, "nhwc")]
    for key, mode, abits, wbits, packing in cases:
        if mode == "unipolar":
            a = rng.integers(0, 1 << abits, (n, c, h, w)).astype(np.uint8)
            wt = rng.integers(-(1 << (wbits - 1)), 1 << (wbits - 1), (o, c, k, k))
            dtype, offset = "uint8", 0
        else:  # binary -1/+1 activation codes (int8, sign bit packed)
            a = np.where(rng.random((n, c, h, w)) < 0.5, -1, 1).astype(np.int8)
            wt = rng.integers(-1, 2, (o, c, k, k)) if mode == "ternary" else \
                np.where(rng.random((o, c, k, k)) < 0.5, -1, 1)
            dtype, offset = "int8", 7
        wt = wt.astype(np.int8)
        ap = np.pad(a.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        ref = sum(np.einsum("nchw,oc->nohw", ap[:, :, i:i + h, j:j + w],
                            wt[:, :, i, j].astype(np.int64)) for i in range(k) for j in range(k))
        if packing == "nhwc":  # AVX2 vpmovmskb, 64 channels of a pixel per word
            data = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
            pack = tvm.compile(bs.bitpack_conv_nhwc_kernel(n, h, w, c, k, k, 1, (1, 1, 1, 1),
                                                           abits, dtype, offset), target)
            wp = bs.pack_conv_weight_nhwc(wt, wbits) if mode == "unipolar" else \
                sign_planes(wt, mode, bs.pack_conv_weight_nhwc)
        else:  # portable: bit-by-bit gather
            data = a
            pack = tvm.compile(bs.bitpack_im2col_kernel(n, c, h, w, k, k, 1, (1, 1, 1, 1),
                                                        abits, dtype, offset), target)
            wp = bs.bitpack(wt.reshape(o, red), wbits)
        wp = tvm.runtime.tensor(wp)
        dense = tvm.compile(bs.bitserial_dense(rows_, o, red, mode=mode, abits=abits,
                                               wbits=wbits), target)
        planes = tvm.runtime.tensor(np.zeros((abits, rows_, bs.padded_words(red)), np.uint64))
        out = tvm.runtime.tensor(np.zeros((rows_, o), np.int32))
        ta = tvm.runtime.tensor(data)
        pack.mod["main"](ta, planes)
        dense.mod["main"](planes, wp, out)
        got = out.numpy().reshape(n, h, w, o)
        if mode != "unipolar":  # the padding packed as +1: the graph adds this constant
            got = got + padding_correction(wt, h, w, 1, (1, 1, 1, 1))[None]
        assert np.array_equal(got.transpose(0, 3, 1, 2), ref), f"bit-serial conv {key} wrong"
        tp = _best_us(pack.mod, [ta, planes], number=5)
        td = _best_us(dense.mod, [planes, wp, out], number=5)
        times[key] = (tp, td)
    bases = [("fp32 TVM", times["fp32"]), ("fp32 ORT", times["fp32 ort"]),
             ("int8", times["int8"])]
    if fp32_trials:
        bases.insert(1, ("fp32 TVM tuned", times["fp32 tuned"]))
    rows = ["| kernel | us | of which packing | "
            + " | ".join(f"vs {name}" for name, _ in bases) + " |",
            "|---|---:|---:|" + "---:|" * len(bases)]

    def row(title, us, packing="-"):
        rows.append(f"| {title} | {us:.0f} | {packing} | "
                    + " | ".join(f"{t / us:.2f}x" for _, t in bases) + " |")

    row("fp32 (TVM, tvmquant default schedule)", times["fp32"])
    if fp32_trials:
        row(f"fp32 (TVM, MetaSchedule-tuned, {fp32_trials} trials)", times["fp32 tuned"])
    row("fp32 (ONNX Runtime, MLAS)", times["fp32 ort"])
    row("int8 (tvmquant VNNI direct conv)", times["int8"])
    for key, title in (("xnor nhwc", "binary x binary, XNOR (NHWC packing)"),
                       ("ternary nhwc", "binary activations x ternary weights (NHWC packing)"),
                       ("a1w2 nhwc", "1-bit {0,1} activations x 2-bit weights (NHWC packing)"),
                       ("a1w2 im2col", "1-bit {0,1} activations x 2-bit weights (portable "
                                       "packing)"),
                       ("a2w2 nhwc", "2-bit x 2-bit (NHWC packing)")):
        tp, td = times[key]
        row(f"{title}, bit-serial", tp + td, f"{tp:.0f}")
    return rows


def _ort_conv_us(wf: np.ndarray, x: np.ndarray) -> float:
    """The same convolution in ONNX Runtime fp32 (MLAS), on this process's threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(wf, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    # no spinning threads left behind to slow the TVM kernels timed after this
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    time.sleep(1.0)  # and TVM's own pool gone idle before this is timed
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feed = {"x": x}
    sess.run(None, feed)
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(5):
            sess.run(None, feed)
        samples.append((time.perf_counter() - t0) / 5)
    return float(np.median(samples)) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "subbyte.md")
    p.add_argument("--fp32-trials", type=int, default=0,
                   help="also tune TVM's fp32 convolution with MetaSchedule for this many "
                        "trials (records kept under benchmarks/records/, resumable)")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import tvm

    sys.path.insert(0, str(HERE))
    import fidelity

    if "avx512_vnni" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this CPU has no AVX-512 VNNI (per /proc/cpuinfo): nothing to measure")
    target = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server",
                                "num-cores": args.threads})
    rng = np.random.default_rng(0)
    lines = [
        "# Below 8 bits: measured",
        "",
        f"`python benchmarks/subbyte.py --threads {args.threads}` on {fidelity._cpu()} "
        f"({os.cpu_count()} logical CPUs), {args.threads} threads; median times in "
        "microseconds. Every kernel was checked exact against NumPy first.",
        "",
        "## Batch-1 matmul 1x4096 . 4096x4096",
        "",
        "| kernel | weights | hot us | speed-up vs w8 | cold us | speed-up vs w8 |",
        "|---|---:|---:|---:|---:|---:|",
        *gemv_rows(target, rng),
        "",
        "## Dense layers on popcount",
        "",
        "| layer | kernel | us | vs fp32 BLAS | vs fp32 TVM | vs int8 |",
        "|---|---|---:|---:|---:|---:|",
        *bitserial_rows(target, rng),
        "",
        "## A whole convolution: 3x3, 64->64 channels, 56x56, padding 1",
        "",
        "Bit-serial: the run-time packing of the activations with the patch gather "
        "(NHWC: `bitpack_conv_nhwc_kernel`, 64 channels of a pixel per word with AVX2 "
        "`vpmovmskb`; portable: `bitpack_im2col_kernel`, bit by bit) plus the popcount "
        "dense; int8: the VNNI direct convolution on a pre-padded input.",
        "",
        *bitserial_conv_rows(target, rng, args.fp32_trials),
        "",
        "Binary rows: activations are -1/+1 codes (`QuantSpec.binary()`), the packing takes "
        "their sign bits, and the zero padding is corrected afterwards by a constant (not "
        "timed: one add that FuseOps folds into the next op). `{0,1}` rows: unipolar "
        "activations (`QuantSpec(bits=1, signed=False)`) as in the bit-serial formulation.",
        "",
        "Weight bytes for 4096x4096: fp32 64 MiB, int8 16 MiB, int4 8 MiB, int2 4 MiB, "
        "ternary 4 MiB (two bit planes), binary 2 MiB.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    fidelity.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
