"""SigmoidThroughExp: a float sigmoid spelled ``1 / (1 + exp(-x))``.

TVM legalizes ``relax.sigmoid`` into ``tir.sigmoid``, which LLVM lowers to a call of ``expf``
per vector lane; TVM's ``FastMathTransform`` replaces ``exp`` but not ``sigmoid``. Run before
it, this pass lets the sigmoid that a detector's float head keeps (a probability map, the
model's output) use the same vectorizable polynomial ``fast_exp``. Other dtypes are left
alone (the integer graph's sigmoids are lookup tables).
"""

from __future__ import annotations

import tvm
from tvm import relax


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") ==
                "relax.sigmoid"):
            return call
        x = call.args[0]
        ty = x.ty if hasattr(x, "ty") else None
        dtype = str(getattr(ty, "dtype", ""))
        if dtype not in ("float32", "float16"):
            return call
        one = relax.const(1.0, dtype)
        exp = relax.op.exp(relax.op.negative(x))
        return relax.op.divide(one, relax.op.add(one, exp))


@tvm.transform.module_pass(opt_level=0, name="tvmquant.SigmoidThroughExp")
def SigmoidThroughExp(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite float ``sigmoid(x)`` as ``1 / (1 + exp(-x))`` in every Relax function."""
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
