"""Version-sensitive TVM names in one place (apache-tvm 0.27, after the 2026 refactors)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

# relax.Constant became tvm.ir.expr.GenericConst in 0.27 (tvm.ir.expr.Constant is also the
# base of IntImm/FloatImm, so test for GenericConst).
Constant = tvm.ir.expr.GenericConst
Call = relax.Call
Var = relax.Var
DataflowVar = relax.DataflowVar
TensorType = relax.TensorType


def const_value(expr: Constant) -> np.ndarray:
    """The NumPy value of a Relax constant."""
    return expr.value.numpy()


def tensor_type(expr) -> TensorType | None:
    """The tensor type of an expression, or None if it is not a tensor."""
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, TensorType) else None


def static_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a tensor expression, or None if unknown or symbolic."""
    ty = tensor_type(expr)
    if ty is None or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError):
        return None


def dtype_of(expr) -> str | None:
    ty = tensor_type(expr)
    return None if ty is None else str(ty.dtype)


def llvm_target(**fields) -> tvm.target.Target:
    """An LLVM target from keyword fields (Targets are built from dicts in 0.27)."""
    return tvm.target.Target({"kind": "llvm", **fields})
