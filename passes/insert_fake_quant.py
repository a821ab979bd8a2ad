"""InsertFakeQuant: simulated quantization as quantize -> dequantize pairs.

Preconditions
-------------
- Weights are constants (see :mod:`tvmquant.passes.analysis`); run ``FoldBatchNorm`` first so
  that BatchNorm is already folded into the weights it scales.
- For static activations, ``ranges`` holds a calibrated ``(min, max)`` for every tensor of
  the :class:`~tvmquant.passes.analysis.QuantPlan` (from :func:`tvmquant.calibrate`).

What it does
------------
- Each anchor's constant weight (conv2d, matmul) becomes ``dequantize(const_int, scale, zp,
  axis)`` at the configured granularity (per tensor, per channel, per group); per-group scales
  are expressed as ``multiply(astype(const_int), scale)`` since ``relax.op.dequantize`` takes
  one scale per channel.
- Every boundary tensor of the plan (function inputs, anchor chain outputs, unary-region exits,
  residual adds, pools, ...) is replaced, for its non-skipped consumers, by
  ``dequantize(quantize(x))`` (with an integer clamp for grids narrower than 8 bits). Dynamic
  configs compute scale and zero point from each tensor at run time.

The output is a valid float module (fake quantization): run it to measure accuracy before
lowering it with :class:`~tvmquant.passes.LowerToIntegerOnly`.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from ..calibration.observers import observe_range
from ..config import QuantConfig
from ..numerics import binarize, compute_qparams, quantize, ternarize
from ..spec import Granularity, QuantSpec
from .analysis import (
    QuantPlan,
    emit_like,
    plan_quantization,
    weight_channel_axis,
    weight_reduction_axis,
)

FAKE_QUANT_ATTR = "tvmquant.fake_quant"

logger = logging.getLogger(__name__)


def quantize_weight(
    w: np.ndarray, spec: QuantSpec, op: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Quantize a weight tensor; returns (codes int8, scale, zero point, channel axis).

    Per-group scales have shape ``(channels, groups)`` over the reduction axis.
    """
    ch_axis = spec.axis if spec.axis is not None else weight_channel_axis(op, w.ndim)
    ch_axis %= w.ndim
    if spec.is_binary or spec.observer == "twn":
        # XNOR-Net / TWN: codes and scale come from the weights' magnitudes, not a range.
        if spec.granularity is Granularity.PER_GROUP:
            raise ValueError(f"{spec.describe()} weights are per tensor or per channel, "
                             "not per group")
        axis = ch_axis if spec.granularity is Granularity.PER_CHANNEL else None
        q, scale = (binarize if spec.is_binary else ternarize)(w, axis)
        return q, scale if axis is not None else scale.reshape(()), \
            np.zeros(np.shape(scale), np.int32), ch_axis
    if spec.granularity is Granularity.PER_TENSOR:
        lo, hi = observe_range(spec.observer, spec, w, axis=None)
        scale, zp = compute_qparams(spec, lo, hi)
        q = quantize(w, scale, zp, spec.qmin, spec.qmax)
        return q.astype(spec.storage_dtype), scale, zp, ch_axis
    if spec.granularity is Granularity.PER_CHANNEL:
        lo, hi = observe_range(spec.observer, spec, w, axis=ch_axis)
        scale, zp = compute_qparams(spec, lo, hi)
        q = quantize(w, scale, zp, spec.qmin, spec.qmax, axis=ch_axis)
        return q.astype(spec.storage_dtype), scale, zp, ch_axis
    # Per group: groups of group_size along the reduction axis, per output channel.
    red_axis = weight_reduction_axis(op, w.ndim) % w.ndim
    g = spec.group_size
    moved = np.moveaxis(w, (ch_axis, red_axis), (0, 1))  # (C, K, ...)
    c, k = moved.shape[:2]
    if k % g:
        # A reduction too small or odd for the group (a first conv with 3 input channels):
        # quantize per channel instead, as group-wise schemes do for such layers.
        logger.info("reduction size %d is not a multiple of group_size=%d: per-channel "
                    "weights for this layer", k, g)
        return quantize_weight(w, spec.with_(granularity="per_channel", group_size=None), op)
    grouped = moved.reshape(c, k // g, g, *moved.shape[2:])
    flat = grouped.reshape(c * (k // g), -1)
    lo, hi = observe_range(spec.observer, spec, flat, axis=0)
    scale, zp = compute_qparams(spec, lo, hi)
    q = quantize(flat, scale, zp, spec.qmin, spec.qmax, axis=0)
    q = np.moveaxis(q.reshape(moved.shape), (0, 1), (ch_axis, red_axis))
    return (
        q.astype(spec.storage_dtype), scale.reshape(c, k // g), zp.reshape(c, k // g), ch_axis
    )


def _group_scale_tensor(scale: np.ndarray, shape, op: str, spec: QuantSpec) -> np.ndarray:
    """Expand (C, G) per-group scales to a tensor broadcastable against the weight."""
    ndim = len(shape)
    ch_axis = (spec.axis if spec.axis is not None else weight_channel_axis(op, ndim)) % ndim
    red_axis = weight_reduction_axis(op, ndim) % ndim
    full = np.repeat(scale, spec.group_size, axis=1)  # (C, K)
    expand = full.reshape(full.shape + (1,) * (ndim - 2))
    out = np.moveaxis(expand, (0, 1), (ch_axis, red_axis))
    return np.broadcast_to(out, shape).astype(np.float32)


def activation_qparams(
    plan: QuantPlan, config: QuantConfig, ranges: dict[str, tuple]
) -> dict[str, tuple[np.ndarray, np.ndarray, QuantSpec]]:
    """Scale, zero point and spec of every quantized tensor of a plan."""
    out: dict[str, tuple[np.ndarray, np.ndarray, QuantSpec]] = {}
    layers = {layer.output: layer for layer in plan.layers}
    for var, name in plan.quantized.items():
        if var in plan.inherits:
            out[name] = out[plan.quantized[plan.inherits[var]]]
            continue
        layer = layers.get(var)
        if layer is None:
            spec = config.activation
        elif var in plan.lut_only:
            spec = config.lut_input_spec(layer.name, layer.op)
        else:
            spec = config.activation_spec(layer.name, layer.op)
        if name not in ranges:
            raise ValueError(
                f"no calibrated range for tensor {name!r}; run calibration on this module "
                f"first (tvmquant.calibrate) or use a dynamic config"
            )
        lo, hi = ranges[name]
        scale, zp = compute_qparams(spec, lo, hi)
        out[name] = (scale, zp, spec)
    return out


@relax.expr_functor.mutator
class _FakeQuantMutator(relax.PyExprMutator):
    def __init__(self, mod, plan: QuantPlan, config: QuantConfig, qparams):
        super().__init__(mod)
        self.plan = plan
        self.config = config
        self.qparams = qparams
        self.fq: dict = {}  # boundary var (original) -> fake-quant var, per block
        self.anchor_weights = {
            layer.members[0]: layer for layer in plan.layers
            if layer.kind == "anchor" and layer.weight is not None and not layer.skipped
        }

    # -- helpers -------------------------------------------------------------------------
    def _emit_act_qdq(self, orig: relax.Var) -> relax.Var:
        name = self.plan.quantized[orig]
        x = self.visit_expr(orig)
        if self.config.dynamic:
            return self._emit_dynamic_qdq(x, name)
        scale, zp, spec = self.qparams[name]
        s = relax.const(np.float32(scale), "float32")
        z = relax.const(np.int32(zp), "int32")
        if spec.is_binary:  # codes are signs: +1 for x >= 0, -1 below
            sign = self.builder_.emit(relax.op.greater_equal(x, relax.const(0.0, "float32")))
            q = self.builder_.emit(relax.op.where(sign, relax.const(1, "int8"),
                                                  relax.const(-1, "int8")),
                                   name_hint=f"{name}_q")
            return self.builder_.emit(relax.op.dequantize(q, s, z, axis=-1,
                                                          out_dtype="float32"),
                                      name_hint=f"{name}_dq")
        q = self.builder_.emit(relax.op.quantize(x, s, z, axis=-1, out_dtype=spec.storage_dtype),
                               name_hint=f"{name}_q")
        if spec.bits < 8:
            q = self.builder_.emit(relax.op.clip(q, spec.qmin, spec.qmax))
        return self.builder_.emit(relax.op.dequantize(q, s, z, axis=-1, out_dtype="float32"),
                                  name_hint=f"{name}_dq")

    def _emit_dynamic_qdq(self, x: relax.Expr, name: str) -> relax.Var:
        spec = self.config.activation
        bb = self.builder_
        f32 = "float32"
        lo = bb.emit(relax.op.minimum(relax.op.min(x), relax.const(0.0, f32)))
        hi = bb.emit(relax.op.maximum(relax.op.max(x), relax.const(0.0, f32)))
        if spec.symmetric:
            amax = bb.emit(relax.op.maximum(relax.op.negative(lo), hi))
            scale = bb.emit(relax.op.divide(amax, relax.const(float(spec.qmax), f32)))
            zp = relax.const(np.int32(0), "int32")
        else:
            scale = bb.emit(relax.op.divide(relax.op.subtract(hi, lo),
                                            relax.const(float(spec.qmax - spec.qmin), f32)))
        scale = bb.emit(relax.op.maximum(scale, relax.const(2.0**-30, f32)))
        if not spec.symmetric:
            zpf = relax.op.round(relax.op.subtract(relax.const(float(spec.qmin), f32),
                                                   relax.op.divide(lo, scale)))
            zp = bb.emit(relax.op.astype(relax.op.clip(zpf, spec.qmin, spec.qmax), "int32"))
        q = bb.emit(relax.op.quantize(x, scale, zp, axis=-1, out_dtype=spec.storage_dtype),
                    name_hint=f"{name}_q")
        if spec.bits < 8:
            q = bb.emit(relax.op.clip(q, spec.qmin, spec.qmax))
        return bb.emit(relax.op.dequantize(q, scale, zp, axis=-1, out_dtype=f32),
                       name_hint=f"{name}_dq")

    def _fake_quant_of(self, orig: relax.Var) -> relax.Var:
        if orig not in self.fq:
            self.fq[orig] = self._emit_act_qdq(orig)
        return self.fq[orig]

    def _emit_weight_qdq(self, layer) -> relax.Var:
        spec = self.config.weight_spec(layer.name, layer.op)
        w = layer.weight.value.numpy()
        q, scale, zp, ch_axis = quantize_weight(w, spec, layer.op)
        wq = relax.const(q, spec.storage_dtype)
        if spec.granularity is Granularity.PER_GROUP and np.ndim(scale) == 2:
            s = relax.const(_group_scale_tensor(scale, w.shape, layer.op, spec), "float32")
            return self.builder_.emit(
                relax.op.multiply(relax.op.astype(wq, "float32"), s), name_hint=f"{layer.name}_w"
            )
        if spec.granularity is Granularity.PER_TENSOR:
            s = relax.const(np.float32(scale), "float32")
            z = relax.const(np.int32(zp), "int32")
        else:
            s = relax.const(scale.astype(np.float32), "float32")
            z = relax.const(zp.astype(np.int32), "int32")
        return self.builder_.emit(
            relax.op.dequantize(wq, s, z, axis=ch_axis, out_dtype="float32"),
            name_hint=f"{layer.name}_w",
        )

    # -- visitors ------------------------------------------------------------------------
    def visit_dataflow_block_(self, block):
        self.fq = {}
        return super().visit_dataflow_block_(block)

    def visit_binding_block_(self, block):
        self.fq = {}
        return super().visit_binding_block_(block)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, value = binding.var, binding.value
        quantized_uses = var not in self.plan.float_users

        def use(a):
            if isinstance(a, relax.Var) and a in self.plan.quantized:
                return self._fake_quant_of(a)
            if isinstance(a, relax.Tuple):
                return relax.Tuple([use(f) for f in a.fields])
            return self.visit_expr(a)

        if isinstance(value, relax.Call) and quantized_uses:
            layer = self.anchor_weights.get(var)
            args = [
                self._emit_weight_qdq(layer) if layer is not None and i == layer.weight_arg
                else use(a) for i, a in enumerate(value.args)
            ]
            new_value = relax.Call(value.op, args, value.attrs, value.ty_args)
        elif isinstance(value, relax.Tuple) and quantized_uses:
            new_value = use(value)
        else:
            new_value = self.visit_expr(value)
        new_var = emit_like(self.builder_, var, new_value)
        self.set_var_remap(var, new_var)


@tvm.transform.module_pass(opt_level=0, name="tvmquant.InsertFakeQuant")
class InsertFakeQuant:
    """Insert quantize -> dequantize pairs on weights and activations.

    Parameters
    ----------
    config : QuantConfig
        Specs for weights and activations, overrides, skips, static or dynamic.
    ranges : dict of str to (min, max), optional
        Calibrated ranges per tensor name of the plan (required when ``config.dynamic`` is
        false).
    func_name : str
        The Relax function to quantize.
    """

    def __init__(self, config: QuantConfig, ranges: dict | None = None,
                 func_name: str = "main"):
        self.config = config
        self.ranges = dict(ranges or {})
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        if func.attrs is not None and FAKE_QUANT_ATTR in func.attrs:
            return mod  # already quantized
        plan = plan_quantization(func, self.config)
        if not plan.quantized and not any(
            layer.weight is not None and not layer.skipped for layer in plan.layers
        ):
            return mod  # nothing to quantize: leave the module alone
        qparams = {} if self.config.dynamic else activation_qparams(
            plan, self.config, self.ranges
        )
        mutator = _FakeQuantMutator(mod, plan, self.config, qparams)
        new_func = mutator.visit_expr(func)
        new_func = new_func.with_attr(FAKE_QUANT_ATTR, True)
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = new_func
        return mod


__all__ = ["InsertFakeQuant", "activation_qparams", "quantize_weight"]
