"""DifferentiableForm: respell ops that TVM 0.27's ``relax.transform.Gradient`` cannot
differentiate with ops it can, computing the same values.

Hessian-based sensitivity (:mod:`tvmquant.mixed_precision.sensitivity`) needs gradients of
a real model, and TVM 0.27 registers no gradient for several ops such models use:

- ``clip(x, a, b)`` -> ``minimum(maximum(x, a), b)``;
- ``squeeze(x)`` -> ``reshape(x, shape)``;
- ``strided_slice(x, ...)`` -> one ``take(x, indices, axis)`` per sliced axis;
- ``nn.layer_norm`` -> ``mean``, ``subtract``, ``multiply``, ``sqrt``, ``divide``, affine;
- ``image.resize2d`` nearest-neighbour (asymmetric, floor) -> ``take`` along H, then W;
- ``nn.conv2d_transpose`` with stride == kernel and no padding -> ``matmul`` and a
  depth-to-space (``reshape``/``permute_dims``).

Anything else is left alone (the Gradient pass then names the op it cannot differentiate).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .._compat import dtype_of, static_shape
from .analysis import emit_like


def _ints(expr) -> list[int]:
    if isinstance(expr, relax.ShapeExpr):
        return [int(v) for v in expr.values]
    if isinstance(expr, relax.Tuple):
        return [int(f.value.value if hasattr(f.value, "value") else f.value)
                for f in expr.fields]
    return [int(v) for v in expr]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def emit(self, expr):
        return self.builder_.emit(expr)

    def _const(self, value, like):
        return relax.const(np.asarray(value, dtype=dtype_of(like)), dtype_of(like))

    def _clip(self, call):
        x = call.args[0]
        lo = self.emit(relax.op.maximum(x, self._const(float(call.args[1].value), x)))
        return relax.op.minimum(lo, self._const(float(call.args[2].value), x))

    def _squeeze(self, call, out_shape):
        return relax.op.reshape(call.args[0], out_shape)

    def _strided_slice(self, call):
        x = call.args[0]
        shape = static_shape(x)
        axes, begin, end = (_ints(a) for a in call.args[1:4])
        strides = _ints(call.args[4]) if len(call.args) > 4 else [1] * len(axes)
        takes = []
        for ax, b, e, s in zip(axes, begin, end, strides):
            idx = np.arange(*slice(b, e, s).indices(shape[ax]), dtype=np.int64)
            takes.append((ax, idx))
        return self._takes(x, takes)

    def _takes(self, x, takes):
        """``take`` along each ``(axis, indices)``; the last one unbound (the binding's)."""
        for i, (ax, idx) in enumerate(takes):
            t = relax.op.take(x, relax.const(idx, "int64"), axis=ax, mode="clip")
            x = t if i == len(takes) - 1 else self.emit(t)
        return x

    def _layer_norm(self, call):
        x, gamma, beta = call.args
        axes = [int(a) for a in call.attrs.axes]
        mean = self.emit(relax.op.mean(x, axis=axes, keepdims=True))
        xm = self.emit(relax.op.subtract(x, mean))
        var = self.emit(relax.op.mean(relax.op.multiply(xm, xm), axis=axes, keepdims=True))
        std = self.emit(relax.op.sqrt(relax.op.add(var, self._const(float(call.attrs.epsilon),
                                                                    x))))
        y = self.emit(relax.op.divide(xm, std))
        if call.attrs.scale:
            y = self.emit(relax.op.multiply(y, gamma))
        return relax.op.add(y, beta) if call.attrs.center else y

    def _resize_nearest(self, call, out_shape):
        attrs = call.attrs
        if str(attrs.method) != "nearest_neighbor" or str(attrs.layout) != "NCHW" or \
                str(attrs.coordinate_transformation_mode) != "asymmetric" or \
                str(attrs.rounding_method) not in ("floor", ""):
            return None
        x = call.args[0]
        in_shape = static_shape(x)
        takes = []
        for ax in (2, 3):
            n_in, n_out = in_shape[ax], out_shape[ax]
            idx = np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)), n_in - 1)
            takes.append((ax, idx.astype(np.int64)))
        return self._takes(x, takes)

    def _conv_transpose(self, call):
        attrs = call.attrs
        x, w = call.args
        wshape = static_shape(w)
        if wshape is None or int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW" or \
                str(attrs.kernel_layout) != "IOHW" or \
                [int(s) for s in attrs.strides] != list(wshape[2:]) or \
                any(int(p) for p in attrs.padding) or any(int(p) for p in attrs.output_padding):
            return None
        n, c, h, wd = static_shape(x)
        _, o, kh, kw = wshape
        rows = self.emit(relax.op.reshape(relax.op.permute_dims(x, [0, 2, 3, 1]),
                                          (n * h * wd, c)))
        cols = self.emit(relax.op.reshape(w, (c, o * kh * kw)))
        y = self.emit(relax.op.matmul(rows, cols))
        y = self.emit(relax.op.reshape(y, (n, h, wd, o, kh, kw)))
        y = self.emit(relax.op.permute_dims(y, [0, 3, 1, 4, 2, 5]))
        return relax.op.reshape(y, (n, o, h * kh, wd * kw))

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        new = None
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            out_shape = static_shape(binding.var)
            if name == "relax.clip":
                new = self._clip(value)
            elif name == "relax.squeeze" and out_shape is not None:
                new = self._squeeze(value, out_shape)
            elif name == "relax.strided_slice" and static_shape(value.args[0]) is not None:
                new = self._strided_slice(value)
            elif name == "relax.nn.layer_norm":
                new = self._layer_norm(value)
            elif name == "relax.image.resize2d" and out_shape is not None:
                new = self._resize_nearest(value, out_shape)
            elif name == "relax.nn.conv2d_transpose":
                new = self._conv_transpose(value)
        if new is None:
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, value))
            return
        self.count += 1
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))


@tvm.transform.module_pass(opt_level=0, name="tvmquant.DifferentiableForm")
class DifferentiableForm:
    """Rewrite ops without a Relax gradient into equivalent ops with one (see module doc)."""

    def __init__(self, func_name: str = "main"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        new_func = rewriter.visit_expr(mod[self.func_name])
        if not rewriter.count:
            return mod
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = new_func
        return mod


__all__ = ["DifferentiableForm"]
