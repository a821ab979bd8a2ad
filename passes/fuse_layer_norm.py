"""FuseLayerNorm: put a decomposed layer normalization back together as ``R.nn.layer_norm``.

Exporters often spell LayerNorm out in elementwise ops (PP-OCRv4 rec's SVTR blocks do)::

    m = mean(x, axis=[-1], keepdims=True); d = x - m; v = mean(d ** 2, axis=[-1], keepdims=True)
    y = d / sqrt(v + eps) * gamma + beta

Left decomposed, quantization would put 8-bit grids on the normalization statistics (the
variance spans orders of magnitude across tokens) and ruin accuracy. Fused, LayerNorm is one
op: its input and output are quantized like any other tensor, and the statistics stay exact.

Preconditions: ``gamma`` and ``beta`` are constants broadcasting along the normalized (last)
axis; ``eps`` is a scalar constant; the intermediate values have no other users.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .._compat import Constant, const_value, static_shape
from .analysis import emit_like, function_bindings


def _call(value, name: str) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
        value.op.name == name


def _last_axis_mean(value, ndim: int) -> bool:
    if not _call(value, "relax.mean") or not bool(value.attrs.keepdims):
        return False
    axes = [int(a) % ndim for a in value.attrs.axis] if value.attrs.axis is not None else []
    return axes == [ndim - 1]


def _scalar_const(expr) -> float | None:
    if isinstance(expr, Constant) and const_value(expr).size == 1:
        return float(const_value(expr).reshape(()))
    return None


def find_layer_norms(func: relax.Function) -> dict[relax.Var, tuple]:
    """Map each decomposed LayerNorm's output var to ``(x, gamma, beta, eps)``."""
    bindings = function_bindings(func)
    value = {b.var: b.value for b in bindings}
    uses: dict[relax.Var, int] = {}
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for a in b.value.args:
                if isinstance(a, relax.Var):
                    uses[a] = uses.get(a, 0) + 1
    ret = func.body.body
    for v in (ret.fields if isinstance(ret, relax.Tuple) else [ret]):
        if isinstance(v, relax.Var):
            uses[v] = uses.get(v, 0) + 1

    def producer(v):
        return value.get(v) if isinstance(v, relax.Var) else None

    found = {}
    for b in bindings:
        div = b.value
        if not _call(div, "relax.divide"):
            continue
        d, s = div.args
        sq = producer(s)
        if not _call(sq, "relax.sqrt") or uses.get(s) != 1:
            continue
        e = producer(sq.args[0])
        if not _call(e, "relax.add") or uses.get(sq.args[0]) != 1:
            continue
        var_expr, eps_c = e.args
        eps = _scalar_const(eps_c)
        pw = producer(var_expr)
        shape = static_shape(d)
        if eps is None or shape is None or not _last_axis_mean(pw, len(shape)):
            continue
        p = producer(pw.args[0])
        if _call(p, "relax.power"):
            if _scalar_const(p.args[1]) != 2.0 or not p.args[0].same_as(d):
                continue
            d_uses = 2  # the square and the division
        elif _call(p, "relax.multiply"):
            if not (p.args[0].same_as(d) and p.args[1].same_as(d)):
                continue
            d_uses = 3  # twice in d * d, once in the division
        else:
            continue
        sub = producer(d)
        if not _call(sub, "relax.subtract") or uses.get(d) != d_uses:
            continue
        x, m = sub.args
        mean = producer(m)
        if not _last_axis_mean(mean, len(shape)) or not mean.args[0].same_as(x) or \
                uses.get(m) != 1:
            continue
        channels = shape[-1]
        out, gamma, beta = b.var, np.ones(channels, np.float32), np.zeros(channels, np.float32)
        nxt = _single_consumer(bindings, out, uses)
        if nxt is not None and _call(nxt.value, "relax.multiply"):
            c = _channel_vector(nxt.value, out, channels)
            if c is not None:
                gamma, out = c, nxt.var
                nxt = _single_consumer(bindings, out, uses)
        if nxt is not None and _call(nxt.value, "relax.add"):
            c = _channel_vector(nxt.value, out, channels)
            if c is not None:
                beta, out = c, nxt.var
        found[out] = (x, gamma, beta, eps)
    return found


def _single_consumer(bindings, var, uses):
    if uses.get(var) != 1:
        return None
    for b in bindings:
        if isinstance(b.value, relax.Call) and any(a.same_as(var) for a in b.value.args
                                                   if isinstance(a, relax.Var)):
            return b
    return None


def _channel_vector(call, var, channels: int) -> np.ndarray | None:
    a, c = call.args
    if not a.same_as(var):
        a, c = c, a
    if not a.same_as(var) or not isinstance(c, Constant):
        return None
    v = const_value(c)
    if v.size == 1:
        return np.full(channels, float(v.reshape(())), np.float32)
    if v.shape[-1] != channels or v.size != channels:
        return None
    return v.reshape(channels).astype(np.float32)


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod, matches):
        super().__init__(mod)
        self.matches = matches

    def visit_var_binding_(self, binding):
        if binding.var in self.matches:
            x, gamma, beta, eps = self.matches[binding.var]
            ln = relax.op.nn.layer_norm(self.visit_expr(x), relax.const(gamma, "float32"),
                                        relax.const(beta, "float32"), axes=[-1], epsilon=eps)
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, ln))
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="tvmquant.FuseLayerNorm")
class FuseLayerNorm:
    """Rewrite decomposed last-axis layer normalizations into ``R.nn.layer_norm``."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        changed = False
        new_mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                continue
            matches = find_layer_norms(func)
            if not matches:
                continue
            new_mod[gv] = _Fuser(mod, matches).visit_expr(func)
            changed = True
        if not changed:
            return mod
        return relax.transform.DeadCodeElimination()(new_mod)
