"""ExposeObservedTensors: make the tensors that calibration observes extra function outputs.

As ONNX Runtime's calibrator does, the graph itself is rewritten so that one run yields the
model output plus every tensor of the :class:`~tvmquant.passes.analysis.QuantPlan` whose range
must be calibrated. The new function returns ``(original_output, t0, t1, ...)`` and carries
the attribute ``tvmquant.observed_tensors`` with the tensor names in that order.

Preconditions: the same as :func:`~tvmquant.passes.analysis.plan_quantization`; run it on the
module you will later give to :class:`~tvmquant.passes.InsertFakeQuant` (same structure, same
names).
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..config import QuantConfig
from .analysis import plan_quantization

OBSERVED_ATTR = "tvmquant.observed_tensors"


@tvm.transform.module_pass(opt_level=0, name="tvmquant.ExposeObservedTensors")
class ExposeObservedTensors:
    """Return every calibrated tensor of the plan as an extra output.

    Parameters
    ----------
    config : QuantConfig
        Decides the plan (skips change which tensors are quantized).
    func_name : str
        The Relax function to instrument.
    """

    def __init__(self, config: QuantConfig, func_name: str = "main"):
        self.config = config
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        # Dataflow variables cannot leave their block: lift the function out of dataflow.
        mod = relax.transform.ToNonDataflow()(mod)
        func = mod[self.func_name]
        plan = plan_quantization(func, self.config)
        observed = [(v, n) for v, n in plan.quantized.items() if v not in plan.inherits]
        body = func.body
        fields = [body.body] + [v for v, _ in observed]
        new_body = relax.SeqExpr(body.blocks, relax.Tuple(fields))
        ret_ty = relax.TupleType([f.ty for f in fields])
        new_func = relax.Function(func.params, new_body, ret_ty, attrs=func.attrs)
        new_func = new_func.with_attr(OBSERVED_ATTR, [n for _, n in observed])
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = new_func
        return relax.transform.Normalize()(mod)
