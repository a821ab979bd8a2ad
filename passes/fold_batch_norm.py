"""Fold inference-mode batch normalization into conv2d weights (or into an elementwise affine).

Quantizing a network whose ``conv2d -> batch_norm`` pairs are still separate would calibrate and
quantize the un-normalized convolution output and then re-scale it in float, which wastes the
int8 range and leaves a float op between two quantized ones. This pass removes batch norm from
the graph before quantization:

* ``batch_norm(conv2d(x, W_const)[+ b_const])[0]`` becomes
  ``conv2d(x, W_const * s) + b'`` with ``b'`` shaped ``(1, C, 1, 1)`` (for NCHW);
* ``multiply(conv2d(x, W_const)[+ b_const], S_const) + T_const`` with per-output-channel
  ``S``/``T`` (the explicit affine that some exporters write instead of a batch norm) is folded
  the same way;
* any other inference batch norm becomes ``add(multiply(x, scale_const), shift_const)`` with
  constants shaped like the channel axis (``(1, C, 1, 1)`` for NCHW), an elementwise affine that
  later passes treat like any other elementwise op.

See :class:`FoldBatchNorm` for what TVM's own ``FoldBatchnormToConv2D`` misses.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, wildcard
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

__all__ = ["FoldBatchNorm"]

_ADD = tvm.ir.Op.get("relax.add")
_RESHAPE = tvm.ir.Op.get("relax.reshape")

@tvm.transform.module_pass(opt_level=0, name="tvmquant.FoldBatchNorm")
class FoldBatchNorm:
    """Fold inference-mode ``R.nn.batch_norm`` (and conv-following affines) into constants.

    For every Relax function of the module (functions marked ``Primitive``, ``Composite`` or
    ``Codegen`` are skipped), the pass rewrites

    1. ``R.nn.batch_norm(y, gamma, beta, mean, var)[0]`` where ``y`` is
       ``R.nn.conv2d(x, W)`` or ``R.add(R.nn.conv2d(x, W), b)`` into
       ``R.add(R.nn.conv2d(x, W * s), b')`` with ``s = gamma / sqrt(var + eps)`` applied along
       the weight's output-channel axis (``O`` of the kernel layout, so grouped and depthwise
       convolutions fold too) and ``b' = b * s + (beta - mean * s)`` shaped like the channel
       axis of the output, ``(1, C, 1, 1)`` for NCHW;
    2. ``R.add(R.multiply(y, S), T)`` with ``y`` as above and ``S``, ``T`` constants that
       broadcast per output channel (every dimension 1 except the channel axis) in the same way;
    3. every other ``R.nn.batch_norm(x, ...)[0]`` (one "left separate" by the exporter, e.g.
       after an add or on a graph input) into ``R.add(R.multiply(x, scale), shift)`` with
       constants shaped 1 except ``C`` on the batch-norm axis: an elementwise affine.

    Outputs ``[1]`` and ``[2]`` of an inference batch norm are its moving mean and variance,
    returned unchanged, and are replaced by those constants. Bindings the rewrite leaves unused
    are removed (``relax.analysis.remove_all_unused``, only in functions that changed). The folded
    constants are computed in float64 and cast to the weight's dtype.

    Notes
    -----
    Preconditions:

    - Weights and statistics are constants: ``W``, ``gamma``, ``beta``, ``mean`` and ``var``
      must be constant nodes (``relax.const``; the class is ``tvm.ir.GenericConst`` in TVM
      0.27), as ``from_onnx(model, keep_params_in_input=False)`` produces. Bias, ``S`` and
      ``T`` may also be ``R.reshape`` of a constant (the ONNX importer reshapes a ``Conv`` bias
      that way). Bind parameters first (``relax.transform.BindParams``) when they are inputs.
    - Inference mode: ``training=False``. A ``batch_norm`` with ``training=True`` (the default
      of ``relax.op.nn.batch_norm``) normalizes with the batch statistics when legalized and is
      left alone. The ONNX importer sets ``training=False`` unless the node has
      ``training_mode=1``.
    - Floating point; the convolution's data, weight and output dtypes are equal.
    - ``R.nn.conv2d`` with plain layouts (kernel a permutation of ``OIHW``, output a permutation
      of ``NCHW``), whose output channel axis is the batch-norm axis.

    Left alone:

    - ``batch_norm`` in training mode or with non-constant parameters.
    - A convolution whose weight is not a constant (its batch norm becomes the affine form).
    - A convolution, or its bias add, with users besides the batch norm or affine: folding would
      change what they see, so the batch norm becomes the separate affine form instead and an
      explicit affine stays as it is.
    - Multipliers or shifts that vary along N, H or W, and chains spread over several binding
      blocks.

    TVM's ``relax.transform.FoldBatchnormToConv2D`` (0.27) handles only ``conv2d(x, const)``
    directly followed by ``batch_norm``: a bias add in between (every ONNX ``Conv`` with a bias)
    defeats it, it folds ``training=True`` batch norms too, duplicates a convolution that has
    other users and leaves the weight arithmetic as runtime ops for ``FoldConstant``.

    Examples
    --------
    >>> mod = relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)
    >>> mod = FoldBatchNorm()(mod)
    """

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _BatchNormFolder(mod).transform()


# --------------------------------------------------------------------------------------------
# Patterns (declarative: what a candidate looks like; the folder checks users and values)
# --------------------------------------------------------------------------------------------


def _static_const_pattern():
    """A constant, or ``R.reshape`` of a constant (how ONNX Conv biases import)."""
    return is_const() | is_op("relax.reshape")(is_const(), wildcard())


def _batch_norm_pattern(index: int):
    """``R.nn.batch_norm(x, gamma, beta, mean, var)[index]`` with constant parameters."""
    bn = is_op("relax.nn.batch_norm")(wildcard(), is_const(), is_const(), is_const(), is_const())
    return bn, is_tuple_get_item(bn, index)


class _Patterns:
    def __init__(self) -> None:
        self.bn0, self.bn_out = _batch_norm_pattern(0)
        self.bn1, self.bn_mean = _batch_norm_pattern(1)
        self.bn2, self.bn_var = _batch_norm_pattern(2)
        # conv2d(x, W_const)
        self.conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
        # conv2d(x, W_const) + b_const  (add is matched commutatively)
        self.bias_conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
        self.bias = _static_const_pattern()
        self.conv_bias = is_op("relax.add")(self.bias_conv, self.bias)
        # (y * S_const) + T_const  (y checked separately: conv2d or conv2d + b)
        self.affine_scale = _static_const_pattern()
        self.affine_shift = _static_const_pattern()
        self.affine_mul = is_op("relax.multiply")(wildcard(), self.affine_scale)
        self.affine = is_op("relax.add")(self.affine_mul, self.affine_shift)


# --------------------------------------------------------------------------------------------
# Analysis: use counts and the binding block of each variable
# --------------------------------------------------------------------------------------------


@visitor
class _UseAnalysis(PyExprVisitor):
    """Count the uses of every variable and record which binding block defines it."""

    def __init__(self) -> None:
        self.uses: dict = {}
        self.block_of: dict = {}
        self._num_blocks = 0

    def _use(self, var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_var_(self, op) -> None:
        self._use(op)

    def visit_dataflow_var_(self, op) -> None:
        self._use(op)

    def _visit_block(self, block) -> None:
        index = self._num_blocks
        self._num_blocks += 1
        for binding in block.bindings:
            self.block_of[binding.var] = index
            self.visit_binding(binding)

    def visit_binding_block_(self, block) -> None:
        self._visit_block(block)

    def visit_dataflow_block_(self, block) -> None:
        self._visit_block(block)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _is_float(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _skip_function(func: relax.Function) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    for key in ("Primitive", "Composite", "Codegen"):
        if key in attrs.keys() and attrs[key]:
            return True
    return False


def _static_shape(ty) -> tuple[int, ...] | None:
    """The static shape of a tensor type, or None."""
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _channel_shape(ndim: int, axis: int, channels: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = channels
    return tuple(shape)


def _per_channel(arr: np.ndarray, ndim: int, axis: int, channels: int) -> np.ndarray | None:
    """``arr`` as a length-``channels`` vector if it broadcasts per channel, else None.

    ``arr`` must broadcast against a rank-``ndim`` tensor with ``channels`` on ``axis`` without
    changing its shape and be constant along every other axis: right-aligned, all dimensions 1
    except the channel axis, which is 1 or ``channels``.
    """
    if arr.ndim > ndim:
        return None
    padded = arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)
    for d, size in enumerate(padded.shape):
        if d == axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    return np.broadcast_to(padded, _channel_shape(ndim, axis, channels)).reshape(channels)


def _layout_str(value) -> str:
    return str(value) if value is not None else ""


# --------------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------------


@mutator
class _BatchNormFolder(PyExprMutator):
    """Rewrite bindings of one function at a time; see :class:`FoldBatchNorm`."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.pat = _Patterns()
        self.var2val_map = None  # the FFI map, for dpl matching
        self.var2val: dict = {}
        self.uses: dict = {}
        self.block_of: dict = {}
        self.block = None  # binding block of the binding being rewritten
        self.changed = False

    # -- driver ------------------------------------------------------------------------------

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function) or _skip_function(func):
                continue
            analysis = _UseAnalysis()
            analysis.visit_expr(func)
            self.var2val_map = relax.analysis.get_var2val(func)
            self.var2val = dict(self.var2val_map.items())
            self.uses = analysis.uses
            self.block_of = analysis.block_of
            self.changed = False
            new_func = self.visit_expr(func)
            if self.changed:
                new_func = relax.analysis.remove_all_unused(new_func)
                self.builder_.update_func(gv, new_func)
        return self.builder_.get()

    def visit_var_binding_(self, binding):
        outer = self.block
        self.block = self.block_of.get(binding.var)
        try:
            return super().visit_var_binding_(binding)
        finally:
            self.block = outer

    # -- value helpers -------------------------------------------------------------------------

    def _value(self, expr):
        """The bound value of a variable (one level), or the expression itself."""
        if isinstance(expr, relax.Var) and expr in self.var2val:
            return self.var2val[expr]
        return expr

    def _static_value(self, expr) -> np.ndarray | None:
        """NumPy value of a constant or of ``reshape(constant)`` (through bindings)."""
        expr = self._value(expr)
        if isinstance(expr, tvm.ir.Constant):
            return expr.value.numpy()
        if isinstance(expr, relax.Call) and expr.op.same_as(_RESHAPE):
            inner = self._static_value(expr.args[0])
            shape = _static_shape(expr.ty)
            if inner is None or shape is None:
                return None
            return inner.reshape(shape)
        return None

    def _arg_bound_to(self, call, value):
        """The argument of ``call`` that is ``value`` or a variable bound to it, else None."""
        for arg in call.args:
            if arg.same_as(value) or self._value(arg).same_as(value):
                return arg
        return None

    def _single_use_in_block(self, var, block) -> bool:
        """``var`` is a variable used once, bound in binding block ``block``."""
        return (
            isinstance(var, relax.Var)
            and var in self.var2val
            and self.uses.get(var, 0) == 1
            and self.block_of.get(var) == block
        )

    # -- the conv fold shared by batch norm and explicit affine ----------------------------------

    def _try_fold_into_conv(self, y, scale: np.ndarray, shift: np.ndarray, block, bn_axis=None):
        """Fold ``y * scale + shift`` into the conv2d producing ``y``; None when not possible.

        ``scale`` and ``shift`` are float64 arrays that must broadcast per output channel of the
        convolution; ``bn_axis`` (when given) must be the convolution's output channel axis.
        """
        if not self._single_use_in_block(y, block):
            return None
        value = self.var2val[y]
        conv_call, bias = None, None
        match = self.pat.conv_bias.extract_matched_expr(value, self.var2val_map)
        if match is not None:
            conv_call = match[self.pat.bias_conv]
            conv_var = self._arg_bound_to(value, conv_call)
            bias_arg = self._arg_bound_to(value, match[self.pat.bias])
            if (
                conv_var is None
                or bias_arg is None
                or conv_var.same_as(bias_arg)
                or not self._single_use_in_block(conv_var, block)
            ):
                return None
            bias = self._static_value(bias_arg)
            if bias is None:
                return None
        elif self.pat.conv.match(value):
            conv_call = value
        else:
            return None

        attrs = conv_call.attrs
        kernel_layout = _layout_str(attrs.kernel_layout)
        out_layout = _layout_str(attrs.out_layout) or _layout_str(attrs.data_layout)
        if sorted(kernel_layout) != sorted("OIHW") or sorted(out_layout) != sorted("NCHW"):
            return None
        weight = conv_call.args[1].value.numpy()
        out_ty = conv_call.ty
        data_ty = conv_call.args[0].ty
        if not (
            _is_float(weight.dtype)
            and str(out_ty.dtype) == str(weight.dtype)
            and str(getattr(data_ty, "dtype", "")) == str(weight.dtype)
            and out_ty.ndim == 4
        ):
            return None
        o_axis = kernel_layout.index("O")
        c_axis = out_layout.index("C")
        if bn_axis is not None and bn_axis != c_axis:
            return None
        channels = weight.shape[o_axis]
        s = _per_channel(scale, 4, c_axis, channels)
        t = _per_channel(shift, 4, c_axis, channels)
        b = np.zeros(channels) if bias is None else _per_channel(bias, 4, c_axis, channels)
        if s is None or t is None or b is None:
            return None

        dtype = weight.dtype
        new_weight = weight.astype(np.float64) * s.reshape(_channel_shape(4, o_axis, channels))
        new_bias = (b.astype(np.float64) * s + t).reshape(_channel_shape(4, c_axis, channels))
        new_conv = self.builder_.emit(
            relax.Call(
                conv_call.op,
                [self.visit_expr(conv_call.args[0]), relax.const(new_weight.astype(dtype))],
                attrs,
            )
        )
        return relax.op.add(new_conv, relax.const(new_bias.astype(dtype)))

    # -- batch norm ------------------------------------------------------------------------------

    def _inference_bn(self, bn_call) -> bool:
        attrs = bn_call.attrs
        data_ty = bn_call.args[0].ty
        return (
            not bool(attrs.training)
            and getattr(data_ty, "ndim", -1) != -1
            and _is_float(getattr(data_ty, "dtype", ""))
        )

    def visit_tuple_getitem_(self, op):
        patterns = {
            0: (self.pat.bn_out, self.pat.bn0),
            1: (self.pat.bn_mean, self.pat.bn1),
            2: (self.pat.bn_var, self.pat.bn2),
        }.get(int(op.index))
        match = None
        if patterns is not None:
            match = patterns[0].extract_matched_expr(op, self.var2val_map)
        if match is not None and self._inference_bn(match[patterns[1]]):
            bn_call = match[patterns[1]]
            if op.index != 0:
                # An inference batch norm returns its moving statistics unchanged.
                self.changed = True
                return bn_call.args[2 + int(op.index)]
            result = self._fold_batch_norm(op, bn_call)
            if result is not None:
                self.changed = True
                return result
        return super().visit_tuple_getitem_(op)

    def _fold_batch_norm(self, op, bn_call):
        data = bn_call.args[0]
        ndim = data.ty.ndim
        axis = int(bn_call.attrs.axis)
        axis = axis + ndim if axis < 0 else axis
        if not 0 <= axis < ndim:
            return None
        gamma, beta, mean, var = (a.value.numpy().astype(np.float64) for a in bn_call.args[1:])
        channels = mean.shape[0] if mean.ndim == 1 else -1
        if channels < 1 or any(a.shape != (channels,) for a in (gamma, beta, var)):
            return None
        std = np.sqrt(var + float(bn_call.attrs.epsilon))
        scale = (gamma if bool(bn_call.attrs.scale) else 1.0) / std
        shift = (beta if bool(bn_call.attrs.center) else 0.0) - mean * scale

        # Rewrite only where the batch norm is bound in the block of its tuple access: then its
        # input (and a convolution's input, when the conv chain is in that block too) is visible.
        block = self.block
        if block is None or self.block_of.get(op.tuple_value) != block:
            return None
        bshape = _channel_shape(ndim, axis, channels)
        if ndim == 4:
            folded = self._try_fold_into_conv(
                data, scale.reshape(bshape), shift.reshape(bshape), block, bn_axis=axis
            )
            if folded is not None:
                return folded

        # Left separate: an elementwise affine with per-channel constants.
        dtype = str(data.ty.dtype)
        scale_const = relax.const(scale.astype(dtype).reshape(bshape))
        shift_const = relax.const(shift.astype(dtype).reshape(bshape))
        scaled = self.builder_.emit(relax.op.multiply(self.visit_expr(data), scale_const))
        return relax.op.add(scaled, shift_const)

    # -- explicit affine after conv ----------------------------------------------------------------

    def visit_call_(self, op):
        result = self._fold_affine(op)
        if result is not None:
            self.changed = True
            return result
        return super().visit_call_(op)

    def _fold_affine(self, op):
        if not op.op.same_as(_ADD):
            return None
        match = self.pat.affine.extract_matched_expr(op, self.var2val_map)
        if match is None:
            return None
        mul_call = match[self.pat.affine_mul]
        mul_var = self._arg_bound_to(op, mul_call)
        shift_arg = self._arg_bound_to(op, match[self.pat.affine_shift])
        scale_arg = self._arg_bound_to(mul_call, match[self.pat.affine_scale])
        if mul_var is None or shift_arg is None or scale_arg is None:
            return None
        if mul_var.same_as(shift_arg) or not isinstance(mul_var, relax.Var):
            return None
        block = self.block
        if block is None or not self._single_use_in_block(mul_var, block):
            return None
        y = next((a for a in mul_call.args if not a.same_as(scale_arg)), None)
        scale = self._static_value(scale_arg)
        shift = self._static_value(shift_arg)
        if y is None or scale is None or shift is None:
            return None
        return self._try_fold_into_conv(
            y, scale.astype(np.float64), shift.astype(np.float64), block
        )
