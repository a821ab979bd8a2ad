"""Scale, zero-point and dyadic-requantization arithmetic, in NumPy.

This module is the single place where quantization math lives; passes, observers and tests
all use it, and the integer kernels are checked against it.

Rounding conventions
--------------------
- ``quantize`` rounds half to even (``np.rint``), matching TVM's ``relax.op.quantize``.
- Dyadic requantization rounds half up: ``(acc * m0 + 2^(shift-1)) >> shift`` with an
  arithmetic (floor) shift, computed exactly in int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import QuantSpec

# Smallest scale we hand out: a constant tensor (range 0) must still get a usable scale.
_MIN_SCALE = np.float32(2.0**-30)
# Fraction bits of the dyadic multiplier: m0 in [2^30, 2^31).
_DYADIC_BITS = 31
_MAX_SHIFT = 62


def compute_qparams(
    spec: QuantSpec, min_val: np.ndarray | float, max_val: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that map ``[min_val, max_val]`` onto ``spec``'s grid.

    The range is first widened to contain 0, so that 0.0 is exactly representable (needed for
    zero padding and ReLU). Works elementwise on arrays (per-channel / per-group ranges).

    Returns
    -------
    scale : float32 ndarray, strictly positive
    zero_point : int32 ndarray, within ``[spec.qmin, spec.qmax]``
    """
    lo = np.minimum(np.asarray(min_val, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(max_val, dtype=np.float64), 0.0)
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
        raise ValueError("cannot quantize a range that is not finite (NaN or inf observed)")
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = np.maximum(-lo, hi)
        if spec.signed:
            # Signed symmetric: zero point 0, the larger magnitude maps to the positive end.
            scale = amax / qmax
            zero_point = np.zeros_like(amax, dtype=np.int32)
        else:
            scale = hi / qmax
            zero_point = np.zeros_like(hi, dtype=np.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale > 0, np.round(qmin - lo / np.where(scale > 0, scale, 1)), qmin)
        zero_point = np.clip(zp, qmin, qmax).astype(np.int32)
    scale = np.maximum(scale, _MIN_SCALE).astype(np.float32)
    return scale, np.asarray(zero_point, dtype=np.int32)


def _expand(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = param.shape[0]
    return param.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> np.ndarray:
    """Reference quantization: ``clip(rint(x / scale) + zp, qmin, qmax)`` as int32."""
    s = _expand(scale, x.ndim, axis).astype(np.float32)
    z = _expand(zero_point, x.ndim, axis).astype(np.int32)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(q, qmin, qmax).astype(np.int32)


def _magnitude_mean(x: np.ndarray, mask: np.ndarray, axis: int | None) -> np.ndarray:
    """Mean of ``|x|`` where ``mask``, per channel along ``axis`` (all of ``x`` if None)."""
    a = np.abs(np.asarray(x, dtype=np.float64)) * mask
    n = np.asarray(mask, dtype=np.float64)
    if axis is None:
        total, count = a.sum(), n.sum()
    else:
        others = tuple(i for i in range(a.ndim) if i != axis % a.ndim)
        total, count = a.sum(axis=others), n.sum(axis=others)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return np.maximum(mean, _MIN_SCALE).astype(np.float32)


def binarize(w: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """XNOR-Net binary weights: codes ``sign(w)`` (+1 for ``w >= 0``) and the scale
    ``alpha = mean |w|`` (per channel along ``axis``), the scale minimising
    ``||w - alpha * sign(w)||``. Returns (int8 codes, float32 scales)."""
    w = np.asarray(w)
    codes = np.where(w >= 0, 1, -1).astype(np.int8)
    return codes, _magnitude_mean(w, np.ones(w.shape, bool), axis)


def ternarize(w: np.ndarray, axis: int | None = None,
              delta_ratio: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Ternary weight networks (Li & Liu, 2016): threshold ``delta = 0.7 mean |w|``; codes
    ``sign(w)`` where ``|w| > delta``, else 0; scale ``alpha`` = mean ``|w|`` above the
    threshold (per channel along ``axis``). Returns (int8 codes, float32 scales)."""
    w = np.asarray(w, dtype=np.float64)
    delta = delta_ratio * _magnitude_mean(w, np.ones(w.shape, bool), axis).astype(np.float64)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis % w.ndim] = -1
        delta = delta.reshape(shape)
    keep = np.abs(w) > delta
    codes = (np.sign(w) * keep).astype(np.int8)
    return codes, _magnitude_mean(w, keep, axis)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """Reference dequantization: ``(q - zp) * scale`` as float32."""
    s = _expand(scale, q.ndim, axis).astype(np.float32)
    z = _expand(zero_point, q.ndim, axis).astype(np.int32)
    return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)


@dataclass(frozen=True)
class Dyadic:
    """A positive real multiplier as ``m0 / 2**shift`` (elementwise for arrays)."""

    m0: np.ndarray  # int64 values in [2^30, 2^31) (smaller only for tiny multipliers)
    shift: np.ndarray  # int64 values in [0, 62]

    def to_float(self) -> np.ndarray:
        return self.m0.astype(np.float64) / np.exp2(self.shift.astype(np.float64))


def dyadic(multiplier: np.ndarray | float) -> Dyadic:
    """Decompose real multipliers ``M > 0`` into ``m0 * 2^-shift`` with 31-bit ``m0``.

    The relative error is below ``2^-30`` for ``2^-31 < M < 2^31``; multipliers below that
    lose mantissa bits (``shift`` saturates at 62), and ``M >= 2^31`` raises.
    """
    m = np.asarray(multiplier, dtype=np.float64)
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise ValueError(f"dyadic multipliers must be finite and positive, got {m}")
    exponent = np.floor(np.log2(m)).astype(np.int64)
    shift = (_DYADIC_BITS - 1) - exponent
    if np.any(shift < 0):
        raise ValueError(f"multiplier too large for a dyadic int32 multiplier: {m.max()}")
    shift = np.minimum(shift, _MAX_SHIFT)
    m0 = np.round(m * np.exp2(shift.astype(np.float64))).astype(np.int64)
    # Rounding may reach 2^31: renormalise.
    over = m0 >= (1 << _DYADIC_BITS)
    m0 = np.where(over, m0 >> 1, m0)
    shift = np.where(over, shift - 1, shift)
    return Dyadic(m0=m0.astype(np.int64), shift=shift.astype(np.int64))


def rounding_right_shift(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round_half_up(x / 2^shift)`` exactly, for int64 ``x`` and ``shift`` in [0, 62]."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    return np.right_shift(x + half, shift)


def requantize(
    acc: np.ndarray,
    d: Dyadic,
    out_zero_point: int | np.ndarray,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> np.ndarray:
    """Reference dyadic requantization of int32 accumulators into the output grid.

    ``clip(zp_out + round_half_up(acc * m0 / 2^shift), qmin, qmax)``, exact in int64.
    """
    acc = np.asarray(acc, dtype=np.int64)
    m0 = _expand(d.m0, acc.ndim, axis)
    sh = _expand(d.shift, acc.ndim, axis)
    y = rounding_right_shift(acc * m0, sh) + np.int64(out_zero_point)
    return np.clip(y, qmin, qmax).astype(np.int32)


#: Entries of an integer gate's parameter vector (see :func:`integer_gate`).
GATE_PARAMS = ("x_off", "g_off", "g_lo", "g_hi", "p_off", "pre_shift", "m0", "shift",
               "zero_point")


def integer_gate(q: np.ndarray, params, qmin: int, qmax: int) -> np.ndarray:
    """Reference of the integer gate that replaces a hard-swish lookup table.

    ``p = (q + x_off) * clip(q + g_off, g_lo, g_hi) + p_off``, then
    ``clip(z + round_half_up((p >> pre_shift) * m0 / 2^shift), qmin, qmax)`` (``p_off``
    holds the pre-shift's rounding; ``m0`` may be negative), ``params`` in the order of
    :data:`GATE_PARAMS`. Every step fits int32 for the parameters ``LowerToIntegerOnly``
    makes (computed here in int64). It is ``c * (a1 x + b1) * clip(a2 x + b2, l, h) + d``
    of the real value ``x`` of the codes ``q`` (hard-swish: ``x * clip(x + 3, 0, 6) / 6``),
    quantized to the output grid.
    """
    x_off, g_off, g_lo, g_hi, p_off, pre_shift, m0, shift, z = \
        (int(v) for v in np.asarray(params).reshape(-1))
    q = np.asarray(q, np.int64)
    p = (q + x_off) * np.clip(q + g_off, g_lo, g_hi) + p_off
    y = rounding_right_shift((p >> pre_shift) * m0, np.int64(shift)) + np.int64(z)
    return np.clip(y, qmin, qmax).astype(np.int32)
