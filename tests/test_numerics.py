"""Scale/zero-point math and dyadic requantization against exact integer arithmetic."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvmquant.numerics import (
    binarize,
    compute_qparams,
    dequantize,
    dyadic,
    quantize,
    requantize,
    rounding_right_shift,
    ternarize,
)
from tvmquant.spec import QuantSpec


def _round_half_up(frac: Fraction) -> int:
    return (frac + Fraction(1, 2)).__floor__()


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=2.0**-30, max_value=2.0**30, allow_nan=False))
def test_dyadic_relative_error(m):
    d = dyadic(m)
    assert 0 <= int(d.shift) <= 62
    assert int(d.m0) < 2**31
    assert abs(float(d.to_float()) - m) / m < 2.0**-29


@settings(max_examples=300, deadline=None)
@given(
    acc=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    m=st.floats(min_value=2.0**-24, max_value=8.0),
    zp=st.integers(min_value=-128, max_value=255),
)
def test_requantize_is_exact_round_half_up(acc, m, zp):
    """requantize == clip(zp + round_half_up(acc * m0 / 2^shift)) in exact rationals."""
    d = dyadic(m)
    exact = _round_half_up(Fraction(acc) * Fraction(int(d.m0), 2 ** int(d.shift))) + zp
    got = int(requantize(np.array([acc], np.int64), d, zp, -(2**31), 2**31 - 1)[0])
    assert got == max(min(exact, 2**31 - 1), -(2**31))
    if -(2**31) < exact < 2**31 - 1:  # unclipped: within one unit of the real product
        assert abs((got - zp) - acc * m) <= 1 + abs(acc * m) * 2.0**-29


@settings(max_examples=200, deadline=None)
@given(x=st.integers(min_value=-(2**61), max_value=2**61), shift=st.integers(0, 62))
def test_rounding_right_shift_exact(x, shift):
    got = int(rounding_right_shift(np.array([x], np.int64), np.array([shift]))[0])
    assert got == _round_half_up(Fraction(x, 2**shift))


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, signed=True, symmetric=True),
    QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True),
    QuantSpec(bits=8, signed=False, symmetric=False),
    QuantSpec(bits=4, signed=True, symmetric=True),
    QuantSpec(bits=4, signed=False, symmetric=False),
])
def test_qparams_represent_zero_and_cover_range(spec):
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo, hi = sorted(rng.normal(0, 3, 2))
        scale, zp = compute_qparams(spec, lo, hi)
        assert scale > 0 and spec.qmin <= zp <= spec.qmax
        # 0.0 is exact
        assert dequantize(quantize(np.zeros(1, np.float32), scale, zp, spec.qmin, spec.qmax),
                          scale, zp)[0] == 0.0
        # the range endpoints are reproduced within half a step (clipping side excepted)
        xs = np.array([min(lo, 0), max(hi, 0)], np.float32)
        back = dequantize(quantize(xs, scale, zp, spec.qmin, spec.qmax), scale, zp)
        tol = scale * (1.0 if spec.symmetric else 0.5) + 1e-6
        if spec.symmetric and spec.signed:
            assert np.all(np.abs(back - xs) <= np.maximum(tol, np.abs(xs) * 0 + tol))
        elif not spec.symmetric:
            assert np.all(np.abs(back - xs) <= tol)


def test_symmetric_signed_has_zero_zero_point():
    scale, zp = compute_qparams(QuantSpec(bits=8), np.array([-2.0, -1.0]), np.array([1.0, 4.0]))
    np.testing.assert_array_equal(zp, [0, 0])
    np.testing.assert_allclose(scale, [2 / 127, 4 / 127], rtol=1e-6)


def test_non_finite_range_is_an_error():
    with pytest.raises(ValueError, match="not finite"):
        compute_qparams(QuantSpec(), np.nan, 1.0)


def test_dyadic_rejects_nonpositive():
    with pytest.raises(ValueError):
        dyadic(0.0)
    with pytest.raises(ValueError):
        dyadic(-1.0)


def test_binary_and_ternary_grids():
    binary = QuantSpec.binary()
    assert (binary.qmin, binary.qmax, binary.is_binary) == (-1, 1, True)
    assert binary.describe() == "binary per_tensor"
    assert binary.observer == "meanabs"
    ternary = QuantSpec.ternary()
    assert (ternary.qmin, ternary.qmax, ternary.is_binary) == (-1, 1, False)
    assert QuantSpec(bits=1, signed=True).qmin == -1 and QuantSpec(bits=1).qmax == 0
    with pytest.raises(ValueError, match="twn"):
        QuantSpec(bits=4, observer="twn")


def test_binarize_minimises_the_error_of_alpha_sign():
    """XNOR-Net's alpha = mean |w| minimises ||w - alpha sign(w)|| (checked on a grid)."""
    rng = np.random.default_rng()
    w = rng.normal(0, 1, (4, 50))
    codes, alpha = binarize(w, axis=0)
    np.testing.assert_array_equal(codes, np.where(w >= 0, 1, -1))
    for c in range(4):
        errs = [np.sum((w[c] - a * codes[c]) ** 2) for a in alpha[c] * np.array([0.9, 1, 1.1])]
        assert np.argmin(errs) == 1
    codes, alpha = ternarize(np.array([[0.1, -2.0, 1.0, 0.5]]), axis=0)
    # delta = 0.7 * 0.9 = 0.63: keeps -2.0 and 1.0, scale their mean magnitude
    np.testing.assert_array_equal(codes, [[0, -1, 1, 0]])
    np.testing.assert_allclose(alpha, [1.5])
