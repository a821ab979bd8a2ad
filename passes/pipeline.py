"""The quantization pipeline: the passes in order, as one pass and as a build pipeline.

Phases
------
1. Canonicalize: fold BatchNorm into the weights it scales, put decomposed LayerNorms back
   together, fold constant arithmetic.
2. Simulate: insert quantize/dequantize pairs (needs calibrated ranges for static configs).
3. Lower: rewrite the QDQ graph into integer arithmetic, drop the dead float ops.

:func:`quantize_pipeline` composes them for use in a user's ``tvm.transform.Sequential``;
the registered Relax pipeline ``"tvmquant"`` lowers an already fake-quantized (QDQ) module and
continues with TVM's default build pipeline, so ``tvm.compile(qdq_mod, target,
relax_pipeline="tvmquant")`` produces an integer-only executable.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..config import QuantConfig
from .fold_batch_norm import FoldBatchNorm
from .fuse_layer_norm import FuseLayerNorm
from .insert_fake_quant import InsertFakeQuant
from .lower_to_integer_only import LowerToIntegerOnly


def canonicalize_pipeline() -> tvm.transform.Pass:
    """Phase 1: passes that prepare a float module for quantization."""
    return tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            FoldBatchNorm(),
            FuseLayerNorm(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ],
        name="tvmquant.Canonicalize",
    )


def quantize_pipeline(config: QuantConfig, ranges: dict | None = None,
                      integer_only: bool = True) -> tvm.transform.Pass:
    """Phases 2-3 as one pass: simulate quantization, then (optionally) lower to integers.

    Run :func:`canonicalize_pipeline` first and calibrate the canonical module; ``ranges``
    come from that calibration.
    """
    passes = [InsertFakeQuant(config, ranges)]  # phase 2: simulate
    if integer_only:
        passes += [LowerToIntegerOnly(integer_gates=config.integer_gates),
                   relax.transform.FoldConstant()]  # phase 3: lower
    return tvm.transform.Sequential(passes, name="tvmquant.Quantize")


@relax.register_pipeline("tvmquant")
def _tvmquant_build_pipeline(target: tvm.target.Target | None = None):
    """Lower a fake-quantized module to integers, then TVM's default build."""

    @tvm.transform.module_pass(opt_level=0, name="tvmquant.BuildPipeline")
    def _pipeline(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = LowerToIntegerOnly()(mod)
        tgt = target or tvm.target.Target.current()
        return relax.get_default_pipeline(tgt)(mod)

    return _pipeline
