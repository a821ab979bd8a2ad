"""LowerToIntegerOnly: rewrite a quantize/dequantize graph into integer arithmetic.

Preconditions
-------------
The function holds simulated quantization: weights as ``dequantize(const_int, scale, 0,
axis)`` and activations as ``dequantize(quantize(x, s, z), s, z)`` with constant per-tensor
scales and zero points, as :class:`~tvmquant.passes.InsertFakeQuant` produces (any QDQ graph
of that form works, e.g. one imported from a QDQ ONNX model).

Rules (each keyed by the op that produces the value a ``quantize`` consumes)
----------------------------------------------------------------------------
- conv2d / matmul: int8 x int8 (or uint8 x int8) -> int32 accumulation. A nonzero input zero
  point is handled by padding with the zero point and subtracting ``zp * sum(W)`` per output
  channel, folded together with the int32 bias into one constant.
- Dyadic requantization of the accumulator into the next tensor's grid:
  ``clip(z + round_half_up(acc * m0 / 2^shift), lo, hi)`` in int64, ``m0`` and ``shift`` per
  output channel; fused ReLU/ReLU6/clip become the clamp bounds.
- requantize (``quantize(dequantize(q))``): identity when the grids agree, dyadic otherwise.
- add / multiply of two quantized tensors: both operands rescaled dyadically to a common shift.
- unary elementwise regions (hard-swish, sigmoid, ...): a lookup table over the input's codes;
  on 16-bit codes, a region of the form ``c * (a1 x + b1) * clip(a2 x + b2, l, h) + d``
  (hard-swish, also scaled and shifted as PP-OCRv4's learnable affine blocks do) is integer
  arithmetic instead, ``(q + x_off) * clip(q + g_off, g_lo, g_hi) + p_off`` requantized
  dyadically, all in int32 (:func:`~tvmquant.numerics.integer_gate`), kept only where it is
  within one step of the table on every code and equal to it on 99% of them (a 64 Ki-entry
  table costs a gather per value; the gate is a few vector instructions).
- movement ops (reshape, transpose, max-pool, ...): applied to the integer codes.
- per-group weights (``multiply(astype(codes), scale)``): one partial sum per group from a
  grouped convolution / batched matmul, combined with 15-bit integer group weights in int64.
- mean (global average pooling): int32 sum, then dyadic requantization.
- concat: operands requantized to the output grid, then concatenated.
- binary codes (``where(y >= 0, 1, -1)``, ``QuantSpec.binary()``): the sign of the anchor's
  int32 accumulator with its bias, or of a quantized tensor's codes minus its zero point.
Anything else stays in float, between a dequantize and a quantize; such places are recorded
in the function attribute ``tvmquant.float_fallbacks`` as ``"tensor: reason"`` strings.
An anchor whose output is not quantized (a model output) keeps a float rescale of its integer
accumulator: that is the output dequantize.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax

from .._compat import Constant, const_value, dtype_of, static_shape
from ..numerics import dequantize as np_dequantize
from ..numerics import dyadic, integer_gate
from ..numerics import quantize as np_quantize
from .analysis import emit_like, is_movement

FALLBACK_ATTR = "tvmquant.float_fallbacks"
INTEGER_ATTR = "tvmquant.integer_only"

GATE_BITS = 15  # precision of an integer gate's product and multiplier (int32 arithmetic)
GATE_MISMATCH = 0.01  # most codes an integer gate may put one step off its table
GROUP_BITS = 15  # precision of the integer per-group weights (relative to the largest scale)
MAX_GROUPS = 256

_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}

# NumPy semantics of the elementwise ops a unary region may contain (for lookup tables).
_NP_UNARY = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.minimum": np.minimum, "relax.maximum": np.maximum,
    "relax.power": np.power, "relax.negative": np.negative, "relax.sqrt": np.sqrt,
    "relax.abs": np.abs, "relax.exp": np.exp, "relax.tanh": np.tanh, "relax.square": np.square,
    "relax.sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "relax.nn.relu": lambda x: np.maximum(x, 0),
    "relax.nn.silu": lambda x: x / (1.0 + np.exp(-x)),
}


@dataclass(frozen=True)
class _Affine:
    """``a * x + b`` of the region's input ``x``."""

    a: float
    b: float


@dataclass(frozen=True)
class _Gated:
    """``c * (a1 x + b1) * clip(a2 x + b2, lo, hi) + d``; ``a1 = 0, b1 = 1``: a clipped
    line."""

    c: float
    a1: float
    b1: float
    a2: float
    b2: float
    lo: float
    hi: float
    d: float = 0.0


def _gate_form(prod_of, source, expr):
    """``expr`` as :class:`_Affine` or :class:`_Gated` of the dequantized ``source`` (found by
    ``source(expr)``, constants by ``_scalar``; ``prod_of`` gives an expression's producer),
    or None when it is neither (sigmoid, products of two clips, ...)."""
    if source(expr):
        return _Affine(1.0, 0.0)
    c = _scalar(expr)
    if c is not None:
        return _Affine(0.0, float(c))
    prod = prod_of(expr)
    if prod is None or not isinstance(prod.op, tvm.ir.Op):
        return None
    name = prod.op.name
    if name == "relax.clip" or name == "relax.nn.relu":
        inner = _gate_form(prod_of, source, prod.args[0])
        if not isinstance(inner, _Affine) or inner.a == 0:
            return None
        lo, hi = (float(prod.args[1].value), float(prod.args[2].value)) \
            if name == "relax.clip" else (0.0, np.inf)
        return _Gated(1.0, 0.0, 1.0, inner.a, inner.b, lo, hi)
    if name not in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide") or \
            len(prod.args) != 2:
        return None
    u, v = (_gate_form(prod_of, source, a) for a in prod.args)
    if u is None or v is None:
        return None
    if name in ("relax.add", "relax.subtract"):
        sign = 1.0 if name == "relax.add" else -1.0
        if isinstance(u, _Affine) and isinstance(v, _Affine):
            return _Affine(u.a + sign * v.a, u.b + sign * v.b)
        if isinstance(v, _Affine) and v.a == 0:  # a gate plus a constant
            return replace(u, d=u.d + sign * v.b)
        if isinstance(u, _Affine) and u.a == 0 and sign > 0:
            return replace(v, d=v.d + u.b)
        return None
    if name == "relax.divide":
        if not (isinstance(v, _Affine) and v.a == 0 and v.b != 0):
            return None
        v = _Affine(0.0, 1.0 / v.b)
    const = [w for w in (u, v) if isinstance(w, _Affine) and w.a == 0]
    if const:  # scaling by a constant
        k = const[0].b
        w = v if const[0] is u else u
        if isinstance(w, _Affine):
            return _Affine(k * w.a, k * w.b)
        return replace(w, c=k * w.c, d=k * w.d)
    line = [w for w in (u, v) if isinstance(w, _Affine)]
    gate = [w for w in (u, v) if isinstance(w, _Gated) and w.a1 == 0 and w.d == 0]
    if len(line) == 1 and len(gate) == 1:  # a line times a clipped line
        g, ln = gate[0], line[0]
        return _Gated(g.c * g.b1, ln.a, ln.b, g.a2, g.b2, g.lo, g.hi)
    return None


def _integer_gate_params(g: _Gated, sx: float, zx: int, qlo: int, qhi: int, s: float):
    """Integer parameters (:data:`~tvmquant.numerics.GATE_PARAMS` but the zero point, then
    what ``g``'s constant term adds to it) of ``g`` on codes ``q`` in ``[qlo, qhi]`` of
    scale ``sx`` and zero point ``zx``, quantized to scale ``s``; None when it has none (a
    constant factor, a product past int32)."""
    c, a1, b1, a2, b2, lo, hi = g.c, g.a1, g.b1, g.a2, g.b2, g.lo, g.hi
    if a1 == 0 or a2 == 0:
        return None
    if a1 < 0:
        c, a1, b1 = -c, -a1, -b1
    if a2 < 0:  # clip(a2 x + b2, lo, hi) = -clip(-a2 x - b2, -hi, -lo)
        c, a2, b2, lo, hi = -c, -a2, -b2, -hi, -lo
    ratio = c * a1 * a2 * sx * sx / s  # of one unit of the product; negative: m0 < 0
    if not np.isfinite(ratio) or ratio == 0 or not np.isfinite(g.d):
        return None
    # a1 x + b1 = a1 sx (q + x_off); a2 x + b2 = a2 sx (q + g_off), clipped in those units
    x_off = round(b1 / (a1 * sx)) - zx
    g_off = round(b2 / (a2 * sx)) - zx
    g_lo = max(qlo + g_off, round(lo / (a2 * sx)) if np.isfinite(lo) else qlo + g_off)
    g_hi = min(qhi + g_off, round(hi / (a2 * sx)) if np.isfinite(hi) else qhi + g_off)
    if g_lo > g_hi:
        return None
    # the constant term: whole output steps join the zero point, the rest the product
    z_off = round(g.d / s)
    p_off = round((g.d / s - z_off) / ratio)
    bound = max(abs(qlo + x_off), abs(qhi + x_off)) * max(abs(g_lo), abs(g_hi)) + abs(p_off)
    # int32 throughout: the product, rounded to GATE_BITS bits, times a GATE_BITS-bit m0
    pre_shift = max(0, int(bound).bit_length() - GATE_BITS)
    scaled = abs(ratio) * 2.0**pre_shift
    shift = GATE_BITS - 1 - int(np.floor(np.log2(scaled)))
    m0 = round(scaled * 2.0**shift)
    if m0 >= 2**GATE_BITS:
        m0, shift = m0 >> 1, shift - 1
    if pre_shift:
        p_off += 1 << (pre_shift - 1)  # (rounds the pre-shift)
    if not 1 <= shift <= 30 or bound + 2 * (1 << pre_shift) >= 2**31:
        return None  # (room for the pre-shift's rounding and a nudge of p_off)
    return [x_off, g_off, g_lo, g_hi, p_off, pre_shift, m0 if ratio > 0 else -m0, shift, z_off]


@dataclass
class _Acc:
    """An integer accumulator and the real scale of one of its units."""

    acc: relax.Expr  # int32 tensor
    scale: np.ndarray  # float64, scalar or per channel
    ch_axis: int
    ndim: int


@dataclass
class _QTensor:
    """A quantized tensor: integer codes with a per-tensor scale and zero point."""

    codes: relax.Expr
    scale: float
    zp: int
    dtype: str


def _scalar(c) -> float | int | None:
    if isinstance(c, Constant):
        v = const_value(c)
        if v.size == 1:
            return v.reshape(()).item()
    return None


def _channel_shape(ndim: int, axis: int, n: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = n
    return shape


@relax.expr_functor.mutator
class _LowerMutator(relax.PyExprMutator):
    def __init__(self, mod, integer_gates: bool = True):
        super().__init__(mod)
        self.integer_gates = integer_gates
        self.accs: dict = {}  # new float var (rescaled accumulator) -> _Acc
        self.fallbacks: list[str] = []

    # -- lookups on the new graph ---------------------------------------------------------
    def _producer(self, expr) -> relax.Call | None:
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            return value if isinstance(value, relax.Call) else None
        return expr if isinstance(expr, relax.Call) else None

    def _as_dequantized(self, expr) -> _QTensor | None:
        """If ``expr`` is ``dequantize(q, s, z)`` with scalar constant s, z: its codes."""
        call = self._producer(expr)
        if call is None or call.op.name != "relax.dequantize":
            return None
        s, z = _scalar(call.args[1]), _scalar(call.args[2])
        if s is None or z is None:
            return None
        return _QTensor(call.args[0], float(s), int(z), dtype_of(call.args[0]))

    def _weight(self, expr):
        """Constant weight codes with symmetric per-tensor/per-channel scales, or None."""
        call = self._producer(expr)
        if call is None or call.op.name != "relax.dequantize":
            return None
        codes, s, z = call.args
        if not all(isinstance(a, Constant) for a in (codes, s, z)):
            return None
        if np.any(const_value(z) != 0):
            return None
        return const_value(codes), const_value(s).astype(np.float64), int(call.attrs.axis)

    def _group_weight(self, expr):
        """Per-group weights, ``multiply(astype(const codes), const scale)``: (codes, scale)."""
        call = self._producer(expr)
        if call is None or call.op.name != "relax.multiply" or \
                not isinstance(call.args[1], Constant):
            return None
        cast = self._producer(call.args[0])
        if cast is None or cast.op.name != "relax.astype" or \
                not isinstance(cast.args[0], Constant):
            return None
        codes = const_value(cast.args[0])
        if codes.dtype not in (np.int8, np.int16):
            return None
        scale = np.broadcast_to(const_value(call.args[1]).astype(np.float64), codes.shape)
        return codes, scale

    def emit(self, expr, name=""):
        return self.builder_.emit(expr, name_hint=name)

    # -- integer building blocks ------------------------------------------------------------
    def _const(self, value, dtype):
        return relax.const(np.asarray(value).astype(dtype), dtype)

    def _requant(self, acc, scale_ratio, ch_axis, ndim, zp, lo, hi, out_dtype, name=""):
        """clip(zp + round_half_up(acc * M), lo, hi) with M = m0 / 2^shift (per channel)."""
        d = dyadic(scale_ratio)
        if d.m0.ndim and d.m0.size > 1:
            shape = _channel_shape(ndim, ch_axis, d.m0.size)
            m0, shift = d.m0.reshape(shape), d.shift.reshape(shape)
        else:
            m0, shift = d.m0.reshape(()), d.shift.reshape(())
        half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0)
        x = self.emit(relax.op.astype(acc, "int64"))
        x = self.emit(relax.op.multiply(x, self._const(m0, "int64")))
        x = self.emit(relax.op.add(x, self._const(half, "int64")))
        x = self.emit(relax.op.right_shift(x, self._const(shift, "int64")))
        x = self.emit(relax.op.add(x, self._const(zp, "int64")))
        x = self.emit(relax.op.clip(x, int(lo), int(hi)))
        return self.emit(relax.op.astype(x, out_dtype), name)

    def _zero_point_padded(self, a: _QTensor, attrs):
        """A conv2d's input codes and padding: with a nonzero zero point, padded with the zero
        point (= real 0) here and convolved unpadded."""
        padding = [int(p) for p in attrs.padding]
        if a.zp == 0 or not any(padding):
            return a.codes, padding
        top, left, bottom, right = padding
        data = self.emit(relax.op.nn.pad(a.codes, [0, 0, 0, 0, top, bottom, left, right],
                                         pad_value=float(a.zp)))
        return data, [0, 0, 0, 0]

    def _shifted(self, q: _QTensor, dtype="int32"):
        x = self.emit(relax.op.astype(q.codes, dtype))
        if q.zp:
            x = self.emit(relax.op.subtract(x, self._const(q.zp, dtype)))
        return x

    # -- rules producing a float rescaled accumulator (anchors) -----------------------------
    def _lower_anchor(self, call: relax.Call):
        op = call.op.name
        a = self._as_dequantized(call.args[0])
        if a is None or dtype_of(call) != "float32":
            return None
        out_shape = static_shape(call)
        if out_shape is None:
            return None
        ndim = len(out_shape)
        w = self._weight(call.args[1])
        if w is None and (grouped := self._group_weight(call.args[1])) is not None:
            w = self._lower_grouped(call, a, *grouped)
            if not isinstance(w, tuple):
                return w  # grouped accumulator, or None (fallback)
        if w is None:
            b = self._as_dequantized(call.args[1])
            if op != "relax.matmul" or b is None:
                self._note_anchor_fallback(call)
                return None
            acc = self.emit(relax.op.matmul(self._shifted(a, "int16"), self._shifted(b, "int16"),
                                            out_dtype="int32"))
            return _Acc(acc, np.float64(a.scale * b.scale), ndim - 1, ndim)
        wq, ws, w_axis = w
        wconst = relax.const(wq, str(wq.dtype))
        if op == "relax.nn.conv2d":
            attrs = call.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
                self._note_anchor_fallback(call, "layout other than NCHW/OIHW")
                return None
            if w_axis % 4 != 0:
                return None
            data, padding = self._zero_point_padded(a, attrs)
            acc = self.emit(relax.op.nn.conv2d(
                data, wconst, strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW",
                out_dtype="int32"))
            ch_axis, wsum = 1, wq.astype(np.int64).sum(axis=(1, 2, 3))
        elif op == "relax.nn.conv2d_transpose":
            attrs = call.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "IOHW" or \
                    w_axis % 4 != 1:
                self._note_anchor_fallback(call, "layout other than NCHW/IOHW")
                return None
            # The input zero point is subtracted first: transposed convolutions have no input
            # padding to fill, and int16 holds uint8 - zp.
            data = self._shifted(a, "int16") if a.zp else a.codes
            acc = self.emit(relax.op.nn.conv2d_transpose(
                data, wconst, strides=attrs.strides, padding=attrs.padding,
                output_padding=attrs.output_padding, dilation=attrs.dilation,
                groups=int(attrs.groups), data_layout="NCHW", kernel_layout="IOHW",
                out_dtype="int32"))
            return _Acc(acc, a.scale * ws, 1, ndim)
        else:  # matmul with a constant (K, N) weight
            if wq.ndim != 2 or w_axis % 2 != 1:
                return None
            acc = self.emit(relax.op.matmul(a.codes, wconst, out_dtype="int32"))
            ch_axis, wsum = ndim - 1, wq.astype(np.int64).sum(axis=0)
        if a.zp != 0:
            corr = (-a.zp * wsum).astype(np.int32).reshape(_channel_shape(ndim, ch_axis,
                                                                           wsum.size))
            acc = self.emit(relax.op.add(acc, self._const(corr, "int32")))
        return _Acc(acc, a.scale * ws, ch_axis, ndim)

    def _lower_grouped(self, call, a: _QTensor, wq: np.ndarray, scale: np.ndarray):
        """Per-group weights: one int32 partial sum per group, combined with integer weights.

        The group scales ``s[c, g]`` of output channel ``c`` are written as
        ``base[c] * t[c, g] / 2^GROUP_BITS`` with ``base[c] = max_g s[c, g]`` and integer
        ``t`` (relative error below ``2^-GROUP_BITS``); the accumulator is then
        ``sum_g t[c, g] * P_g`` in int64, in units of ``a.scale * base / 2^GROUP_BITS``. The
        partial sums come from one grouped convolution (or one batched matmul) over the
        groups of the reduction axis, so the graph stays integer-only.
        """
        op = call.op.name
        out_shape = static_shape(call)
        ndim = len(out_shape)
        if op == "relax.nn.conv2d":
            attrs = call.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or \
                    int(attrs.groups) != 1:
                self._note_anchor_fallback(call, "per-group weights on a grouped or non-NCHW "
                                                 "convolution")
                return None
            per_ck = scale[:, :, 0, 0]
            if np.any(scale != per_ck[:, :, None, None]):
                return None
        elif op == "relax.matmul" and wq.ndim == 2:
            per_ck = scale.T  # (N, K)
        else:
            self._note_anchor_fallback(call, "per-group weights on this op")
            return None
        found = _group_size(per_ck)
        if found is None:
            self._note_anchor_fallback(call, f"more than {MAX_GROUPS} weight groups")
            return None
        gs, group_scale = found  # (C, G)
        n_out, groups = group_scale.shape
        if groups == 1:  # one group: per-channel weights, the ordinary rule
            return wq, group_scale[:, 0], 0 if op == "relax.nn.conv2d" else 1
        base = group_scale.max(axis=1)
        base = np.where(base > 0, base, 1.0)
        t = np.round(group_scale / base[:, None] * (1 << GROUP_BITS)).astype(np.int64)
        if op == "relax.nn.conv2d":
            kh, kw = wq.shape[2:]
            wg = wq.reshape(n_out, groups, gs, kh, kw).transpose(1, 0, 2, 3, 4)
            wsum = wg.astype(np.int64).sum(axis=(2, 3, 4))  # (G, O)
            data, padding = self._zero_point_padded(a, attrs)
            part = self.emit(relax.op.nn.conv2d(
                data, self._const(wg.reshape(groups * n_out, gs, kh, kw), str(wq.dtype)),
                strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                groups=groups, data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32"))
            n, _, ho, wo = out_shape
            part = self.emit(relax.op.reshape(part, (n, groups, n_out, ho, wo)))
            tw = t.T.reshape(1, groups, n_out, 1, 1)
            red_axis, ch_axis = 1, 1
        else:
            lead = out_shape[:-1]
            rows = int(np.prod(lead)) if lead else 1
            data = self.emit(relax.op.reshape(a.codes, (rows, groups, gs)))
            data = self.emit(relax.op.permute_dims(data, [1, 0, 2]))
            wg = wq.reshape(groups, gs, n_out)
            wsum = wg.astype(np.int64).sum(axis=1)  # (G, N)
            part = self.emit(relax.op.matmul(data, self._const(wg, str(wq.dtype)),
                                             out_dtype="int32"))  # (G, rows, N)
            tw = t.T.reshape(groups, 1, n_out)
            red_axis, ch_axis = 0, ndim - 1
        part = self.emit(relax.op.astype(part, "int64"))
        part = self.emit(relax.op.multiply(part, self._const(tw, "int64")))
        acc = self.emit(relax.op.sum(part, axis=[red_axis]))
        if op == "relax.matmul":
            acc = self.emit(relax.op.reshape(acc, out_shape))
        if a.zp != 0:
            corr = -a.zp * (t.T * wsum).sum(axis=0)  # (O,)
            acc = self.emit(relax.op.add(acc, self._const(
                corr.reshape(_channel_shape(ndim, ch_axis, n_out)), "int64")))
        return _Acc(acc, a.scale * base / (1 << GROUP_BITS), ch_axis, ndim)

    def _lower_anchor_dynamic(self, call: relax.Call):
        """Dynamic quantization: integer kernel, float rescale by the run-time input scale."""
        op = call.op.name
        prod = self._producer(call.args[0])
        w = self._weight(call.args[1])
        if prod is None or prod.op.name != "relax.dequantize" or w is None or \
                op not in ("relax.nn.conv2d", "relax.matmul") or dtype_of(call) != "float32":
            return None
        codes, scale, zp = prod.args
        wq, ws, w_axis = w
        shape = static_shape(call)
        if shape is None:
            return None
        x = self.emit(relax.op.astype(codes, "int16"))
        x = self.emit(relax.op.subtract(x, relax.op.astype(zp, "int16")))
        wconst = relax.const(wq, str(wq.dtype))
        if op == "relax.nn.conv2d":
            attrs = call.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or \
                    w_axis % 4 != 0:
                return None
            acc = self.emit(relax.op.nn.conv2d(
                x, wconst, strides=attrs.strides, padding=attrs.padding,
                dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32"))
            ch_axis = 1
        else:
            if wq.ndim != 2 or w_axis % 2 != 1:
                return None
            acc = self.emit(relax.op.matmul(x, wconst, out_dtype="int32"))
            ch_axis = len(shape) - 1
        wscale = np.asarray(ws, np.float32)
        if wscale.ndim:
            wscale = wscale.reshape(_channel_shape(len(shape), ch_axis, wscale.size))
        f = self.emit(relax.op.astype(acc, "float32"))
        f = self.emit(relax.op.multiply(f, relax.const(wscale, "float32")))
        return relax.op.multiply(f, scale)

    def _note_anchor_fallback(self, call, reason=None):
        if reason is None:
            reason = "weights are not constant symmetric integer codes"
        self.fallbacks.append(f"{call.op.name.split('.')[-1]}: {reason}")

    # -- rules producing integer codes for quantize(y, s, z) --------------------------------
    def _lower_quantize(self, call: relax.Call):
        s, z = _scalar(call.args[1]), _scalar(call.args[2])
        if s is None or z is None:
            return None, "per-axis or dynamic output scale"
        out_dtype = str(call.attrs.out_dtype)
        qmin, qmax = _DTYPE_RANGE[out_dtype]
        s, z = float(s), int(z)
        y = call.args[0]
        for rule in (self._rule_anchor, self._rule_requant, self._rule_binary,
                     self._rule_movement, self._rule_mean, self._rule_concat, self._rule_lut):
            out = rule(y, s, z, qmin, qmax, out_dtype)
            if out is not None:
                return out, None
        prod = self._producer(y)
        op = prod.op.name.split(".")[-1] if prod is not None and hasattr(prod.op, "name") \
            else type(y).__name__
        return None, f"no integer rule for {op}"

    def _peel_clamp(self, y, s, z, qmin, qmax):
        """See through a ReLU/clip producing ``y``: (its input, integer clamp bounds)."""
        prod = self._producer(y)
        if prod is not None and prod.op.name == "relax.nn.relu":
            return prod.args[0], max(qmin, z), qmax
        if prod is not None and prod.op.name == "relax.clip":
            cmin, cmax = float(prod.args[1].value), float(prod.args[2].value)
            lo = max(qmin, int(np_quantize(np.float32(cmin), s, z, qmin, qmax)))
            hi = min(qmax, int(np_quantize(np.float32(cmax), s, z, qmin, qmax)))
            return prod.args[0], lo, hi
        return y, qmin, qmax

    def _anchor_acc(self, cur):
        """The int32 accumulator (bias added) behind a rescaled anchor output ``cur`` or
        ``add(cur, const bias)``: (accumulator, _Acc), or None."""
        bias = None
        prod = self._producer(cur)
        if prod is not None and prod.op.name == "relax.add":
            for i in (0, 1):
                if prod.args[i] in self.accs and isinstance(prod.args[1 - i], Constant):
                    bias = const_value(prod.args[1 - i]).astype(np.float64)
                    cur = prod.args[i]
        if cur not in self.accs:
            return None
        info = self.accs[cur]
        acc = info.acc
        if bias is not None:
            nch = static_shape(acc)[info.ch_axis]
            full = [1] * info.ndim
            full[info.ch_axis] = nch
            if bias.ndim > info.ndim:
                return None
            padded = bias.reshape((1,) * (info.ndim - bias.ndim) + bias.shape)
            if any(d not in (1, full[i]) for i, d in enumerate(padded.shape)):
                return None  # not a per-channel bias
            bias_vec = np.broadcast_to(padded, full).reshape(-1)
            acc_scale = np.broadcast_to(np.asarray(info.scale, np.float64), (nch,))
            bq = np.clip(np.round(bias_vec / acc_scale), -(2**31), 2**31 - 1).astype(np.int32)
            acc = self.emit(relax.op.add(acc, self._const(bq.reshape(full), dtype_of(acc))))
        return acc, info

    def _rule_anchor(self, y, s, z, qmin, qmax, out_dtype):
        cur, lo, hi = self._peel_clamp(y, s, z, qmin, qmax)
        found = self._anchor_acc(cur)
        if found is None:
            return None
        acc, info = found
        return self._requant(acc, info.scale / s, info.ch_axis, info.ndim, z, lo, hi, out_dtype)

    def _sign_input(self, call: relax.Call):
        """``y`` if ``call`` is binary codes ``where(y >= 0, 1, -1)``, else None."""
        cond = self._producer(call.args[0])
        if cond is None or cond.op.name != "relax.greater_equal" or \
                _scalar(cond.args[1]) != 0 or [_scalar(a) for a in call.args[1:]] != [1, -1]:
            return None
        return cond.args[0]

    def _lower_sign(self, y):
        """Binary codes of ``y``: the sign of ``y`` is the sign of its integer accumulator
        (scales are positive), so no requantization at all (a BatchNorm folded into the bias
        becomes the threshold, as in binary networks). Returns the integer condition, or
        None."""
        found = self._anchor_acc(y)
        if found is not None:
            return self.emit(relax.op.greater_equal(found[0], self._const(0, "int32")))
        q = self._as_dequantized(y)
        if q is not None:  # codes at or above the zero point
            return self.emit(relax.op.greater_equal(self._shifted(q), self._const(0, "int32")))
        return None

    def _rule_requant(self, y, s, z, qmin, qmax, out_dtype):
        q = self._as_dequantized(y)
        if q is None:
            return None
        return self._requant_tensor(q, s, z, qmin, qmax, out_dtype)

    def _requant_tensor(self, q: _QTensor, s, z, qmin, qmax, out_dtype):
        if q.scale == s and q.zp == z and q.dtype == out_dtype:
            return q.codes
        x = self._shifted(q)
        return self._requant(x, np.float64(q.scale / s), 0, 0, z, qmin, qmax, out_dtype)

    def _rule_binary(self, y, s, z, qmin, qmax, out_dtype):
        y, qmin, qmax = self._peel_clamp(y, s, z, qmin, qmax)
        prod = self._producer(y)
        if prod is None or prod.op.name not in ("relax.add", "relax.multiply"):
            return None
        if len(prod.args) != 2:
            return None
        a, b = (self._as_dequantized(x) for x in prod.args)
        if a is None or b is None:
            return None
        xa, xb = self._shifted(a, "int64"), self._shifted(b, "int64")
        if prod.op.name == "relax.multiply":
            p = self.emit(relax.op.multiply(xa, xb))
            return self._requant_int64(p, a.scale * b.scale / s, z, qmin, qmax, out_dtype)
        ma, mb = a.scale / s, b.scale / s
        shift = int(dyadic(max(ma, mb)).shift)
        ia = round(ma * 2.0**shift)
        ib = round(mb * 2.0**shift)
        pa = self.emit(relax.op.multiply(xa, self._const(ia, "int64")))
        pb = self.emit(relax.op.multiply(xb, self._const(ib, "int64")))
        p = self.emit(relax.op.add(pa, pb))
        return self._shift_out(p, shift, z, qmin, qmax, out_dtype)

    def _requant_int64(self, p, ratio, z, qmin, qmax, out_dtype):
        d = dyadic(ratio)
        p = self.emit(relax.op.multiply(p, self._const(int(d.m0), "int64")))
        return self._shift_out(p, int(d.shift), z, qmin, qmax, out_dtype)

    def _shift_out(self, p, shift, z, qmin, qmax, out_dtype):
        if shift > 0:
            p = self.emit(relax.op.add(p, self._const(1 << (shift - 1), "int64")))
            p = self.emit(relax.op.right_shift(p, self._const(shift, "int64")))
        p = self.emit(relax.op.add(p, self._const(z, "int64")))
        p = self.emit(relax.op.clip(p, qmin, qmax))
        return self.emit(relax.op.astype(p, out_dtype))

    def _rule_movement(self, y, s, z, qmin, qmax, out_dtype):
        prod = self._producer(y)
        if prod is None or not isinstance(prod.op, tvm.ir.Op) or not is_movement(prod):
            return None
        q = self._as_dequantized(prod.args[0])
        if q is None:
            return None
        moved = self.emit(relax.Call(prod.op, [q.codes, *prod.args[1:]], prod.attrs,
                                     prod.ty_args))
        return self._requant_tensor(_QTensor(moved, q.scale, q.zp, q.dtype), s, z, qmin, qmax,
                                    out_dtype)

    def _rule_mean(self, y, s, z, qmin, qmax, out_dtype):
        prod = self._producer(y)
        if prod is not None and prod.op.name == "relax.nn.avg_pool2d":
            return self._avg_pool(prod, s, z, qmin, qmax, out_dtype)
        if prod is None or prod.op.name != "relax.mean":
            return None
        q = self._as_dequantized(prod.args[0])
        in_shape = static_shape(prod.args[0])
        if q is None or in_shape is None or prod.attrs.axis is None:
            return None
        axes = [int(a) % len(in_shape) for a in prod.attrs.axis]
        n = int(np.prod([in_shape[a] for a in axes]))
        x = self._shifted(q)
        total = self.emit(relax.op.sum(x, axis=axes, keepdims=bool(prod.attrs.keepdims)))
        return self._requant(total, np.float64(q.scale / (s * n)), 0, 0, z, qmin, qmax,
                             out_dtype)

    def _avg_pool(self, prod, s, z, qmin, qmax, out_dtype):
        """Average pooling without padding: a depthwise convolution with ones, requantized."""
        attrs = prod.attrs
        q = self._as_dequantized(prod.args[0])
        shape = static_shape(prod.args[0])
        if q is None or shape is None or str(attrs.layout) != "NCHW" or \
                any(int(p) for p in attrs.padding) or bool(attrs.ceil_mode) or \
                any(int(d) != 1 for d in attrs.dilation):
            return None
        kh, kw = (int(k) for k in attrs.pool_size)
        ones = np.ones((shape[1], 1, kh, kw), np.int8)
        x = self._shifted(q, "int16")
        total = self.emit(relax.op.nn.conv2d(x, relax.const(ones, "int8"), strides=attrs.strides,
                                             groups=shape[1], out_dtype="int32"))
        return self._requant(total, np.float64(q.scale / (s * kh * kw)), 0, 0, z, qmin, qmax,
                             out_dtype)

    def _rule_concat(self, y, s, z, qmin, qmax, out_dtype):
        prod = self._producer(y)
        if prod is None or prod.op.name != "relax.concat":
            return None
        tup = prod.args[0]
        if isinstance(tup, relax.Var):
            tup = self.lookup_binding(tup)
        if not isinstance(tup, relax.Tuple):
            return None
        parts = []
        for f in tup.fields:
            q = self._as_dequantized(f)
            if q is None:
                return None
            parts.append(self._requant_tensor(q, s, z, qmin, qmax, out_dtype))
        return self.emit(relax.op.concat(parts, axis=int(prod.attrs.axis)))

    def _rule_lut(self, y, s, z, qmin, qmax, out_dtype):
        source: list[_QTensor] = []

        def evaluate(expr, xs):
            q = self._as_dequantized(expr)
            if q is not None:
                if source and not source[0].codes.same_as(q.codes):
                    raise _NotUnary
                if not source:
                    source.append(q)
                return xs
            c = _scalar(expr)
            if c is not None:
                return np.float32(c)
            if isinstance(expr, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
                return np.float32(float(expr.value))
            prod = self._producer(expr)
            if prod is None:
                raise _NotUnary
            name = prod.op.name
            if name == "relax.clip":
                x = evaluate(prod.args[0], xs)
                return np.clip(x, float(prod.args[1].value), float(prod.args[2].value))
            if name not in _NP_UNARY:
                raise _NotUnary
            args = [evaluate(a, xs) for a in prod.args]
            return _NP_UNARY[name](*args).astype(np.float32)

        # Find the source grid first (dry run on a placeholder), then tabulate its codes.
        try:
            evaluate(y, np.zeros(1, np.float32))
        except (_NotUnary, AttributeError, TypeError, ValueError):
            return None
        if not source or self._producer(y) is None:
            return None
        src = source[0]
        lo, hi = _DTYPE_RANGE.get(src.dtype, (None, None))
        if lo is None:
            return None
        codes = np.arange(lo, hi + 1, dtype=np.int32)
        xs = np_dequantize(codes, np.float32(src.scale), np.int32(src.zp))
        with np.errstate(all="ignore"):
            ys = evaluate(y, xs)
        if not np.all(np.isfinite(ys)):
            return None
        table = np_quantize(np.broadcast_to(ys, xs.shape), np.float32(s), np.int32(z),
                           qmin, qmax).astype(out_dtype)
        if src.dtype == "int16" and self.integer_gates:
            gated = self._integer_gate(y, src, codes, table, s, z, qmin, qmax, out_dtype)
            if gated is not None:
                return gated
        idx = self.emit(relax.op.astype(src.codes, "int32"))
        if lo:
            idx = self.emit(relax.op.subtract(idx, self._const(lo, "int32")))
        return self.emit(relax.op.take(relax.const(table, out_dtype), idx, axis=0, mode="clip"))

    def _integer_gate(self, y, src: _QTensor, codes, table, s, z, qmin, qmax, out_dtype):
        """The region ``y`` as an integer gate (see the module docstring), if it has that
        form and matches ``table`` (over ``codes``) within one step everywhere and exactly
        on all but ``GATE_MISMATCH`` of the codes."""
        form = _gate_form(self._producer,
                          lambda e: (q := self._as_dequantized(e)) is not None and
                          q.codes.same_as(src.codes), y)
        if not isinstance(form, _Gated):
            return None
        params = _integer_gate_params(form, float(np.float32(src.scale)), src.zp,
                                      int(codes[0]), int(codes[-1]), float(np.float32(s)))
        if params is None:
            return None
        *params, z_off = params
        # A constant term half an output step from a whole one (a rounding tie) rounds as
        # the float32 table's value falls: nudged by one unit of the pre-shifted product
        # either way, the gate takes the table's side of the tie.
        want = table.astype(np.int32)
        step = 1 << params[5]
        best = None
        for nudge in (0, -step, step):
            trial = [*params[:4], params[4] + nudge, *params[5:]]
            got = integer_gate(codes, [*trial, z + z_off], qmin, qmax)
            if np.max(np.abs(got - want)) <= 1 and \
                    (best is None or np.mean(got != want) < best[0]):
                best = (np.mean(got != want), trial)
        if best is None or best[0] > GATE_MISMATCH:
            return None
        params = best[1]
        x_off, g_off, g_lo, g_hi, p_off, pre_shift, m0, shift = params
        x = self.emit(relax.op.astype(src.codes, "int32"))
        x1 = self.emit(relax.op.add(x, self._const(x_off, "int32")))
        g = self.emit(relax.op.add(x, self._const(g_off, "int32")))
        g = self.emit(relax.op.clip(g, g_lo, g_hi))
        p = self.emit(relax.op.multiply(x1, g))
        p = self.emit(relax.op.add(p, self._const(p_off, "int32")))
        p = self.emit(relax.op.right_shift(p, self._const(pre_shift, "int32")))
        p = self.emit(relax.op.multiply(p, self._const(m0, "int32")))
        p = self.emit(relax.op.add(p, self._const(1 << (shift - 1), "int32")))
        p = self.emit(relax.op.right_shift(p, self._const(shift, "int32")))
        p = self.emit(relax.op.add(p, self._const(z + z_off, "int32")))
        p = self.emit(relax.op.clip(p, qmin, qmax))
        return self.emit(relax.op.astype(p, out_dtype))

    # -- visitor ----------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        value = self.visit_expr(binding.value)
        new_value = None
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            if name in ("relax.nn.conv2d", "relax.nn.conv2d_transpose", "relax.matmul"):
                info = self._lower_anchor(value)
                if info is not None:
                    shape = _channel_shape(info.ndim, info.ch_axis, np.size(info.scale)) \
                        if np.ndim(info.scale) else ()
                    f = self.emit(relax.op.astype(info.acc, "float32"))
                    rescaled = relax.op.multiply(
                        f, relax.const(np.asarray(info.scale, np.float32).reshape(shape),
                                       "float32"))
                    new_var = self._emit_binding(var, rescaled)
                    self.accs[new_var] = info
                    return
                dynamic = self._lower_anchor_dynamic(value)
                if dynamic is not None:
                    self._emit_binding(var, dynamic)
                    return
            elif name == "relax.where" and (y := self._sign_input(value)) is not None:
                cond = self._lower_sign(y)
                if cond is not None:
                    self._emit_binding(var, relax.Call(value.op, [cond, *value.args[1:]],
                                                       value.attrs, value.ty_args))
                    return
                if self._producer(y) is not None:
                    self.fallbacks.append(f"{var.name.removesuffix('_q')}: binary codes of "
                                          "a tensor without an integer rule")
            elif name == "relax.quantize":
                codes, reason = self._lower_quantize(value)
                if codes is not None:
                    if isinstance(var, relax.DataflowVar):
                        self.set_var_remap(var, codes)
                    else:  # a function output: bind it, dataflow vars must not escape
                        self._emit_binding(var, codes)
                    return
                dynamic = _scalar(value.args[1]) is None and \
                    not isinstance(value.args[1], Constant)
                if self._producer(value.args[0]) is not None and not dynamic:
                    # (the input quantize, and run-time quantization of dynamic configs,
                    # are where float is expected)
                    self.fallbacks.append(f"{var.name.removesuffix('_q')}: {reason}")
        self._emit_binding(var, new_value if new_value is not None else value)

    def _emit_binding(self, var, value):
        new_var = emit_like(self.builder_, var, value)
        self.set_var_remap(var, new_var)
        return new_var


def _group_size(per_ck: np.ndarray):
    """The largest group size whose blocks of ``per_ck[C, K]`` share one value.

    Returns (group size, scales ``[C, K / group size]``), or None for more than
    ``MAX_GROUPS`` groups.
    """
    c, k = per_ck.shape
    for groups in range(1, min(k, MAX_GROUPS) + 1):
        if k % groups:
            continue
        blocks = per_ck.reshape(c, groups, k // groups)
        if np.all(blocks == blocks[:, :, :1]):
            return k // groups, blocks[:, :, 0]
    return None


def _has_quantize(func: relax.Function) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and \
                expr.op.name in ("relax.quantize", "relax.dequantize"):
            found.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


class _NotUnary(Exception):
    pass


@tvm.transform.module_pass(opt_level=0, name="tvmquant.LowerToIntegerOnly")
class LowerToIntegerOnly:
    """Rewrite simulated quantization (QDQ) into integer-only arithmetic.

    Parameters
    ----------
    func_name : str
        The Relax function to lower.
    integer_gates : bool
        Lower hard-swish-like regions on 16-bit codes to integer gates (see the module
        docstring); False keeps them lookup tables.

    The lowered function carries the attributes ``tvmquant.integer_only`` and
    ``tvmquant.float_fallbacks`` (the quantized tensors whose producer stayed in float, with
    the reason).
    """

    def __init__(self, func_name: str = "main", integer_gates: bool = True):
        self.func_name = func_name
        self.integer_gates = integer_gates

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        if not _has_quantize(func):
            return mod  # nothing simulated: leave the module alone
        mutator = _LowerMutator(mod, self.integer_gates)
        new_func = mutator.visit_expr(func)
        new_func = new_func.with_attr(INTEGER_ATTR, True)
        new_func = new_func.with_attr(FALLBACK_ATTR, list(mutator.fallbacks))
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = new_func
        return relax.transform.DeadCodeElimination()(mod)


__all__ = ["LowerToIntegerOnly"]
