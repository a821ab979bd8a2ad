"""Quantization configurations and named presets.

A :class:`QuantConfig` says how weights and activations are quantized, whether activation
ranges are static (calibrated) or dynamic (computed at run time), and per-layer exceptions.
Layers are named structurally (``conv2d_0``, ``matmul_3``, ...: op name and its index in
dataflow order, see :func:`tvmquant.passes.analysis.layer_names`), so names are stable for a
given model whatever its variables are called.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from .spec import Granularity, QuantSpec


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer exception to a :class:`QuantConfig`.

    Parameters
    ----------
    pattern : str
        Glob matched against the layer name (``conv2d_0``) or the op name (``conv2d``,
        ``matmul``, ``add``): ``"conv2d_0"``, ``"matmul*"``, ``"*"``.
    weight, activation : QuantSpec or None
        Replacement specs; ``None`` keeps the config's.
    """

    pattern: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None

    def matches(self, layer: str, op: str) -> bool:
        return fnmatch.fnmatchcase(layer, self.pattern) or fnmatch.fnmatchcase(op, self.pattern)


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized.

    Parameters
    ----------
    weight : QuantSpec
        Default weight spec.
    activation : QuantSpec
        Default activation spec.
    dynamic : bool
        Dynamic activation ranges (computed from each input at run time) instead of
        calibrated static ranges. Dynamic graphs keep a float rescale after each integer
        kernel and are therefore not integer-only.
    overrides : tuple of LayerOverride
        Per-layer exceptions; the last matching override wins.
    skip : tuple of str
        Globs of layer or op names left in float.
    lut_input_bits : int
        Bits of tensors that only lookup-table activations (hard-swish, sigmoid, ...) read.
        16 keeps pre-activation values precise at no cost to the convolution producing them
        (its requantization writes int16 instead of int8) and a 64K-entry table; 8 uses the
        activation spec. Overrides that set an activation spec take precedence.
    integer_gates : bool
        Lower hard-swish-like activations (``c * x * clip(x + b, l, h) + d``) of 16-bit codes
        to integer arithmetic in int32 vectors instead of a 64K-entry table: within one
        output step of the table on every code, equal on at least 99% of them, and several
        times cheaper per value. False keeps every activation a table (the float32
        evaluation, code for code).
    """

    weight: QuantSpec = field(default_factory=QuantSpec)
    activation: QuantSpec = field(default_factory=QuantSpec)
    dynamic: bool = False
    overrides: tuple[LayerOverride, ...] = ()
    skip: tuple[str, ...] = ()
    lut_input_bits: int = 16
    integer_gates: bool = True

    def __post_init__(self) -> None:
        if self.lut_input_bits not in (8, 16):
            raise ValueError(f"lut_input_bits must be 8 or 16, got {self.lut_input_bits!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.dynamic and self.activation.is_binary:
            raise ValueError("binary activations are calibrated (the meanabs observer); "
                             "use a static config (dynamic=False)")
        if self.activation.granularity is not Granularity.PER_TENSOR:
            raise ValueError(
                "activations are quantized per tensor; per-channel/per-group activation "
                f"specs are not supported (got {self.activation.granularity.value!r})"
            )

    def is_skipped(self, layer: str, op: str) -> bool:
        """Whether a layer stays in float."""
        return any(
            fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(op, p) for p in self.skip
        )

    def weight_spec(self, layer: str, op: str) -> QuantSpec:
        """The weight spec of one layer, after overrides."""
        spec = self.weight
        for ov in self.overrides:
            if ov.weight is not None and ov.matches(layer, op):
                spec = ov.weight
        return spec

    def activation_spec(self, layer: str, op: str) -> QuantSpec:
        """The spec of a layer's output activation, after overrides."""
        spec = self.activation
        for ov in self.overrides:
            if ov.activation is not None and ov.matches(layer, op):
                spec = ov.activation
        return spec

    def with_overrides(self, *overrides: LayerOverride) -> QuantConfig:
        """A copy with more overrides appended."""
        return replace(self, overrides=self.overrides + overrides)

    def lut_input_spec(self, layer: str, op: str) -> QuantSpec:
        """The spec of a tensor that only lookup-table activations read."""
        spec = self.activation_spec(layer, op)
        overridden = any(o.activation is not None and o.matches(layer, op)
                         for o in self.overrides)
        if self.lut_input_bits == 16 and not overridden and spec.bits == 8:
            return spec.with_(bits=16, signed=True, observer="minmax")  # no clipping needed
        return spec


_INT8_WEIGHT_PER_CHANNEL = QuantSpec(
    bits=8, signed=True, symmetric=True, narrow_range=True, granularity="per_channel"
)
_UINT8_ACT = QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile")

PRESETS: dict[str, QuantConfig] = {
    # Per-channel symmetric int8 weights (restricted range), calibrated asymmetric uint8
    # activations: the default, and the one that lowers to integer-only graphs.
    "int8": QuantConfig(weight=_INT8_WEIGHT_PER_CHANNEL, activation=_UINT8_ACT),
    # One scale per weight tensor.
    "int8-per-tensor": QuantConfig(
        weight=_INT8_WEIGHT_PER_CHANNEL.with_(granularity="per_tensor"), activation=_UINT8_ACT
    ),
    # Activation ranges measured per input at run time; no calibration needed.
    "int8-dynamic": QuantConfig(
        weight=_INT8_WEIGHT_PER_CHANNEL, activation=_UINT8_ACT, dynamic=True
    ),
    # 4-bit weights with one scale per 32 input channels, 8-bit activations.
    "w4a8": QuantConfig(
        weight=QuantSpec(bits=4, signed=True, symmetric=True, granularity="per_group",
                         group_size=32),
        activation=_UINT8_ACT,
    ),
}


def get_preset(name: str) -> QuantConfig:
    """Look up a named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def resolve_config(config: QuantConfig | str) -> QuantConfig:
    """Accept a preset name or a :class:`QuantConfig`."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    raise TypeError(f"config must be a QuantConfig or a preset name, got {type(config).__name__}")
