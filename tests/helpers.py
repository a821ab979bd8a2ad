"""Test helpers: well-formedness checks, compile-and-run."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def assert_well_formed(mod: tvm.IRModule) -> None:
    relax.analysis.well_formed(mod)  # raises on the first violation (TVM 0.27)


def run_pass(pass_, mod: tvm.IRModule) -> tvm.IRModule:
    """Apply a pass, checking well-formedness before and after."""
    assert_well_formed(mod)
    out = pass_(mod)
    assert_well_formed(out)
    return out


def one_input_module(body, shape, dtype: str = "float32") -> tvm.IRModule:
    """``main(x)`` whose dataflow block is ``body(bb, x)`` (its return value is the output)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def run_module(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()


def emit_requant(bb, y, rng, channels: int, *, shift: int, zero_point: int, dtype: str,
                 shape=None):
    """The dyadic requantization chain LowerToIntegerOnly writes after an int32 sum ``y``:
    ``astype(int64) -> multiply(m0) -> add(half) -> right_shift -> add(zp) -> clip ->
    astype(dtype)``, with random per-channel ``m0`` in [2^30, 2^31) (``shape``: their
    broadcast shape, ``(1, channels, 1, 1)`` by default)."""
    info = np.iinfo(dtype)
    y = bb.emit(relax.op.astype(y, "int64"))
    y = bb.emit(relax.op.multiply(y, relax.const(
        rng.integers(2**30, 2**31, shape or (1, channels, 1, 1)), "int64")))
    y = bb.emit(relax.op.add(y, relax.const(1 << (shift - 1), "int64")))
    y = bb.emit(relax.op.right_shift(y, relax.const(shift, "int64")))
    y = bb.emit(relax.op.add(y, relax.const(zero_point, "int64")))
    y = bb.emit(relax.op.clip(y, int(info.min), int(info.max)))
    return bb.emit(relax.op.astype(y, dtype))


def conv_requant_chain(c: int, o: int, width: int, stride: int = 1, shift: int = 40):
    """``main(x: u8[1, c, 6, width])``: conv2d(3x3, padding 1) + dyadic requantization to
    uint8 (``>> shift``, rounded, zero point 7), as LowerToIntegerOnly writes it."""
    rng = np.random.default_rng(o)

    def body(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.integers(
            -127, 128, (o, c, 3, 3)).astype("int8")), strides=stride, padding=1,
            out_dtype="int32"))
        return emit_requant(bb, y, rng, o, shift=shift, zero_point=7, dtype="uint8")

    return one_input_module(body, (1, c, 6, width), "uint8")


def random_gate(rng, out_dtype: str = "uint8") -> np.ndarray:
    """Parameters of an integer gate (``tvmquant.numerics.GATE_PARAMS``) as LowerToIntegerOnly
    makes them for a hard-swish on 16-bit codes: the product stays in int32, and the largest
    outputs reach about twice the range of ``out_dtype`` (negative ``m0`` for int8 only)."""
    g_off = int(rng.integers(2000, 20000))
    g_hi = 2 * g_off + int(rng.integers(-50, 50))
    bound = (32768 + 100) * g_hi + 2**20
    pre_shift = max(0, bound.bit_length() - 15)
    m0 = int(rng.integers(2**14, 2**15))
    if out_dtype == "int8" and rng.integers(2):
        m0 = -m0
    shift = ((bound >> pre_shift) * abs(m0)).bit_length() - 9
    return np.array([int(rng.integers(-100, 100)), g_off, 0, g_hi,
                     int(rng.integers(-2**20, 2**20)) + (1 << (pre_shift - 1)), pre_shift,
                     m0, shift, int(rng.integers(-20, 20))], np.int32)


def epilogue_operand(rng, rq) -> np.ndarray | None:
    """The kernel's last epilogue input for ``rq`` (an ``int8_dense.Requant``): a random
    lookup table of its size, an integer gate's parameters, or None."""
    if rq is None:
        return None
    if rq.lut_size:
        info = np.iinfo(rq.lut_dtype)
        return rng.integers(info.min, int(info.max) + 1, rq.lut_size).astype(rq.lut_dtype)
    if rq.gate is not None:
        return random_gate(rng, rq.gate.out_dtype)
    return None
