"""Range observers: turn calibration data into a ``(min, max)`` range per tensor or channel.

An observer sees a tensor one calibration batch at a time (:meth:`Observer.observe`) and then
reports the range to quantize it with (:meth:`Observer.range`); the range goes to
:func:`tvmquant.numerics.compute_qparams`, which widens it to contain 0 and derives the scale
and zero point for the tensor's :class:`~tvmquant.spec.QuantSpec`.

Registered observers (see :data:`OBSERVERS`):

``"minmax"``
    Running minimum and maximum.
``"moving_average"``
    Exponential moving average of the per-batch minimum and maximum (as PyTorch's
    ``MovingAverageMinMaxObserver``).
``"percentile"``
    Clip at a percentile of ``|x|`` (symmetric specs) or of ``x`` (asymmetric specs).
``"entropy"``
    TensorRT-style KL-divergence calibration on the histogram of ``|x|``.
``"mse"``
    The clipping range that minimizes the mean squared quantization error on the spec's grid.
``"meanabs"``
    ``(-m, m)`` with ``m = mean |x|``: the scale of binary (``QuantSpec.binary()``)
    activations, XNOR-Net's.

Conventions shared by all built-in observers
--------------------------------------------
- ``axis`` keeps that axis of the data (one range per channel, shape ``(C,)``) and reduces
  over all the others; ``axis=None`` gives one range for the whole tensor (0-d arrays).
- Ranges are float64 and never extend beyond the data actually observed: both ends are
  clipped into ``[observed min, observed max]``. For symmetric specs a clipping threshold
  ``T`` is therefore reported as ``(max(-T, min), min(T, max))``; ``compute_qparams`` takes
  ``max(-lo, hi) = T`` from it, so this is the same grid as ``(-T, T)``. Likewise an
  asymmetric range whose low end would be 0 for nonnegative data is reported as
  ``(min, T)``, which ``compute_qparams`` widens to ``[0, T]``.
- The histogram observers (percentile, entropy, mse) keep a fixed number of bins per channel
  (2048 by default) instead of the data, so memory stays bounded however many batches are
  seen. The histogram range starts at the first batch's range and grows when later data
  falls outside it: the bin width is multiplied by a power of two and the low edge moves by a
  whole number of old bins, so old bins nest exactly in new ones and re-binning loses nothing
  beyond the coarser resolution.
- Non-finite data (NaN, inf) and empty batches raise :class:`ValueError`, as does
  :meth:`~Observer.range` before any :meth:`~Observer.observe`.

Custom observers are registered with :func:`register_observer`; a registered class is
constructed as ``cls(spec, axis=axis, **options)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from ..numerics import compute_qparams, dequantize, quantize
from ..spec import QuantSpec

logger = logging.getLogger(__name__)

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MeanAbsObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "ObserverBase",
    "PercentileObserver",
    "magnitude_levels",
    "make_observer",
    "observe_range",
    "register_observer",
]

# Smallest histogram span: a constant tensor still needs a positive bin width. Relative to the
# magnitude of the data (2^-30) with an absolute floor (2^-40); both lie far below the
# smallest scale compute_qparams hands out, so they never change a result.
_MIN_SPAN_ABS = 2.0**-40
_MIN_SPAN_REL = 2.0**-30
# Cap on elements processed at once by the vectorized MSE search (candidates x bins).
_MSE_BLOCK_ELEMENTS = 1 << 22
# Counts given to an empty Q bin facing outlier mass (the reference implementations' eps).
_KL_EPS = 1e-4


@runtime_checkable
class Observer(Protocol):
    """What the calibration loop needs from an observer."""

    def observe(self, x: np.ndarray) -> None:
        """Accumulate statistics of one calibration batch of the tensor."""
        ...

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """``(min, max)`` as float64 arrays: 0-d per tensor, shape ``(C,)`` per channel."""
        ...


OBSERVERS: dict[str, type] = {}
"""Registered observer classes by name; filled by :func:`register_observer`."""


def register_observer(name: str) -> Callable[[type], type]:
    """Class decorator registering an observer class under ``name`` in :data:`OBSERVERS`.

    The class must be constructible as ``cls(spec, axis=None, **options)`` and implement the
    :class:`Observer` protocol.

    Parameters
    ----------
    name : str
        Registry key, as used in ``QuantSpec.observer`` and :func:`make_observer`.

    Returns
    -------
    Callable[[type], type]
        The decorator; it returns the class unchanged.

    Raises
    ------
    ValueError
        If ``name`` is empty or already taken by a different class.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"observer name must be a non-empty string, got {name!r}")

    def decorator(cls: type) -> type:
        if not (callable(getattr(cls, "observe", None)) and callable(getattr(cls, "range", None))):
            raise ValueError(
                f"cannot register {cls!r} as observer {name!r}: it needs observe(x) and "
                "range() methods (see tvmquant.calibration.observers.Observer)"
            )
        old = OBSERVERS.get(name)
        if old is not None and old is not cls and not _same_class_path(old, cls):
            raise ValueError(
                f"observer name {name!r} is already registered to "
                f"{old.__module__}.{old.__qualname__}; pick another name"
            )
        OBSERVERS[name] = cls
        return cls

    return decorator


def _same_class_path(a: type, b: type) -> bool:
    # A re-imported module (importlib.reload) re-registers its classes: allow that.
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def make_observer(
    name: str, spec: QuantSpec, axis: int | None = None, **options: object
) -> Observer:
    """Construct the observer registered as ``name`` for a tensor quantized with ``spec``.

    Parameters
    ----------
    name : str
        A key of :data:`OBSERVERS` (e.g. ``spec.observer``).
    spec : QuantSpec
        The tensor's quantization; histogram observers use its grid.
    axis : int or None
        Channel axis to keep (per-channel ranges); ``None`` for one range per tensor.
    **options
        Extra keyword arguments for the observer class (e.g. ``percentile=99.9``).

    Returns
    -------
    Observer

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the registered names).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"make_observer needs a QuantSpec, got {type(spec).__name__}")
    try:
        cls = OBSERVERS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(n) for n in sorted(OBSERVERS))
        raise ValueError(f"unknown observer {name!r}; registered observers: {known}") from None
    return cls(spec, axis=axis, **options)


def observe_range(
    name: str, spec: QuantSpec, x: np.ndarray, axis: int | None = None, **options: object
) -> tuple[np.ndarray, np.ndarray]:
    """Range of a tensor seen all at once (weights): make an observer, observe ``x``, range.

    Parameters
    ----------
    name, spec, axis, **options
        As for :func:`make_observer`.
    x : ndarray
        The whole tensor.

    Returns
    -------
    tuple of ndarray
        ``(min, max)`` as float64 arrays, 0-d or shape ``(C,)``.
    """
    obs = make_observer(name, spec, axis=axis, **options)
    obs.observe(x)
    return obs.range()


# --------------------------------------------------------------------------------------------
# Base class: validation, channel layout, exact running min/max
# --------------------------------------------------------------------------------------------
class ObserverBase:
    """Shared machinery of the built-in observers.

    Subclasses implement ``_update(x, batch_min, batch_max)`` (``x`` is float64 of shape
    ``(C, N)``, one row per channel; ``C == 1`` per tensor) and ``_compute_range()`` returning
    ``(lo, hi)`` arrays of shape ``(C,)``. The base class validates inputs, tracks the exact
    running min/max (``self.min_val``, ``self.max_val``), clips the result into it and shapes
    the output.

    Parameters
    ----------
    spec : QuantSpec
        Quantization of the observed tensor.
    axis : int or None
        Channel axis to keep, or ``None`` for per-tensor.
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None) -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
            raise ValueError(f"axis must be an int or None, got {axis!r}")
        self.spec = spec
        self.axis = None if axis is None else int(axis)
        self.num_channels: int | None = None
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None
        self.num_batches = 0

    # --- public API -----------------------------------------------------------------------
    def observe(self, x: np.ndarray) -> None:
        """Accumulate one calibration batch.

        Parameters
        ----------
        x : array_like
            A batch of the tensor (any real dtype). With ``axis`` set, its size along
            ``axis`` must be the same for every batch.

        Raises
        ------
        ValueError
            On NaN/inf, an empty batch, a bad axis or a changed channel count.
        """
        data = self._to_channels(x)
        batch_min = data.min(axis=1)
        batch_max = data.max(axis=1)
        if self.min_val is None:
            self.min_val, self.max_val = batch_min.copy(), batch_max.copy()
        else:
            self.min_val = np.minimum(self.min_val, batch_min)
            self.max_val = np.maximum(self.max_val, batch_max)
        self._update(data, batch_min, batch_max)
        self.num_batches += 1

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated ``(min, max)``.

        Returns
        -------
        tuple of ndarray
            float64 arrays, 0-d when ``axis`` is ``None``, else shape ``(C,)``; always
            ``min <= max`` and within the observed data range.

        Raises
        ------
        ValueError
            If no batch was observed.
        """
        if self.min_val is None or self.max_val is None:
            raise ValueError(
                f"{type(self).__name__}.range(): the observer observed no data; call "
                "observe(x) with at least one calibration batch first"
            )
        lo, hi = self._compute_range()
        lo = np.clip(np.asarray(lo, dtype=np.float64), self.min_val, self.max_val)
        hi = np.clip(np.asarray(hi, dtype=np.float64), self.min_val, self.max_val)
        lo = np.minimum(lo, hi)
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec.describe()!r}, axis={self.axis})"

    # --- subclass hooks -------------------------------------------------------------------
    def _update(self, x: np.ndarray, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        raise NotImplementedError

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------
    def _to_channels(self, x: np.ndarray) -> np.ndarray:
        """Validate a batch and lay it out as float64 ``(C, N)``."""
        name = type(self).__name__
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: cannot read the batch as real numbers: {err}") from err
        if arr.size == 0:
            raise ValueError(f"{name}: got an empty batch (shape {arr.shape})")
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum()) - n_nan
            raise ValueError(
                f"{name}: calibration batch of shape {arr.shape} contains {n_nan} NaN and "
                f"{n_inf} inf values; observers need finite data (check the model inputs or "
                "the preceding layers for overflow)"
            )
        if self.axis is None:
            data = arr.reshape(1, -1)
        else:
            if arr.ndim == 0 or not -arr.ndim <= self.axis < arr.ndim:
                raise ValueError(
                    f"{name}: axis={self.axis} is out of range for a batch of shape {arr.shape}"
                )
            data = np.moveaxis(arr, self.axis, 0).reshape(arr.shape[self.axis], -1)
            if data.shape[1] == 0:
                raise ValueError(f"{name}: got an empty batch (shape {arr.shape})")
        channels = data.shape[0]
        if self.num_channels is None:
            self.num_channels = channels
        elif channels != self.num_channels:
            raise ValueError(
                f"{name}: batch has {channels} channels along axis {self.axis}, earlier "
                f"batches had {self.num_channels}"
            )
        return data

    def _symmetric(self, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(-T, T)`` clipped into the observed range (same grid for symmetric specs).

        ``T`` is first clipped into ``[min |x|, max |x|]`` so that the result is never empty.
        """
        assert self.min_val is not None and self.max_val is not None
        amax = np.maximum(-self.min_val, self.max_val)
        straddles = (self.min_val <= 0) & (self.max_val >= 0)
        amin = np.where(straddles, 0.0, np.minimum(np.abs(self.min_val), np.abs(self.max_val)))
        t = np.clip(threshold, amin, amax)
        return np.maximum(-t, self.min_val), np.minimum(t, self.max_val)

    @property
    def _nonnegative(self) -> np.ndarray:
        assert self.min_val is not None
        return self.min_val >= 0


# --------------------------------------------------------------------------------------------
# Min/max observers
# --------------------------------------------------------------------------------------------
@register_observer("minmax")
class MinMaxObserver(ObserverBase):
    """Running minimum and maximum over all observed batches."""

    def _update(self, x: np.ndarray, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        pass  # the base class keeps the running min/max

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val.copy(), self.max_val.copy()


@register_observer("meanabs")
class MeanAbsObserver(ObserverBase):
    """``(-m, m)`` with ``m`` the mean of ``|x|`` over all observed values: XNOR-Net's
    activation scale, for the binary grid (``QuantSpec.binary()``), whose codes are signs and
    whose scale is a typical magnitude rather than a range end."""

    def __init__(self, spec: QuantSpec, axis: int | None = None) -> None:
        super().__init__(spec, axis)
        self.abs_sum: np.ndarray | None = None
        self.count = 0

    def _update(self, x: np.ndarray, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        s = np.abs(x).sum(axis=1)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[1]

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.abs_sum is not None
        m = self.abs_sum / max(self.count, 1)
        return -m, m


@register_observer("moving_average")
class MovingAverageObserver(ObserverBase):
    """Exponential moving average of the per-batch min and max.

    The first batch initializes the averages; each later batch updates
    ``avg += averaging_constant * (batch_value - avg)``, as PyTorch's
    ``MovingAverageMinMaxObserver`` (and its per-channel variant when ``axis`` is set).

    Parameters
    ----------
    spec, axis
        See :class:`ObserverBase`.
    averaging_constant : float
        Weight of the newest batch, in ``(0, 1]``.
    """

    def __init__(
        self, spec: QuantSpec, axis: int | None = None, averaging_constant: float = 0.01
    ) -> None:
        super().__init__(spec, axis)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = float(averaging_constant)
        self.avg_min: np.ndarray | None = None
        self.avg_max: np.ndarray | None = None

    def _update(self, x: np.ndarray, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        if self.avg_min is None or self.avg_max is None:
            self.avg_min, self.avg_max = batch_min.copy(), batch_max.copy()
            return
        c = self.averaging_constant
        self.avg_min = self.avg_min + c * (batch_min - self.avg_min)
        self.avg_max = self.avg_max + c * (batch_max - self.avg_max)

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.avg_min is not None and self.avg_max is not None
        return self.avg_min.copy(), self.avg_max.copy()


# --------------------------------------------------------------------------------------------
# Histograms with a growing range
# --------------------------------------------------------------------------------------------
class _Histogram:
    """Per-channel histograms of a fixed bin count whose range grows to fit new data.

    Each channel ``c`` has bins ``[lo[c] + k * width[c], lo[c] + (k + 1) * width[c])``,
    ``k = 0 .. num_bins - 1`` (the last bin also holds its upper edge). When a batch falls
    outside, the width is multiplied by ``2**k`` and ``lo`` moves down by a whole number ``j``
    of old bins, so old bin ``n`` lies entirely inside new bin ``(n + j) >> k``.

    Parameters
    ----------
    num_bins : int
        Bins per channel.
    anchor_zero : bool
        Keep the low edge at 0 (histograms of ``|x|``); otherwise it starts at the first
        batch's minimum.
    """

    def __init__(self, num_bins: int, anchor_zero: bool) -> None:
        self.num_bins = num_bins
        self.anchor_zero = anchor_zero
        self.lo: np.ndarray | None = None
        self.width: np.ndarray | None = None
        self.counts: np.ndarray | None = None  # float64 (C, num_bins), exact integer counts

    @property
    def hi(self) -> np.ndarray:
        assert self.lo is not None and self.width is not None
        return self.lo + self.width * self.num_bins

    def add(self, x: np.ndarray, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        """Add a ``(C, N)`` batch whose per-channel extremes are ``batch_min/max``."""
        if self.counts is None:
            self._init(batch_min, batch_max)
        else:
            self._grow(batch_min, batch_max)
        assert self.lo is not None and self.width is not None and self.counts is not None
        channels, b = self.counts.shape
        idx = np.floor((x - self.lo[:, None]) / self.width[:, None])
        idx = np.clip(idx, 0, b - 1).astype(np.int64)
        idx += (np.arange(channels, dtype=np.int64) * b)[:, None]
        self.counts += np.bincount(idx.ravel(), minlength=channels * b).reshape(channels, b)

    def _init(self, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        lo = np.zeros_like(batch_min) if self.anchor_zero else batch_min.astype(np.float64)
        span = batch_max - lo
        floor = np.maximum(_MIN_SPAN_ABS, _MIN_SPAN_REL * np.maximum(abs(lo), abs(batch_max)))
        span = np.maximum(span, floor)
        if not np.all(np.isfinite(span)):
            raise ValueError("data range too large for a histogram (max - min overflows)")
        self.lo = lo
        self.width = span / self.num_bins
        self.counts = np.zeros((lo.shape[0], self.num_bins), dtype=np.float64)

    def _grow(self, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        assert self.lo is not None and self.width is not None and self.counts is not None
        lo, w, b = self.lo, self.width, self.num_bins
        if np.all(batch_min >= lo) and np.all(batch_max <= self.hi):
            return
        # j: old bins to extend downwards; k: doublings of the bin width.
        j = np.maximum(np.ceil((lo - batch_min) / w), 0.0)
        j = np.where(lo - j * w > batch_min, j + 1, j)
        need = np.maximum(j + b, np.ceil((batch_max - lo) / w) + j)  # in old-bin units
        k = np.maximum(np.ceil(np.log2(need / b)), 0.0)
        for _ in range(4):  # guard against rounding in log2/ceil
            short = (lo - j * w) + w * np.exp2(k) * b < batch_max
            if not short.any():
                break
            k = np.where(short, k + 1, k)
        new_lo = lo - j * w
        new_w = w * np.exp2(k)
        if not np.all(np.isfinite(new_lo + new_w * b)):
            raise ValueError("data range too large for a histogram (max - min overflows)")
        # Map each old bin (by its center) to the new bin containing it: exact nesting.
        centers = lo[:, None] + (np.arange(b) + 0.5) * w[:, None]
        idx = np.floor((centers - new_lo[:, None]) / new_w[:, None])
        idx = np.clip(idx, 0, b - 1).astype(np.int64)
        channels = self.counts.shape[0]
        idx += (np.arange(channels, dtype=np.int64) * b)[:, None]
        self.counts = np.bincount(
            idx.ravel(), weights=self.counts.ravel(), minlength=channels * b
        ).reshape(channels, b)
        logger.debug(
            "histogram range grown by up to 2^%d: [%s, %s]",
            int(k.max()),
            new_lo.min(),
            (new_lo + new_w * b).max(),
        )
        self.lo, self.width = new_lo, new_w

    def quantile(self, frac: float) -> np.ndarray:
        """Per-channel value below which a fraction ``frac`` of the mass lies.

        Linear interpolation inside the bin where the cumulative count crosses
        ``frac * total`` (data assumed uniform within a bin): error at most one bin width.
        """
        assert self.lo is not None and self.width is not None and self.counts is not None
        cum = np.cumsum(self.counts, axis=1)
        target = frac * cum[:, -1]
        b = np.sum(cum < target[:, None], axis=1)
        b = np.minimum(b, self.num_bins - 1)
        rows = np.arange(cum.shape[0])
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0.0)
        in_bin = self.counts[rows, b]
        part = np.where(in_bin > 0, (target - before) / np.where(in_bin > 0, in_bin, 1.0), 0.0)
        return self.lo + (b + np.clip(part, 0.0, 1.0)) * self.width


class HistogramObserver(ObserverBase):
    """Base of the observers that keep a bounded per-channel histogram.

    Parameters
    ----------
    spec, axis
        See :class:`ObserverBase`.
    num_bins : int
        Histogram bins per channel (default 2048).
    """

    #: Histogram of ``|x|`` (True) or of ``x`` (False); subclasses may decide per spec.
    abs_histogram: bool = True

    def __init__(self, spec: QuantSpec, axis: int | None = None, num_bins: int = 2048) -> None:
        super().__init__(spec, axis)
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)):
            raise ValueError(f"num_bins must be an integer, got {num_bins!r}")
        if num_bins < 16:
            raise ValueError(f"num_bins must be at least 16, got {num_bins}")
        self.hist = _Histogram(int(num_bins), anchor_zero=self._use_abs())

    def _use_abs(self) -> bool:
        return self.abs_histogram

    @property
    def bin_width(self) -> np.ndarray:
        """Current histogram bin width: 0-d per tensor, ``(C,)`` per channel."""
        if self.hist.width is None:
            raise ValueError(f"{type(self).__name__}: the observer observed no data yet")
        w = self.hist.width.copy()
        return w.reshape(()) if self.axis is None else w

    def _update(self, x: np.ndarray, batch_min: np.ndarray, batch_max: np.ndarray) -> None:
        if self.hist.anchor_zero:
            mag = np.abs(x)
            self.hist.add(mag, np.zeros_like(batch_min), np.maximum(-batch_min, batch_max))
        else:
            self.hist.add(x, batch_min, batch_max)


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Clip the range at a percentile of the observed data.

    Symmetric specs clip ``|x|`` at its ``percentile``-th percentile ``T`` (range
    ``(-T, T)``); asymmetric specs clip ``x`` at its ``100 - percentile`` and ``percentile``
    percentiles. Percentiles come from the histogram (linear within a bin), so they are exact
    to one bin width.

    Parameters
    ----------
    spec, axis, num_bins
        See :class:`HistogramObserver`.
    percentile : float
        In ``[50, 100]``; default 99.99.
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        percentile: float = 99.99,
        num_bins: int = 2048,
    ) -> None:
        if not 50.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {percentile!r}")
        self.percentile = float(percentile)
        super().__init__(spec, axis, num_bins=num_bins)

    def _use_abs(self) -> bool:
        return self.spec.symmetric

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        frac = self.percentile / 100.0
        if self.hist.anchor_zero:
            return self._symmetric(self.hist.quantile(frac))
        return self.hist.quantile(1.0 - frac), self.hist.quantile(frac)


# --------------------------------------------------------------------------------------------
# Entropy (KL divergence) calibration
# --------------------------------------------------------------------------------------------
def magnitude_levels(spec: QuantSpec, nonnegative: bool) -> int:
    """Quantization levels available to the magnitude range ``[0, T]`` on ``spec``'s grid.

    - signed symmetric: ``[0, T]`` maps to codes ``0 .. qmax`` -> ``qmax + 1`` levels (128 for
      int8, TensorRT's choice; ``narrow_range`` does not change it);
    - nonnegative data (post-ReLU) on an asymmetric grid, or any unsigned symmetric grid:
      ``[0, T]`` maps to the whole grid -> ``qmax - qmin + 1`` levels (256 for 8 bits);
    - asymmetric grid, data of both signs: ``[-T, T]`` maps to the whole grid, so ``[0, T]``
      gets half of its levels.

    The result is at least 2.
    """
    codes = spec.qmax - spec.qmin + 1
    if spec.symmetric and spec.signed:
        levels = spec.qmax + 1
    elif nonnegative or spec.symmetric:
        levels = codes
    else:
        levels = codes // 2
    return max(int(levels), 2)


def _kl_divergences(hist: np.ndarray, levels: int, eps: float = _KL_EPS) -> np.ndarray:
    """KL(P || Q) for every candidate threshold bin ``i = levels .. len(hist)``.

    TensorRT / MXNet algorithm, vectorized with prefix sums: ``P = hist[:i]`` with the
    outliers ``sum(hist[i:])`` added to its last bin; ``Q`` = ``hist[:i]`` (without outliers)
    merged into ``levels`` chunks of ``i // levels`` bins (the last chunk takes the rest),
    each chunk's mass spread evenly over the chunk's bins where ``P`` is nonzero. Both are
    normalized before the divergence.

    Smoothing: when the last chunk of ``Q`` is empty although ``P`` has (outlier) mass there,
    that bin of ``Q`` gets ``eps`` counts, as the epsilon smoothing of the reference
    implementations does; without it every threshold below a far outlier would score
    ``inf``. The reference's ``O(eps)`` adjustment of the other bins is left out. A
    candidate with no data below the threshold (``sum(hist[:i]) == 0``) scores ``inf``.

    Returns
    -------
    ndarray
        float64 of length ``len(hist) - levels + 1`` (entry ``i - levels``).
    """
    h = np.asarray(hist, dtype=np.float64)
    nb = h.shape[0]
    total = h.sum()
    cand = np.arange(levels, nb + 1)  # threshold bin counts i
    csum = np.concatenate([[0.0], np.cumsum(h)])
    cnz = np.concatenate([[0], np.cumsum(h > 0)])
    chl = np.concatenate([[0.0], np.cumsum(_xlogx(h))])

    out = total - csum[cand]  # outlier mass folded into P's last bin
    last = h[cand - 1] + out  # P's last bin
    merged = cand // levels
    starts = np.arange(levels)[None, :] * merged[:, None]  # (K, L)
    stops = starts + merged[:, None]
    stops[:, -1] = cand
    s = csum[stops] - csum[starts]  # Q mass per chunk
    n = (cnz[stops] - cnz[starts]).astype(np.float64)  # P's nonzero bins per chunk
    n[:, -1] += (last > 0).astype(np.float64) - (h[cand - 1] > 0)
    t = s.copy()  # P mass per chunk
    t[:, -1] += out
    # Only the last chunk can hold P mass without Q mass (the folded outliers, n == 1 then).
    s = np.where((t > 0) & (s <= 0), eps, s)

    z_q = s.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_q = np.where(t > 0, t * np.log(s / np.where(n > 0, n, 1.0)), 0.0).sum(axis=1)
        p_log_p = chl[cand - 1] + _xlogx(last)
        kl = (p_log_p - p_log_q) / total + np.log(z_q / total)
    bad = (total - out <= 0) | ~np.isfinite(kl)
    return np.where(bad, np.inf, np.maximum(kl, 0.0))


def _xlogx(v: np.ndarray) -> np.ndarray:
    """``v * log(v)`` elementwise with ``0 log 0 = 0``."""
    pos = v > 0
    return np.where(pos, v * np.log(np.where(pos, v, 1.0)), 0.0)


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    """TensorRT-style entropy calibration: the threshold minimizing KL(P || Q).

    Keeps a histogram of ``|x|`` (``num_bins`` bins, growing range). For every candidate
    threshold bin ``i`` from ``levels`` to ``num_bins`` it compares the reference
    distribution ``P`` (``hist[:i]``, outliers folded into the last bin) with ``Q``, ``P``
    quantized to ``levels`` bins and expanded back (empty bins stay empty), and picks the
    threshold ``T = i * bin_width`` of smallest divergence. ``levels`` comes from
    :func:`magnitude_levels`: 128 for signed symmetric int8, 256 for nonnegative data on an
    asymmetric 8-bit grid (post-ReLU, range ``[0, T]``), 128 for mixed-sign data on an
    asymmetric 8-bit grid (range ``[-T, T]``).

    The range is ``(-T, T)`` clipped into the observed data range (see module notes), so
    nonnegative data gives ``(min, T)``, i.e. ``[0, T]`` once ``compute_qparams`` includes 0.
    Per-channel (``axis``) ranges loop over channels.

    Parameters
    ----------
    spec, axis, num_bins
        See :class:`HistogramObserver`; ``num_bins`` must be at least ``levels``.
    """

    abs_histogram = True

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        counts, width = self.hist.counts, self.hist.width
        assert counts is not None and width is not None
        nonneg = self._nonnegative
        thresholds = np.empty(counts.shape[0], dtype=np.float64)
        for c in range(counts.shape[0]):
            levels = magnitude_levels(self.spec, bool(nonneg[c]))
            if levels > self.hist.num_bins:
                raise ValueError(
                    f"EntropyObserver: num_bins={self.hist.num_bins} is smaller than the "
                    f"{levels} quantization levels of {self.spec.describe()}"
                )
            kl = _kl_divergences(counts[c], levels)
            best = int(np.argmin(kl))
            thresholds[c] = (best + levels) * width[c]
            logger.debug(
                "entropy channel %d: threshold bin %d/%d (T=%g, KL=%g, levels=%d)",
                c,
                best + levels,
                self.hist.num_bins,
                thresholds[c],
                kl[best],
                levels,
            )
        return self._symmetric(thresholds)


# --------------------------------------------------------------------------------------------
# MSE calibration
# --------------------------------------------------------------------------------------------
@register_observer("mse")
class MSEObserver(HistogramObserver):
    """The clipping range that minimizes the mean squared quantization error.

    Candidate ranges scale the observed range by ratios ``r`` in
    ``linspace(min_ratio, 1, num_candidates)``: ``(-r * max|x|, r * max|x|)`` for symmetric
    specs, ``(r * min(min, 0), r * max(max, 0))`` for asymmetric ones. Each candidate is
    scored with the spec's real grid (:func:`~tvmquant.numerics.compute_qparams`,
    :func:`~tvmquant.numerics.quantize`, :func:`~tvmquant.numerics.dequantize`) on the
    histogram of ``x`` rather than on the raw data, to bound memory: the expected error is
    ``sum(counts * (c - dequantize(quantize(c)))**2) / sum(counts)`` over bin centers ``c``.
    With 2048 bins the bin width is at most 1/8 of the quantization step of an 8-bit grid,
    so the estimate is close to the error on the raw data. Ties go to the larger range.

    Parameters
    ----------
    spec, axis, num_bins
        See :class:`HistogramObserver`.
    num_candidates : int
        Number of clip ratios searched (default 100).
    min_ratio : float
        Smallest clip ratio, in ``(0, 1]`` (default 0.01).
    """

    abs_histogram = False

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        num_candidates: int = 100,
        min_ratio: float = 0.01,
        num_bins: int = 2048,
    ) -> None:
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)):
            raise ValueError(f"num_candidates must be an integer, got {num_candidates!r}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio!r}")
        self.ratios = np.linspace(min_ratio, 1.0, int(num_candidates))
        super().__init__(spec, axis, num_bins=num_bins)

    def candidate_errors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate ranges and their expected squared errors.

        Returns
        -------
        lo, hi, mse : ndarray
            float64 of shape ``(C, num_candidates)``.
        """
        counts, width, hlo = self.hist.counts, self.hist.width, self.hist.lo
        if counts is None or width is None or hlo is None:
            raise ValueError("MSEObserver: the observer observed no data")
        assert self.min_val is not None and self.max_val is not None
        r = self.ratios[None, :]
        if self.spec.symmetric:
            amax = np.maximum(-self.min_val, self.max_val)[:, None]
            lo, hi = -r * amax, r * amax
        else:
            lo = r * np.minimum(self.min_val, 0.0)[:, None]
            hi = r * np.maximum(self.max_val, 0.0)[:, None]
        channels, nb = counts.shape
        k = self.ratios.shape[0]
        centers = hlo[:, None] + (np.arange(nb) + 0.5) * width[:, None]  # (C, B)
        mse = np.empty((channels, k), dtype=np.float64)
        qmin, qmax = self.spec.qmin, self.spec.qmax
        block = max(1, _MSE_BLOCK_ELEMENTS // (k * nb))
        for c0 in range(0, channels, block):
            sl = slice(c0, min(c0 + block, channels))
            nc = sl.stop - sl.start
            scale, zp = compute_qparams(self.spec, lo[sl].ravel(), hi[sl].ravel())
            x = np.repeat(centers[sl], k, axis=0)  # (nc * K, B)
            deq = dequantize(quantize(x, scale, zp, qmin, qmax, axis=0), scale, zp, axis=0)
            sq = (x - deq.astype(np.float64)) ** 2 * np.repeat(counts[sl], k, axis=0)
            mse[sl] = sq.sum(axis=1).reshape(nc, k) / counts[sl].sum(axis=1)[:, None]
        return lo, hi, mse

    def _compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi, mse = self.candidate_errors()
        best_err = mse.min(axis=1, keepdims=True)
        # Largest ratio among the (near-)ties: prefer clipping less.
        ok = mse <= best_err * (1.0 + 1e-9) + 1e-300
        best = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
        rows = np.arange(lo.shape[0])
        logger.debug("mse: chosen clip ratios %s", self.ratios[best])
        lo_b, hi_b = lo[rows, best], hi[rows, best]
        if self.spec.symmetric:
            return self._symmetric(hi_b)
        return lo_b, hi_b
