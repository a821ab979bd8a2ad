"""The layers a mixed-precision search chooses for, and what each precision costs them.

A *layer* here is an anchor (conv2d, conv2d_transpose, matmul) with a constant weight, named
structurally as in :class:`~tvmquant.config.QuantConfig` (``conv2d_3``). Its candidate
precisions are those of its weights (activations stay 8-bit, the spine's default):

``float``  the layer stays float between a dequantize and a quantize;
``int8``   per-channel symmetric 8-bit weights (the ``int8`` preset);
``int4``   per-channel symmetric 4-bit weights (restricted range, [-7, 7]).

Size and BOPs (bit operations, ``MACs x weight bits x activation bits``) are exact functions
of the shapes; latency is measured (:mod:`.latency`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .._compat import Constant, const_value, static_shape
from ..config import LayerOverride, QuantConfig, get_preset
from ..passes.analysis import plan_quantization
from ..spec import QuantSpec

PRECISIONS: tuple[str, ...] = ("float", "int8", "int4")
"""Candidate precisions, from the most to the least precise."""

WEIGHT_BITS = {"float": 32, "int8": 8, "int4": 4}
ACTIVATION_BITS = {"float": 32, "int8": 8, "int4": 8}


def weight_spec(precision: str, base: QuantConfig | None = None) -> QuantSpec | None:
    """The weight spec of a precision (None for float)."""
    if precision not in WEIGHT_BITS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "float":
        return None
    spec = (base or get_preset("int8")).weight
    if spec.granularity.value == "per_group":
        spec = get_preset("int8").weight
    return spec.with_(bits=WEIGHT_BITS[precision])


@dataclass(frozen=True)
class LayerInfo:
    """One anchor layer: its op, shapes and exact cost model."""

    name: str
    op: str  # conv2d | conv2d_transpose | matmul
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    attrs: tuple[tuple[str, str], ...]  # the op's attributes, for the latency key
    macs: int
    has_bias: bool
    clamp: str | None  # relu / clip fused into the layer
    # the grids around it in the int8 model: input zero point 0 or not (a nonzero one adds
    # a pad or a subtraction, and decides which kernel runs), output codes' dtype
    input_zp_zero: bool = False
    output_dtype: str = "uint8"
    # the elementwise activation the layer's output feeds alone (hard-swish's ops), timed
    # with the layer: a lookup table when the layer is integer, float ops when it is not
    activation: str | None = None

    @property
    def weights(self) -> int:
        return int(np.prod(self.weight_shape))

    def size_bytes(self, precision: str) -> float:
        return self.weights * WEIGHT_BITS[precision] / 8

    def bops(self, precision: str) -> float:
        return float(self.macs) * WEIGHT_BITS[precision] * ACTIVATION_BITS[precision]

    def key(self) -> str:
        """What the layer's latency depends on (name excluded: shared across models)."""
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs)
        return (f"{self.op}|in={list(self.input_shape)}|w={list(self.weight_shape)}|"
                f"bias={int(self.has_bias)}|clamp={self.clamp}|zp0={int(self.input_zp_zero)}|"
                f"out={self.output_dtype}|{attrs}" +
                (f"|act={self.activation}" if self.activation else ""))


@dataclass
class LayerSource:
    """A layer's float ingredients: what :mod:`.latency` rebuilds it from."""

    info: LayerInfo
    var: relax.Var  # the anchor's binding in the float module
    call: relax.Call
    weight: np.ndarray
    bias: relax.Expr | None
    clamp: relax.Call | None
    output: relax.Var | None = None  # the layer's output (after bias and clamp)
    # (scale, zero point, dtype) of the input and output codes in the int8 model
    input_qparams: tuple[float, int, str] = (0.02, 128, "uint8")
    output_qparams: tuple[float, int, str] = (0.05, 0, "uint8")
    # the activation region (bindings in order, the last one its output) and the grid of
    # its output codes
    activation: tuple[relax.Var, ...] = ()
    activation_values: tuple[relax.Call, ...] = ()
    activation_qparams: tuple[float, int, str] = (0.05, 0, "uint8")


_ATTR_FIELDS = ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout",
                "output_padding", "out_dtype")


def _attrs(call: relax.Call) -> tuple[tuple[str, str], ...]:
    out = []
    if call.attrs is None:
        return ()
    for f in _ATTR_FIELDS:
        if hasattr(call.attrs, f):
            v = getattr(call.attrs, f)
            if not isinstance(v, (str, int)) and hasattr(v, "__len__"):
                v = [int(x) for x in v]
            out.append((f, str(v)))
    return tuple(out)


def _macs(op: str, in_shape, w_shape, out_shape) -> int:
    if op == "conv2d":
        _, c_per_group, kh, kw = w_shape
        return int(np.prod(out_shape)) * c_per_group * kh * kw
    if op == "conv2d_transpose":  # every input value feeds O/groups x kh x kw outputs
        _, o_per_group, kh, kw = w_shape
        return int(np.prod(in_shape)) * o_per_group * kh * kw
    return int(np.prod(out_shape)) * int(w_shape[-2])


def anchor_layers(float_mod: tvm.IRModule, func_name: str = "main") -> list[LayerSource]:
    """The anchors with constant weights of a canonical float module, in dataflow order."""
    func = float_mod[func_name]
    plan = plan_quantization(func, get_preset("int8"))
    out = []
    for layer in plan.layers:
        if layer.kind != "anchor" or layer.weight is None:
            continue
        call = plan.bindings[layer.members[0]]
        data = call.args[0]
        in_shape, out_shape = static_shape(data), static_shape(layer.members[0])
        weight = const_value(layer.weight)
        if in_shape is None or out_shape is None:
            continue
        bias = None
        clamp = None
        for m in layer.members[1:]:
            value = plan.bindings[m]
            if value.op.name == "relax.add":
                bias = next(a for a in value.args if isinstance(a, Constant))
            else:
                clamp = value
        region = _activation_region(plan, layer.output)
        info = LayerInfo(
            name=layer.name, op=layer.op, input_shape=tuple(in_shape),
            weight_shape=tuple(weight.shape), output_shape=tuple(out_shape),
            attrs=_attrs(call), macs=_macs(layer.op, in_shape, weight.shape, out_shape),
            has_bias=bias is not None,
            clamp=None if clamp is None else clamp.op.name.split(".")[-1],
            activation=",".join(_activation_text(plan.bindings[m]) for m in region) or None)
        out.append(LayerSource(info, layer.members[0], call, weight, bias, clamp, layer.output,
                               activation=region,
                               activation_values=tuple(plan.bindings[m] for m in region)))
    return out


def _activation_region(plan, output: relax.Var) -> tuple[relax.Var, ...]:
    """The elementwise region that alone reads ``output`` and has one exit (hard-swish
    after a convolution), in binding order; empty if there is none."""
    exits = [lay for lay in plan.layers if lay.kind == "unary" and lay.inputs == [output]]
    if len(exits) != 1:
        return ()
    members = list(exits[0].members)
    if not members or members[-1] is not exits[0].output:
        members = [m for m in members if m is not exits[0].output] + [exits[0].output]
    inside = set(members)
    if not all(u in inside for u in plan.users.get(output, [])):
        return ()  # the layer's output is read elsewhere too
    if any(u not in inside for m in members[:-1] for u in plan.users.get(m, [])):
        return ()  # another exit
    return tuple(members)


def _activation_text(value: relax.Call) -> str:
    name = value.op.name.split(".")[-1]
    consts = [f"{float(np.ravel(const_value(a))[0]):g}" for a in value.args
              if isinstance(a, Constant)]
    if name == "clip":
        consts = [f"{float(a.value):g}" for a in value.args[1:]]
    return name + (f"({'/'.join(consts)})" if consts else "")


def attach_qparams(sources: list[LayerSource], quantized) -> list[LayerSource]:
    """Give each layer the grids of its input and output in ``quantized`` (a
    ``QuantizedModel`` whose ``float_mod`` the sources come from), so that a layer rebuilt
    alone runs the kernels it runs inside the model."""
    plan = quantized.plan
    entries = {t["name"]: t for t in quantized.report.get("tensors", [])}

    def qparams(var):
        name = plan.quantized.get(var)
        entry = entries.get(name)
        while entry is not None and "inherits" in entry and "scale" not in entry:
            entry = entries.get(entry["inherits"])
        if entry is None or "scale" not in entry:
            return None
        scale, zp = np.ravel(entry["scale"])[0], np.ravel(entry["zero_point"])[0]
        return float(scale), int(zp), str(entry["dtype"])

    out = []
    for src in sources:
        qin = qparams(src.call.args[0]) or src.input_qparams
        qout = (qparams(src.output) if src.output is not None else None) or src.output_qparams
        qact = qparams(src.activation[-1]) if src.activation else None
        region = {} if qact is not None else {"activation": (), "activation_values": ()}
        info = dataclasses.replace(src.info, input_zp_zero=qin[1] == 0, output_dtype=qout[2],
                                   **({} if qact is not None else {"activation": None}))
        out.append(dataclasses.replace(src, info=info, input_qparams=qin, output_qparams=qout,
                                       activation_qparams=qact or src.activation_qparams,
                                       **region))
    return out


def assignment_config(assignment: dict[str, str], base: QuantConfig | None = None
                      ) -> QuantConfig:
    """The :class:`QuantConfig` of a per-layer precision assignment.

    int8 layers keep ``base``; int4 layers get a per-layer weight override; float layers
    are skipped (left in float).
    """
    base = base or get_preset("int8")
    overrides = []
    skip = list(base.skip)
    for name, precision in assignment.items():
        if precision == "float":
            skip.append(name)
        elif precision != "int8":
            overrides.append(LayerOverride(name, weight=weight_spec(precision, base)))
        else:
            weight_spec(precision)  # validates the name
    return dataclasses.replace(base.with_overrides(*overrides), skip=tuple(skip))


__all__ = ["PRECISIONS", "LayerInfo", "LayerSource", "anchor_layers", "assignment_config",
           "attach_qparams", "weight_spec"]
