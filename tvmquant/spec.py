"""Quantization specifications: how one tensor is quantized.

A :class:`QuantSpec` describes the integer grid of one tensor (bits, signedness, symmetry,
restricted range) and how its scale is shared (granularity). Granularity and symmetry are
separate fields, never one enum. Derived values are properties.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Granularity(str, enum.Enum):
    """How many scales a tensor has."""

    PER_TENSOR = "per_tensor"
    """One scale (and zero point) for the whole tensor."""
    PER_CHANNEL = "per_channel"
    """One scale per output channel (the op's channel axis, or ``QuantSpec.axis``)."""
    PER_GROUP = "per_group"
    """One scale per output channel and per ``group_size`` elements of the reduction axis."""


@dataclass(frozen=True)
class QuantSpec:
    """The quantization of one tensor.

    Parameters
    ----------
    bits : int
        Width of the integer grid: 1 to 8, or 16 (for high-precision intermediate tensors
        such as the input of a lookup-table activation). Values below 8 are stored in an
        8-bit container until a packed kernel takes them (packing is a lowering concern).
    signed : bool
        Signed grid (``[-2^(b-1), 2^(b-1)-1]``) or unsigned (``[0, 2^b-1]``).
    symmetric : bool
        Zero point fixed (0 for signed grids); otherwise the range ``[min, max]`` is mapped
        onto the whole grid with an integer zero point.
    narrow_range : bool
        Restricted range: drop the most negative code so that a signed grid is symmetric
        about zero (``[-127, 127]`` for 8 bits, ``{-1, 0, +1}`` for 2 bits: ternary). A
        1-bit grid has no room for zero and becomes the **binary** grid ``{-1, +1}``
        (XNOR-Net): codes are the sign of the value (``x >= 0`` gives +1) and the scale is
        a magnitude, XNOR-Net's ``alpha = mean |W|`` per channel for weights, the
        ``meanabs`` observer's ``mean |x|`` for activations.
    granularity : Granularity
        Per tensor, per channel or per group.
    axis : int or None
        Channel axis. ``None`` means "the op's natural output-channel axis" (0 for an OIHW
        conv2d weight, the last axis for a matmul weight), resolved by the pass.
    group_size : int or None
        Elements of the reduction axis sharing one scale; required for ``PER_GROUP``.
    observer : str
        Name of the registered observer that calibrates this tensor's range.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int | None = None
    group_size: int | None = None
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not (1 <= self.bits <= 8 or self.bits == 16):
            raise ValueError(
                f"QuantSpec.bits must be an integer in 1..8, or 16, got {self.bits!r}"
            )
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if self.granularity is Granularity.PER_GROUP:
            if self.group_size is None or self.group_size < 1:
                raise ValueError(
                    "QuantSpec(granularity='per_group') needs group_size >= 1, "
                    f"got {self.group_size!r}; e.g. QuantSpec(..., group_size=32)"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} only applies to granularity='per_group' "
                f"(got {self.granularity.value!r})"
            )
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range applies to signed grids only; use signed=True")
        if self.bits == 1 and not self.symmetric:
            raise ValueError("1-bit (binary) grids are symmetric; use symmetric=True")
        if self.observer == "twn" and not (self.bits == 2 and self.narrow_range):
            raise ValueError("observer='twn' (ternary weight networks) quantizes onto the "
                             "ternary grid: use bits=2, signed=True, narrow_range=True")

    @classmethod
    def binary(cls, **kw) -> QuantSpec:
        """The binary grid ``{-1, +1}`` (XNOR-Net): ``bits=1, narrow_range=True``.

        Per-channel for weights (``granularity="per_channel"``); activations use the
        ``meanabs`` observer by default.
        """
        kw.setdefault("observer", "meanabs")
        return cls(bits=1, signed=True, symmetric=True, narrow_range=True, **kw)

    @classmethod
    def ternary(cls, **kw) -> QuantSpec:
        """The ternary grid ``{-1, 0, +1}`` with TWN's threshold (weights: zero below
        ``0.7 mean |W|``, scale ``mean |W|`` of the rest, per channel by default)."""
        kw.setdefault("observer", "twn")
        kw.setdefault("granularity", "per_channel")
        return cls(bits=2, signed=True, symmetric=True, narrow_range=True, **kw)

    # --- derived values -------------------------------------------------------------------
    @property
    def is_binary(self) -> bool:
        """The binary grid ``{-1, +1}`` (1 bit, restricted range): codes are signs."""
        return self.bits == 1 and self.narrow_range

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if not self.signed:
            return 0
        if self.is_binary:
            return -1
        low = -(1 << (self.bits - 1))
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        if self.is_binary:
            return 1
        return (1 << self.bits) - 1 if not self.signed else (1 << (self.bits - 1)) - 1

    @property
    def storage_dtype(self) -> str:
        """The container dtype of the integer codes (8 bits, or 16 for 16-bit grids)."""
        width = 16 if self.bits > 8 else 8
        return f"int{width}" if self.signed else f"uint{width}"

    @property
    def elements_per_byte(self) -> int:
        """How many codes a packed byte holds (8 // container bits, power of two)."""
        for width in (1, 2, 4, 8):
            if self.bits <= width:
                return 8 // width
        return 1  # 16-bit codes: half an element per byte, reported as 1 (not packed)

    def with_(self, **changes) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``int8 sym per_channel``."""
        kind = "int" if self.signed else "uint"
        if self.is_binary:
            return " ".join(["binary", self.granularity.value])
        parts = [f"{kind}{self.bits}", "sym" if self.symmetric else "asym"]
        if self.narrow_range:
            parts.append("narrow")
        parts.append(self.granularity.value)
        if self.group_size:
            parts.append(f"g{self.group_size}")
        return " ".join(parts)
