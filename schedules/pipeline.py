"""The build pipeline: tvmquant's kernels, fusion and default CPU schedules, then TVM's lowering.

TVM 0.27's ``tvm.compile`` lowers a Relax module for a CPU without fusing operators and
without scheduling the kernels (every op is its own single-threaded loop nest). This pipeline
is the same lowering with the missing middle filled in, in phases:

1. *dispatch*: few-bit matmuls to the bit-serial and sub-byte kernels
   (:class:`~tvmquant.schedules.x86.dispatch_subbyte.DispatchSubByte`), then integer
   conv2d/matmul/transposed-conv chains to tvmquant's tensorized int8 kernels
   (:class:`~tvmquant.schedules.x86.dispatch.DispatchX86Int8`, on AVX-512 VNNI targets, or
   AVX2 ones with exact ``vpmaddwd`` blocks);
2. *legalize and fuse*: TVM's ``FastMathTransform`` (float ``exp``, ``softmax``, ``erf`` and
   ``tanh`` as polynomials that vectorize; LLVM calls ``expf`` once per vector lane
   otherwise; :func:`.SigmoidThroughExp` first, so that a float sigmoid uses it too),
   ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``
   (tensorized kernels are opaque: nothing fuses into them);
3. *tuned records*: a MetaSchedule database, when given, for the kernels it knows;
4. *default schedules*: :func:`tvmquant.schedules.cpu.default_rules` for every kernel still
   unscheduled;
5. *lower*: TVM's own memory planning and VM lowering, as in ``tvm.compile``.

Use it as ``tvm.compile(build_pipeline(target)(mod), target, relax_pipeline=None)`` or
through :func:`tvmquant.build`.
"""

from __future__ import annotations

import contextlib

import tvm
from tvm import relax
from tvm.relax import backend
from tvm.relax import transform as rx
from tvm.s_tir import dlight

from .cpu import default_rules
from .fast_sigmoid import SigmoidThroughExp


def build_pipeline(
    target: tvm.target.Target,
    *,
    kernels: bool = True,
    schedules: bool = True,
    database=None,
    fast_math: bool = True,
) -> tvm.transform.Pass:
    """The Relax-to-VM pass sequence for ``target`` (see the module docstring).

    Parameters
    ----------
    target
        The build target; it is entered (``with target``) while the passes run.
    kernels
        Swap integer convolutions and matmuls for tvmquant's tensorized kernels where the
        target has them (AVX-512 VNNI, or AVX2).
    schedules
        Apply the default CPU schedules (and fusion). ``False`` gives TVM's plain lowering.
    database
        A ``tvm.s_tir.meta_schedule.Database`` (or its work directory) with tuned records,
        applied before the default schedules.
    fast_math
        With ``schedules``: TVM's fast approximations of the float ``exp`` (softmax,
        ``exp``), ``erf`` and ``tanh``, about 1e-7 relative error (what the float parts of a
        quantized model keep: the final softmax of a recognizer, float fallback layers).
    """
    def phases() -> list[tvm.transform.Pass]:
        tuned = []
        if database is not None:  # (needs the target in scope when it is made)
            tuned = [rx.MetaScheduleApplyDatabase(
                database if isinstance(database, str) else None, enable_warning=False)]
        default = [dlight.ApplyDefaultSchedule(*default_rules())] \
            if target.kind.name == "llvm" else []
        return [
            *fusion_phases(target, kernels=kernels, fuse=schedules,    # 1., 2.
                           fast_math=fast_math),
            *(tuned if schedules else []),                             # 3. tuned records
            *(default if schedules else []),                           # 4. default schedules
            rx.RewriteDataflowReshape(), rx.ToNonDataflow(),           # 5. lower
            rx.RemovePurityChecking(), rx.CallTIRRewrite(), rx.StaticPlanBlockMemory(),
            rx.LowerAllocTensor(), rx.KillAfterLastUse(), rx.LowerRuntimeBuiltin(),
            rx.ComputePrimValue(), rx.VMShapeLower(), rx.AttachGlobalSymbol(),
        ]

    @tvm.transform.module_pass(opt_level=0, name="tvmquant.BuildPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        db = database if database is not None and not isinstance(database, str) else None
        with target, (db if db is not None else contextlib.nullcontext()):
            return tvm.transform.Sequential(phases(), name="tvmquant.build")(mod)

    return _pipeline


def fusion_phases(target: tvm.target.Target, *, kernels: bool = True,
                  fuse: bool = True, fast_math: bool = True) -> list[tvm.transform.Pass]:
    """Phases 1 and 2: dispatch to tensorized kernels, legalize, fuse.

    The module after these passes holds the kernels that the later phases schedule, and that
    ``tvmquant tune`` extracts as tuning tasks (run them inside ``with target``).
    """
    dispatch = []
    if kernels and target.kind.name == "llvm":
        from .x86.dispatch import DispatchX86Int8, target_isa
        from .x86.dispatch_subbyte import DispatchSubByte

        isa = target_isa(target)
        # few-bit matmuls first: the int8 dispatch would take them as int8 otherwise
        dispatch = [DispatchSubByte(gemv=isa in ("avx512_vnni", "amx"), avx2=isa is not None),
                    *([DispatchX86Int8(isa=isa)] if isa is not None else [])]
    fusion = [rx.AnnotateTIROpPattern(), rx.FoldConstant(), rx.FuseOps(), rx.FuseTIR()]
    fast = [SigmoidThroughExp, rx.FastMathTransform()] if fuse and fast_math else []
    return [*dispatch, backend.DispatchSampling(), backend.DispatchSortScan(), *fast,
            rx.LegalizeOps(), *(fusion if fuse else [])]


def build(mod: tvm.IRModule, target: tvm.target.Target, **options) -> tvm.runtime.Executable:
    """``tvm.compile`` of ``mod`` through :func:`build_pipeline` (``options`` go there)."""
    lowered = build_pipeline(target, **options)(mod)
    return relax.build(lowered, target=target, relax_pipeline=None)
