"""Default CPU schedules (tvmquant.schedules.cpu) and the build pipeline.

Structure: each rule claims the kernels it is for (and only those) and produces parallel,
vectorized loops in the places its docstring promises. Numbers: every kernel built through
the pipeline computes exactly what TVM's unscheduled kernel computes, on fresh random inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from helpers import one_input_module
from tvm import relax, tirx
from tvmquant.schedules.cpu import Injective, RowReduction, SpatialReduction
from tvmquant.schedules.pipeline import build, build_pipeline

import tvmquant
from tvmquant.testing import random_inputs, small_convnet

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})


def _module(shape, dtype, body):
    return one_input_module(body, shape, dtype)


def _requant(bb, acc, m0=12345, shift=16, zp=3):
    """The integer epilogue LowerToIntegerOnly writes: int64 multiply, shift, clamp, cast."""
    y = bb.emit(relax.op.astype(acc, "int64"))
    y = bb.emit(relax.op.multiply(y, relax.const(m0, "int64")))
    y = bb.emit(relax.op.add(y, relax.const(1 << (shift - 1), "int64")))
    y = bb.emit(relax.op.right_shift(y, relax.const(shift, "int64")))
    y = bb.emit(relax.op.clip(relax.op.add(y, relax.const(zp, "int64")), 0, 255))
    return bb.emit(relax.op.astype(y, "uint8"))


def _weight(rng, shape):
    return relax.const(rng.integers(-127, 128, shape).astype("int8"))


def depthwise(c=32, hw=(40, 40), k=3, stride=1):
    rng = np.random.default_rng(c * k + stride)

    def body(bb, x):
        p = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, k // 2, k // 2, k // 2, k // 2],
                                    pad_value=7.0))
        acc = bb.emit(relax.op.nn.conv2d(p, _weight(rng, (c, 1, k, k)), strides=stride,
                                         groups=c, out_dtype="int32"))
        bias = relax.const(rng.integers(-999, 999, (1, c, 1, 1)).astype("int32"))
        return _requant(bb, bb.emit(relax.op.add(acc, bias)))

    return _module((1, c, *hw), "uint8", body)


def conv_transpose(c=8, o=6, hw=(9, 11), k=3, stride=2):
    rng = np.random.default_rng(k)

    def body(bb, x):
        acc = bb.emit(relax.op.nn.conv2d_transpose(
            x, _weight(rng, (c, o, k, k)), strides=stride, out_dtype="int32"))
        return _requant(bb, acc, m0=999, shift=18)

    return _module((1, c, *hw), "uint8", body)


def avg_pool():
    def body(bb, x):
        y = bb.emit(relax.op.astype(x, "int32"))
        y = bb.emit(relax.op.nn.avg_pool2d(y, pool_size=3, strides=2, padding=1))
        return _requant(bb, y, m0=1 << 15, shift=15)

    return _module((1, 16, 21, 35), "uint8", body)


def global_mean():
    def body(bb, x):
        y = bb.emit(relax.op.sum(relax.op.astype(x, "int32"), axis=[2, 3], keepdims=True))
        return _requant(bb, y, m0=1 << 20, shift=30)

    return _module((1, 48, 12, 40), "uint8", body)


def lookup_table():
    table = relax.const(np.random.default_rng(3).integers(0, 256, 65536).astype("uint8"))

    def body(bb, x):
        idx = bb.emit(relax.op.subtract(relax.op.astype(x, "int32"),
                                        relax.const(-32768, "int32")))
        return bb.emit(relax.op.take(table, idx, axis=0, mode="clip"))

    return _module((1, 24, 30, 32), "int16", body)


def resize_concat():
    def body(bb, x):
        up = bb.emit(relax.op.image.resize2d(x, (34, 46), method="nearest_neighbor"))
        return bb.emit(relax.op.concat([up, relax.op.zeros_like(up)], axis=1))

    return _module((1, 5, 17, 23), "uint8", body)


def upsample_requant():
    """A detector neck's step: requantize a coarse map, upsample it (nearest), concat."""
    def body(bb, x):
        coarse = bb.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=[16, 32],
                                                strides=[2, 2]))
        coarse = _requant(bb, coarse, m0=98765, shift=17, zp=9)
        # as PP-OCR det's exported Resize: asymmetric coordinates, floor (an integer division)
        up = bb.emit(relax.op.image.resize2d(coarse, (16, 32), method="nearest_neighbor",
                                             coordinate_transformation_mode="asymmetric",
                                             rounding_method="floor"))
        return bb.emit(relax.op.concat([x, up], axis=1))

    return _module((1, 6, 16, 32), "uint8", body)


def softmax_output(rows=40, length=661):
    """A recognizer's last step: a float softmax over the classes, quantized as the output."""
    def body(bb, x):
        y = bb.emit(relax.op.nn.softmax(relax.op.multiply(x, relax.const(4.0)), axis=-1))
        scale, zp = relax.const(1 / 255, "float32"), relax.const(0, "int8")
        q = bb.emit(relax.op.quantize(y, scale, zp, axis=-1, out_dtype="uint8"))
        return bb.emit(relax.op.dequantize(q, scale, zp, axis=-1, out_dtype="float32"))

    return _module((rows, length), "float32", body)


def float_conv():
    w = relax.const(np.random.default_rng(4).standard_normal((12, 6, 3, 3)).astype("float32"))
    return _module((1, 6, 19, 25), "float32",
                   lambda bb, x: bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(
                       x, w, padding=1))))


CASES = {
    "depthwise-3x3-s1": depthwise,
    "depthwise-5x5-s2-odd": lambda: depthwise(c=24, hw=(13, 27), k=5, stride=2),
    "depthwise-narrow": lambda: depthwise(c=8, hw=(5, 3)),
    "depthwise-5x5-width-10": lambda: depthwise(c=48, hw=(10, 10), k=5),
    "depthwise-5x5-width-20": lambda: depthwise(c=24, hw=(7, 20), k=5),
    "depthwise-3x3-s2-deinterleaved": lambda: depthwise(c=16, hw=(12, 34), k=3, stride=2),
    "conv-transpose-3x3-s2": conv_transpose,
    "avg-pool": avg_pool,
    "global-mean": global_mean,
    "lookup-table-int16": lookup_table,
    "resize-concat": resize_concat,
    "pad-to-87": lambda: _module((1, 5, 7, 83), "uint8", lambda bb, x: bb.emit(
        relax.op.nn.pad(x, [0, 0, 0, 0, 2, 2, 2, 2], pad_value=17.0))),
    "resize-by-4-add": lambda: _module((1, 3, 5, 6), "uint8", lambda bb, x: bb.emit(
        relax.op.add(relax.op.image.resize2d(x, (20, 24), method="nearest_neighbor",
                                             coordinate_transformation_mode="asymmetric",
                                             rounding_method="floor"),
                     relax.const(np.arange(20 * 24, dtype="uint8").reshape(20, 24))))),
    "upsample-requant": upsample_requant,
    "softmax-661": softmax_output,
    "softmax-short-rows": lambda: _module(
        (3, 5, 40), "float32", lambda bb, x: bb.emit(relax.op.nn.softmax(x, axis=-1))),
    "float-conv-relu": float_conv,
}


def _input(mod, rng):
    ty = mod["main"].params[0].ty
    shape, dtype = [int(s) for s in ty.shape], str(ty.dtype)
    if dtype == "float32":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_scheduled_kernels_compute_what_default_kernels_compute(case):
    mod = CASES[case]()
    plain = relax.VirtualMachine(build(mod, TARGET, kernels=False, schedules=False), tvm.cpu())
    fast = relax.VirtualMachine(build(mod, TARGET, kernels=False), tvm.cpu())
    rng = np.random.default_rng()  # fresh inputs every run
    for _ in range(2):
        x = tvm.runtime.tensor(_input(mod, rng))
        want, got = plain["main"](x).numpy(), fast["main"](x).numpy()
        if want.dtype == np.float32:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# structure, without running anything
# --------------------------------------------------------------------------------------------
def _fused_kernels(mod):
    with TARGET:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()])(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc)}


def _loops(func) -> list[tirx.For]:
    found = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, found.append)], order="pre")
    return found


def _kernel(kernels, prefix):
    return next(f for name, f in kernels.items() if name.startswith(prefix))


def test_spatial_reduction_structure_depthwise():
    kernel = _kernel(_fused_kernels(depthwise()), "fused_conv2d")
    assert Injective().apply(kernel, TARGET, False) is None  # not an elementwise kernel
    sch = SpatialReduction().apply(kernel, TARGET, False)
    assert sch is not None
    loops = _loops(sch.mod["main"])
    kinds = [lp.kind for lp in loops]
    assert kinds[0] == tirx.ForKind.PARALLEL  # channels x rows, fused
    assert int(loops[0].extent) == 32 * 40
    vectorized = [lp for lp in loops if lp.kind == tirx.ForKind.VECTORIZED]
    # init, update (inside kh, kw) and the requantizing epilogue: each on a row of 8 outputs
    assert len(vectorized) == 3 and all(int(lp.extent) == 8 for lp in vectorized)
    text = sch.mod["main"].script()
    # the multiply-accumulate's innermost loop is the vectorized one, under the kernel loops
    update = text[text.index("for ax3, ax4 in T.grid(T.int64(3), T.int64(3))"):]
    assert update.splitlines()[1].strip().startswith("for ax2_1 in T.vectorized")


def test_spatial_reduction_global_mean_sums_rows_in_vectors():
    """A mean over H, W (one value per channel) is not vectorized over channels (a gather):
    each channel's rows are summed in 16 partial sums (rfactor), added up at the end."""
    kernel = _kernel(_fused_kernels(global_mean()), "fused_cast_sum")
    func = SpatialReduction().apply(kernel, TARGET, False).mod["main"]
    text = func.script()
    loops = _loops(func)
    assert loops[0].kind == tirx.ForKind.PARALLEL and int(loops[0].extent) == 48
    vectorized = [lp for lp in loops if lp.kind == tirx.ForKind.VECTORIZED]
    assert vectorized and all(int(lp.extent) == 8 for lp in vectorized)  # rows of 40: 5 x 8
    assert "_rf" in text and text.count("T.sblock_alloc_buffer") == 1


def test_spatial_reduction_leaves_alone_elementwise_and_softmax():
    kernels = _fused_kernels(lookup_table())
    assert all(SpatialReduction().apply(f, TARGET, False) is None for f in kernels.values())

    softmax = _module((1, 4, 8, 8), "float32",
                      lambda bb, x: bb.emit(relax.op.nn.softmax(x, axis=-1)))
    kernel = _kernel(_fused_kernels(softmax), "softmax")  # two reductions: max, then sum
    assert SpatialReduction().apply(kernel, TARGET, False) is None


def test_injective_structure():
    kernel = _kernel(_fused_kernels(lookup_table()), "fused_")
    sch = Injective().apply(kernel, TARGET, False)
    loops = _loops(sch.mod["main"])
    assert loops[0].kind == tirx.ForKind.PARALLEL
    assert loops[-1].kind == tirx.ForKind.VECTORIZED


def test_injective_vectorizes_a_row_no_vector_width_divides():
    """A zero-point pad to rows of 87 (rec's 5x5 depthwise inputs): 80 columns in vectors of
    16, the last 7 partitioned off."""
    mod = _module((1, 24, 12, 83), "uint8", lambda bb, x: bb.emit(
        relax.op.nn.pad(x, [0, 0, 0, 0, 2, 2, 2, 2], pad_value=17.0)))
    func = Injective().apply(_kernel(_fused_kernels(mod), "pad"), TARGET, False).mod["main"]
    loops = _loops(func)
    assert loops[0].kind == tirx.ForKind.PARALLEL
    assert [(lp.kind, int(lp.extent)) for lp in loops if lp.kind != tirx.ForKind.PARALLEL][-3:] \
        == [(tirx.ForKind.SERIAL, 5), (tirx.ForKind.VECTORIZED, 16), (tirx.ForKind.SERIAL, 7)]


def test_injective_computes_an_upsampled_value_once():
    """The requantized coarse map is materialized at its own 8x16 resolution (computed once
    per element), not recomputed for each of the four outputs that read it."""
    kernel = _kernel(_fused_kernels(upsample_requant()), "fused_")
    func = Injective().apply(kernel, TARGET, False).mod["main"]
    text = func.script()
    assert "sblock_alloc_buffer((T.int64(1), T.int64(6), T.int64(8), T.int64(16))" in text
    assert text.count("T.int64(98765)") == 1  # the multiplier appears in one block


def test_injective_reads_an_upsampled_input_in_steps_of_the_factor():
    """The block that reads the 2x-upsampled map runs its rows in unrolled steps of 2 and is
    left to LLVM's vectorizer (TVM's would load the upsampled input one lane at a time)."""
    kernel = _kernel(_fused_kernels(upsample_requant()), "fused_")
    func = Injective().apply(kernel, TARGET, False).mod["main"]
    loops = _loops(func)
    kinds = [(lp.kind, int(lp.extent)) for lp in loops]
    # the coarse map's block: vectorized; the concat reading it: rows of 32 as 16 x (2 unrolled)
    assert (tirx.ForKind.VECTORIZED, 16) in kinds
    assert kinds[-2:] == [(tirx.ForKind.SERIAL, 16), (tirx.ForKind.UNROLLED, 2)]
    assert loops[-3].kind == tirx.ForKind.PARALLEL


@pytest.mark.parametrize("fast_math", [False, True])
def test_row_reduction_structure_softmax(fast_math):
    """Rows shorter than 4 vectors: every step of a row computed inside one parallel loop
    over the rows, the elementwise steps vectorized."""
    mod = softmax_output(rows=400, length=50)
    if fast_math:
        mod = relax.transform.FastMathTransform()(mod)
    kernel = _kernel(_fused_kernels(mod), "fused_")
    assert Injective().apply(kernel, TARGET, False) is None
    assert SpatialReduction().apply(kernel, TARGET, False) is None  # two reductions
    func = RowReduction().apply(kernel, TARGET, False).mod["main"]
    loops = _loops(func)
    assert loops[0].kind == tirx.ForKind.PARALLEL and int(loops[0].extent) == 400
    assert sum(lp.kind == tirx.ForKind.PARALLEL for lp in loops) == 1
    vectorized = [lp for lp in loops if lp.kind == tirx.ForKind.VECTORIZED]
    # the exponential and the normalized, quantized output: 50 = 3 x 16 + a tail of 2
    assert len(vectorized) == 2 and all(int(lp.extent) == 16 for lp in vectorized)
    text = func.script()
    assert text.count("T.int64(3)") == 2 and "partition" in text
    exp = "fast_exp" if fast_math else "T.exp("
    assert exp in text and text.count("T.sblock_alloc_buffer") == 3  # max, exp, sum


def test_row_reduction_structure_long_rows_in_partials():
    """Rows of 4 vectors or more (661 classes): max and sum each in 16 partial results
    (a vector per row), every step a parallel loop over the 40 rows."""
    kernel = _kernel(_fused_kernels(softmax_output()), "fused_")
    func = RowReduction().apply(kernel, TARGET, False).mod["main"]
    loops = _loops(func)
    parallel = [lp for lp in loops if lp.kind == tirx.ForKind.PARALLEL]
    # partial maxima, their combination, exp, partial sums, their combination, output
    assert len(parallel) == 6 and all(int(lp.extent) == 40 for lp in parallel)
    vectorized = [lp for lp in loops if lp.kind == tirx.ForKind.VECTORIZED]
    assert len(vectorized) == 6 and all(int(lp.extent) == 16 for lp in vectorized)
    text = func.script()
    assert "T_softmax_maxelem_rf" in text and "T_softmax_expsum_rf" in text
    assert text.count("T.where") == 2  # the partial vectors' predicate past 661
    assert text.count("T.sblock_alloc_buffer") == 5  # max, exp, sum and two partials


def test_row_reduction_leaves_alone_other_kernels():
    for case in (lookup_table, depthwise, global_mean):
        kernels = _fused_kernels(case())
        assert all(RowReduction().apply(f, TARGET, False) is None for f in kernels.values())


@pytest.mark.parametrize("width, stride, vector", [
    (10, 1, 10),  # no divisor of 8 or more: one vector of the whole row
    (20, 1, 20),  # likewise (5 vectors of 4 lanes ran 2x slower on det's 20x20 maps)
    (40, 1, 8),   # 5 vectors of 8 (2 of 20 ran slower)
    (40, 2, 20),  # stride 2 over a deinterleaved copy: contiguous reads, a row of 20
    (39, 2, 4),   # odd padded width (43), no copy: the strided read is a gather, short vectors
])
def test_row_vector_length(width, stride, vector):
    kernel = _kernel(_fused_kernels(depthwise(c=48, hw=(10, width), k=5, stride=stride)),
                     "fused_conv2d")
    loops = _loops(SpatialReduction().apply(kernel, TARGET, False).mod["main"])
    vectorized = [int(lp.extent) for lp in loops if lp.kind == tirx.ForKind.VECTORIZED]
    assert vectorized and all(n == vector for n in vectorized)


def test_stride_two_reads_a_deinterleaved_copy():
    """A stride-2 depthwise conv copies the input rows it needs, even and odd columns apart
    (parity the innermost loop, for LLVM's shuffles), then reads that copy contiguously."""
    kernel = _kernel(_fused_kernels(depthwise(c=32, hw=(24, 64), k=3, stride=2)),
                     "fused_conv2d")
    func = SpatialReduction().apply(kernel, TARGET, False).mod["main"]
    text = func.script()
    assert "T.int64(32), T.int64(26), T.int64(2), T.int64(33)), \"uint8\")" in text
    loops = _loops(func)
    assert loops[0].kind == tirx.ForKind.PARALLEL
    copy = loops[1:6]  # under the (channel, output row) loop: 3 input rows x 33 x parity 2
    assert [int(lp.extent) for lp in copy][-3:] == [3, 33, 2]
    # the accumulation reads the copy at unit stride along the vectorized row
    update = next(lp for lp in loops if lp.kind == tirx.ForKind.VECTORIZED
                  and "update" in lp.script())
    assert "v4 // T.int64(2) + v2" in update.script()


def test_small_kernels_stay_on_one_thread():
    kernel = _kernel(_fused_kernels(depthwise(c=8, hw=(5, 3))), "fused_conv2d")
    sch = SpatialReduction().apply(kernel, TARGET, False)
    assert all(lp.kind != tirx.ForKind.PARALLEL for lp in _loops(sch.mod["main"]))


def test_pipeline_fuses_and_schedules_every_kernel():
    q = tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False)
    with TARGET:
        lowered = build_pipeline(TARGET, kernels=False)(q.mod)
        plain = build_pipeline(TARGET, kernels=False, schedules=False)(q.mod)
    funcs = [f for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
    n_plain = sum(isinstance(f, tirx.PrimFunc) for _, f in plain.functions_items())
    assert len(funcs) < n_plain / 3  # the requantization chains are fused into their anchors
    assert all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in funcs)


def test_pipeline_output_matches_plain_build_on_a_quantized_model():
    q = tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False)
    fast = relax.VirtualMachine(tvmquant.build(q, TARGET), tvm.cpu())
    plain = relax.VirtualMachine(tvmquant.build(q, TARGET, kernels=False, schedules=False),
                                 tvm.cpu())
    for sample in random_inputs(3, seed=np.random.default_rng().integers(1 << 30)):
        x = tvm.runtime.tensor(sample["x"])
        # the last dense has a float output (summation order may differ by an ulp there)
        np.testing.assert_allclose(fast["main"](x).numpy(), plain["main"](x).numpy(),
                                   rtol=1e-6, atol=1e-6)


def test_sigmoid_through_exp_structure():
    """Before/Expected: a float sigmoid becomes 1 / (1 + exp(-x)); an integer one stays."""
    from tvmquant.schedules.fast_sigmoid import SigmoidThroughExp

    def module(dtype, body):
        return _module((2, 7), dtype, body)

    before = module("float32", lambda bb, x: bb.emit(relax.op.sigmoid(x)))
    one = relax.const(1.0, "float32")
    expected = module("float32", lambda bb, x: bb.emit(relax.op.divide(
        one, relax.op.add(one, relax.op.exp(relax.op.negative(x))))))
    tvm.ir.assert_structural_equal(SigmoidThroughExp(before), expected)
    ints = module("int32", lambda bb, x: bb.emit(relax.op.abs(x)))
    tvm.ir.assert_structural_equal(SigmoidThroughExp(ints), ints)


def test_fast_math_sigmoid_and_softmax_match_the_exact_build():
    def body(bb, x):
        return bb.emit(relax.op.add(relax.op.sigmoid(x), relax.op.nn.softmax(x, axis=-1)))

    mod = _module((5, 300), "float32", body)
    fast = relax.VirtualMachine(build(mod, TARGET, kernels=False), tvm.cpu())
    exact = relax.VirtualMachine(build(mod, TARGET, kernels=False, fast_math=False),
                                 tvm.cpu())
    x = np.random.default_rng().standard_normal((5, 300)).astype("float32") * 8
    got = fast["main"](tvm.runtime.tensor(x)).numpy()
    want = exact["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(got, ref + e / e.sum(axis=-1, keepdims=True), rtol=1e-5)
