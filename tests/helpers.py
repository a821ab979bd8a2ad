"""Test helpers: well-formedness checks, compile-and-run."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def assert_well_formed(mod: tvm.IRModule) -> None:
    relax.analysis.well_formed(mod)  # raises on the first violation (TVM 0.27)


def run_pass(pass_, mod: tvm.IRModule) -> tvm.IRModule:
    """Apply a pass, checking well-formedness before and after."""
    assert_well_formed(mod)
    out = pass_(mod)
    assert_well_formed(out)
    return out


def one_input_module(body, shape, dtype: str = "float32") -> tvm.IRModule:
    """``main(x)`` whose dataflow block is ``body(bb, x)`` (its return value is the output)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def run_module(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()
