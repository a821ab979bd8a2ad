"""Tests of the calibration range observers against distributions with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from tvmquant.calibration import observers as obs_mod
from tvmquant.calibration.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    _Histogram,
    _kl_divergences,
    magnitude_levels,
    make_observer,
    observe_range,
    register_observer,
)
from tvmquant.numerics import compute_qparams, dequantize, quantize
from tvmquant.spec import QuantSpec

BUILTIN = ("minmax", "moving_average", "percentile", "entropy", "mse", "meanabs")
INT8 = QuantSpec()
INT8_ASYM = QuantSpec(symmetric=False)
INT4 = QuantSpec(bits=4)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _observe_all(name: str, spec: QuantSpec, batches, axis=None, **options):
    obs = make_observer(name, spec, axis=axis, **options)
    for b in batches:
        obs.observe(b)
    return obs


# --- minmax ---------------------------------------------------------------------------------
def test_minmax_exact_over_batches():
    rng = _rng(1)
    batches = [rng.normal(size=(n, 7)) * s for n, s in ((3, 1.0), (5, 4.0), (2, 0.5))]
    lo, hi = _observe_all("minmax", INT8, batches).range()
    data = np.concatenate(batches)
    assert lo.shape == () and hi.shape == ()
    assert lo.dtype == np.float64 and hi.dtype == np.float64
    assert lo == data.min() and hi == data.max()


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_minmax_per_channel_matches_numpy(axis):
    rng = _rng(2)
    batches = [
        rng.normal(size=(2, 5, 3, 4)) * rng.uniform(0.1, 5, size=(1, 5, 1, 1)) for _ in range(3)
    ]
    lo, hi = _observe_all("minmax", INT8, batches, axis=axis).range()
    data = np.concatenate(batches, axis=0)
    ax = axis % data.ndim
    others = tuple(i for i in range(data.ndim) if i != ax)
    if ax == 0:  # batches along axis 0 would change the channel count: use one batch
        lo, hi = observe_range("minmax", INT8, data, axis=axis)
    assert lo.shape == (data.shape[ax],)
    np.testing.assert_array_equal(lo, data.min(axis=others))
    np.testing.assert_array_equal(hi, data.max(axis=others))


def test_integer_input_accepted():
    w = np.array([[-128, 5], [7, 127]], dtype=np.int8)
    lo, hi = observe_range("minmax", INT8, w, axis=0)
    np.testing.assert_array_equal(lo, [-128.0, 7.0])
    np.testing.assert_array_equal(hi, [5.0, 127.0])


# --- moving average -------------------------------------------------------------------------
def test_moving_average_hand_computed():
    batches = [np.array([-1.0, 2.0]), np.array([-3.0, 4.0]), np.array([0.5, 1.0])]
    lo, hi = _observe_all("moving_average", INT8, batches).range()
    # min: -1 -> -1 + 0.01 * (-3 + 1) = -1.02 -> -1.02 + 0.01 * (0.5 + 1.02) = -1.0048
    # max:  2 ->  2 + 0.01 * (4 - 2) = 2.02 -> 2.02 + 0.01 * (1 - 2.02) = 2.0098
    assert lo == pytest.approx(-1.0048, abs=1e-12)
    assert hi == pytest.approx(2.0098, abs=1e-12)


def test_moving_average_per_channel_custom_constant():
    b1 = np.array([[1.0, 3.0], [-2.0, 0.0]])  # channel = axis 0
    b2 = np.array([[0.0, 5.0], [-4.0, 2.0]])
    lo, hi = _observe_all("moving_average", INT8, [b1, b2], axis=0, averaging_constant=0.5).range()
    np.testing.assert_allclose(lo, [0.5, -3.0])
    np.testing.assert_allclose(hi, [4.0, 1.0])


def test_moving_average_rejects_bad_constant():
    with pytest.raises(ValueError, match="averaging_constant"):
        make_observer("moving_average", INT8, averaging_constant=0.0)


# --- histogram machinery --------------------------------------------------------------------
def test_histogram_growth_rebins_exactly():
    rng = _rng(3)
    b1 = rng.uniform(0.0, 1.0, size=(1, 5000))
    b2 = rng.uniform(-0.7, 3.3, size=(1, 5000))
    h = _Histogram(256, anchor_zero=False)
    for b in (b1, b2):
        h.add(b, b.min(axis=1), b.max(axis=1))
    assert h.lo[0] <= b2.min() and h.hi[0] >= b2.max()
    # The width grew by a power of two and the low edge moved by whole old bins.
    w0 = (b1.max() - b1.min()) / 256
    ratio = h.width[0] / w0
    assert ratio == pytest.approx(2.0 ** round(np.log2(ratio)), rel=1e-12) and ratio >= 4
    shift = (b1.min() - h.lo[0]) / w0
    assert shift == pytest.approx(round(shift), abs=1e-6)
    # Same counts as binning all data on the final grid (up to float ties at bin edges).
    allx = np.concatenate([b1, b2], axis=1)[0]
    idx = np.clip(np.floor((allx - h.lo[0]) / h.width[0]), 0, 255).astype(int)
    ref = np.bincount(idx, minlength=256)
    assert h.counts.sum() == allx.size
    assert np.abs(h.counts[0] - ref).sum() <= 2


def test_histogram_observer_memory_is_bounded():
    obs = make_observer("percentile", INT8, axis=0)
    rng = _rng(4)
    for scale in (1.0, 10.0, 0.1, 1000.0):
        obs.observe(rng.normal(size=(3, 1000)) * scale)
    assert isinstance(obs, HistogramObserver)
    assert obs.hist.counts.shape == (3, 2048)
    assert obs.hist.counts.sum() == 3 * 4000


# --- percentile -----------------------------------------------------------------------------
def test_percentile_uniform_asymmetric():
    x = _rng(5).uniform(-1, 1, 200_000)
    obs = _observe_all("percentile", INT8_ASYM, [x], percentile=99.0)
    lo, hi = obs.range()
    # 99th percentile of U(-1, 1) is 0.98; sampling sd ~ 5e-4, plus one bin width.
    tol = float(obs.bin_width) + 0.002
    assert hi == pytest.approx(0.98, abs=tol)
    assert lo == pytest.approx(-0.98, abs=tol)


def test_percentile_uniform_symmetric_uses_abs():
    x = _rng(6).uniform(-1, 1, 200_000)
    obs = _observe_all("percentile", INT8, [x], percentile=99.0)
    lo, hi = obs.range()
    tol = float(obs.bin_width) + 0.002
    assert hi == pytest.approx(0.99, abs=tol)  # of |x| ~ U(0, 1)
    assert lo == pytest.approx(-0.99, abs=tol)


@pytest.mark.parametrize(("spec", "z"), [(INT8_ASYM, 2.3263), (INT8, 2.5758)])
def test_percentile_gaussian(spec, z):
    sigma = 3.0
    x = _rng(7).normal(0.0, sigma, 400_000)
    # Several batches: the histogram grows as wider batches arrive.
    obs = _observe_all("percentile", spec, np.array_split(x, 4), percentile=99.0)
    _, hi = obs.range()
    tol = float(obs.bin_width) + 0.02 * sigma
    assert hi == pytest.approx(z * sigma, abs=tol)


def test_percentile_growth_matches_single_batch():
    x = _rng(8).standard_normal(100_000)
    batches = [x[:1000] * 0.1, x[1000:50_000], x[50_000:]]
    one = observe_range("percentile", INT8_ASYM, np.concatenate(batches), percentile=99.9)
    many = _observe_all("percentile", INT8_ASYM, batches, percentile=99.9)
    bw = float(many.bin_width)
    for a, b in zip(one, many.range()):
        assert a == pytest.approx(b, abs=2 * bw)


def test_percentile_per_channel():
    rng = _rng(9)
    x = rng.uniform(-1, 1, size=(100_000, 2)) * np.array([1.0, 5.0])
    obs = _observe_all("percentile", INT8_ASYM, [x], axis=1, percentile=99.0)
    lo, hi = obs.range()
    tol = obs.bin_width + 0.003 * np.array([1.0, 5.0])
    np.testing.assert_array_less(np.abs(hi - np.array([0.98, 4.9])), tol)
    np.testing.assert_array_less(np.abs(lo + np.array([0.98, 4.9])), tol)


def test_percentile_validates_argument():
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(INT8, percentile=101.0)


# --- entropy --------------------------------------------------------------------------------
def _mxnet_kl(hist: np.ndarray, levels: int) -> np.ndarray:
    """MXNet's ``_get_optimal_threshold`` divergences (loop, full eps smoothing)."""

    def smooth(p, eps=1e-4):
        zeros = p == 0
        if zeros.all():
            raise ValueError
        eps1 = eps * zeros.sum() / (p.size - zeros.sum())
        return p + eps * zeros - eps1 * ~zeros

    out = []
    for i in range(levels, hist.size + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        m = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start, stop = j * m, (i if j == levels - 1 else (j + 1) * m)
            nz = (p[start:stop] != 0).sum()
            if nz:
                q[start:stop] = sliced[start:stop].sum() / nz
        q[p == 0] = 0
        try:
            out.append(stats.entropy(smooth(p), smooth(q)))
        except ValueError:
            out.append(np.inf)
    return np.array(out)


def test_kl_divergences_match_reference_loop():
    rng = _rng(10)
    x = np.abs(np.concatenate([rng.laplace(size=20_000), [40.0, 41.0]]))
    hist, _ = np.histogram(x, 256, (0, x.max()))
    ours = _kl_divergences(hist, 16)
    ref = _mxnet_kl(hist, 16)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], atol=1e-5)
    assert abs(int(np.argmin(ours)) - int(np.argmin(ref))) <= 2


def test_magnitude_levels():
    assert magnitude_levels(INT8, nonnegative=False) == 128
    assert magnitude_levels(INT8.with_(narrow_range=True), nonnegative=False) == 128
    assert magnitude_levels(INT8, nonnegative=True) == 128
    assert magnitude_levels(INT8_ASYM, nonnegative=True) == 256
    assert magnitude_levels(INT8_ASYM, nonnegative=False) == 128
    assert magnitude_levels(QuantSpec(signed=False, symmetric=False), nonnegative=True) == 256
    assert magnitude_levels(INT4, nonnegative=False) == 8


def _gauss_with_outliers(seed: int, n: int = 1_000_000) -> np.ndarray:
    return np.concatenate([_rng(seed).standard_normal(n), np.full(10, 100.0)])


def test_entropy_ignores_far_outliers():
    x = _gauss_with_outliers(11)
    lo, hi = observe_range("entropy", INT8, x)
    threshold = max(-lo, hi)
    assert 2.0 < threshold < 10.0
    assert lo >= x.min() and hi <= 100.0


def test_entropy_uniform_keeps_max():
    x = _rng(12).uniform(-1, 1, 200_000)
    lo, hi = observe_range("entropy", INT8, x)
    assert max(-lo, hi) > 0.9 * np.abs(x).max()


def test_entropy_per_channel():
    n = 200_000
    w = np.stack([_gauss_with_outliers(13, n), _rng(14).uniform(-3, 3, n + 10)], axis=0)
    lo, hi = observe_range("entropy", INT8, w, axis=0)
    t = np.maximum(-lo, hi)
    assert 2.0 < t[0] < 10.0
    assert t[1] > 0.9 * 3.0


def test_entropy_relu_data_asymmetric():
    x = np.concatenate([np.maximum(_rng(15).standard_normal(400_000), 0.0), np.full(5, 40.0)])
    obs = make_observer("entropy", INT8_ASYM)
    obs.observe(x)
    lo, hi = obs.range()
    assert lo == 0.0  # [0, T] for post-ReLU data
    # 256 levels here, so the smallest candidate is 256 bins = 40 / 8 = 5.
    assert 2.0 < hi < 8.0


def test_entropy_rejects_too_few_bins():
    obs = EntropyObserver(INT8_ASYM, num_bins=64)
    obs.observe(np.abs(_rng(16).normal(size=1000)))
    with pytest.raises(ValueError, match="num_bins"):
        obs.range()


# --- mse ------------------------------------------------------------------------------------
def _raw_mse(spec: QuantSpec, x: np.ndarray, lo: float, hi: float) -> float:
    scale, zp = compute_qparams(spec, lo, hi)
    deq = dequantize(quantize(x, scale, zp, spec.qmin, spec.qmax), scale, zp)
    return float(np.mean((x - deq.astype(np.float64)) ** 2))


def _brute_force_symmetric_clip(spec: QuantSpec, x: np.ndarray) -> tuple[float, float]:
    amax = np.abs(x).max()
    clips = np.linspace(0.01, 1.0, 100) * amax
    errs = [_raw_mse(spec, x, -t, t) for t in clips]
    best = int(np.argmin(errs))
    return float(clips[best]), float(errs[best])


def test_mse_laplace_4bit_matches_brute_force():
    x = _rng(17).laplace(0.0, 1.0, 200_000)
    lo, hi = observe_range("mse", INT4, x)
    clip = float(max(-lo, hi))
    amax = np.abs(x).max()
    assert clip < 0.6 * amax  # well below max|x| (~12 here)
    assert 3.5 < clip < 6.0  # known optimum for Laplace(b=1) on a 4-bit grid, around 4.5-5
    bf_clip, bf_err = _brute_force_symmetric_clip(INT4, x)
    assert clip == pytest.approx(bf_clip, abs=2 * 0.01 * amax)  # within two candidate steps
    assert _raw_mse(INT4, x, lo, hi) <= bf_err * 1.01


def test_mse_histogram_estimate_tracks_raw_error():
    x = _rng(18).laplace(0.0, 1.0, 100_000)
    obs = MSEObserver(INT4)
    obs.observe(x)
    lo, hi, est = obs.candidate_errors()
    for k in (10, 40, 99):
        raw = _raw_mse(INT4, x, lo[0, k], hi[0, k])
        assert est[0, k] == pytest.approx(raw, rel=0.05)


def test_mse_uniform_8bit_keeps_max():
    x = _rng(19).uniform(-1, 1, 200_000)
    lo, hi = observe_range("mse", INT8, x)
    assert max(-lo, hi) > 0.98 * np.abs(x).max()
    lo, hi = observe_range("mse", INT8_ASYM, x)
    assert lo < -0.98 and hi > 0.98


def test_mse_uniform_4bit_matches_brute_force():
    x = _rng(20).uniform(-1, 1, 100_000)
    lo, hi = observe_range("mse", INT4, x)
    bf_clip, _ = _brute_force_symmetric_clip(INT4, x)
    assert max(-lo, hi) == pytest.approx(bf_clip, abs=0.021)
    assert max(-lo, hi) > 0.9


def test_mse_per_channel_equals_per_tensor_runs():
    rng = _rng(21)
    w = np.stack([rng.laplace(size=20_000), rng.uniform(-2, 2, 20_000)], axis=1)
    lo, hi = observe_range("mse", INT4, w, axis=1)
    for c in range(2):
        lo_c, hi_c = observe_range("mse", INT4, w[:, c])
        assert lo[c] == lo_c and hi[c] == hi_c


# --- mean magnitude (binary activations) ----------------------------------------------------
def test_meanabs_over_batches_and_channels():
    rng = np.random.default_rng(0)
    xs = [rng.normal(0, 2, (4, 3, 5)) for _ in range(3)]
    binary = QuantSpec.binary()
    lo, hi = observe_range("meanabs", binary, np.concatenate(xs))
    obs = make_observer("meanabs", binary)
    for x in xs:
        obs.observe(x)
    np.testing.assert_allclose(obs.range(), (lo, hi), rtol=1e-12)
    np.testing.assert_allclose(hi, np.abs(np.concatenate(xs)).mean())
    np.testing.assert_allclose(lo, -hi)
    _, hi_c = observe_range("meanabs", binary, xs[0], axis=1)
    np.testing.assert_allclose(hi_c, np.abs(xs[0]).mean(axis=(0, 2)))
    scale, zp = compute_qparams(binary, lo, hi)  # the binary grid's scale is the magnitude
    np.testing.assert_allclose(scale, hi, rtol=1e-6)
    assert zp == 0


# --- registry -------------------------------------------------------------------------------
def test_builtins_registered_and_follow_protocol():
    for name in BUILTIN:
        assert name in OBSERVERS
        assert isinstance(make_observer(name, INT8), Observer)


def test_unknown_observer_lists_registered_names():
    with pytest.raises(ValueError, match="unknown observer 'nope'") as err:
        make_observer("nope", INT8)
    for name in BUILTIN:
        assert repr(name) in str(err.value)


def test_register_custom_observer():
    name = "test_constant_range"
    try:

        @register_observer(name)
        class ConstantObserver:
            def __init__(self, spec, axis=None, value=2.0):
                self.value = value
                self.seen = 0

            def observe(self, x):
                self.seen += 1

            def range(self):
                return np.array(-self.value), np.array(self.value)

        assert OBSERVERS[name] is ConstantObserver
        assert observe_range(name, INT8, np.zeros(3), value=3.0) == (-3.0, 3.0)
        with pytest.raises(ValueError, match="already registered"):
            register_observer(name)(type("Other", (ConstantObserver,), {}))
    finally:
        OBSERVERS.pop(name, None)
    with pytest.raises(ValueError, match="observe"):
        register_observer("test_broken")(type("Broken", (), {}))
    assert "test_broken" not in OBSERVERS


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_no_data_error(name):
    with pytest.raises(ValueError, match="observed no data"):
        make_observer(name, INT8).range()


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_input_error(name, bad, word):
    obs = make_observer(name, INT8)
    x = np.array([0.0, 1.0, bad])
    with pytest.raises(ValueError, match=word):
        obs.observe(x)


def test_bad_batches_rejected():
    obs = make_observer("minmax", INT8, axis=1)
    with pytest.raises(ValueError, match="empty"):
        obs.observe(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="axis=1 is out of range"):
        obs.observe(np.zeros(4))
    obs.observe(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="earlier batches had 3"):
        obs.observe(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="axis"):
        make_observer("minmax", INT8, axis=1.5)
    with pytest.raises(TypeError, match="QuantSpec"):
        make_observer("minmax", "int8")


def test_observe_range_equals_manual():
    x = _rng(22).normal(size=(8, 16))
    for name in BUILTIN:
        obs = make_observer(name, INT8, axis=0)
        obs.observe(x)
        for a, b in zip(observe_range(name, INT8, x, axis=0), obs.range()):
            np.testing.assert_array_equal(a, b)


# --- property -------------------------------------------------------------------------------
_specs = st.builds(
    QuantSpec,
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
    symmetric=st.booleans(),
)
_values = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _batches(draw):
    channels = draw(st.integers(1, 3))
    n_batches = draw(st.integers(1, 3))
    return [
        draw(hnp.arrays(np.float64, (channels, draw(st.integers(1, 40))), elements=_values))
        for _ in range(n_batches)
    ]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(BUILTIN), spec=_specs, batches=_batches(), per_channel=st.booleans())
def test_range_is_ordered_and_within_data(name, spec, batches, per_channel):
    axis = 0 if per_channel else None
    obs = make_observer(name, spec, axis=axis)
    for b in batches:
        obs.observe(b)
    lo, hi = obs.range()
    data = np.concatenate(batches, axis=1)
    if axis is None:
        assert lo.shape == () and hi.shape == ()
        dmin, dmax = np.array([data.min()]), np.array([data.max()])
    else:
        assert lo.shape == hi.shape == (data.shape[0],)
        dmin, dmax = data.min(axis=1), data.max(axis=1)
    assert lo.dtype == np.float64 and hi.dtype == np.float64
    bw = np.ravel(obs.bin_width) if isinstance(obs, HistogramObserver) else 0.0
    lo, hi = np.ravel(lo), np.ravel(hi)
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    assert np.all(lo <= hi)
    assert np.all(lo >= dmin - bw) and np.all(hi <= dmax + bw)
    scale, _ = compute_qparams(spec, lo, hi)  # usable by the rest of the pipeline
    assert np.all(scale > 0)


def test_module_exports_exist():
    for name in obs_mod.__all__:
        assert hasattr(obs_mod, name)
