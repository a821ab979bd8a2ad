"""DispatchSubByte: run integer matmuls and convolutions with few-bit operands on the
sub-byte kernels.

Preconditions: an integer-only module from :class:`~tvmquant.passes.LowerToIntegerOnly`, whose
matmuls are spelled ``matmul(u8 codes, const s8 codes [K, N], out_dtype="int32")``. Weights
quantized below 8 bits are stored in int8 containers; their value range tells how many bits
they need (a per-channel int8 weight always reaches +-127, a 4-bit one stays in [-8, 7]).
The activation's bits come from the clamp that produced it (``clip(x, 0, 2^b - 1)``).

Rules, first match wins:

- **bit-serial** (activations and weights of at most 3 bits, the ``QuantSpec(bits=1..3)``
  layers), matmul and conv2d: the activation codes are bit-packed at run time
  (:func:`bitpack_kernel`; for a convolution the packing gathers the patches too:
  :func:`bitpack_conv_nhwc_kernel` with AVX2, 64 channels of one pixel per word, or the
  portable :func:`bitpack_im2col_kernel`), the weights once at compile time, and the product
  is a popcount dense (:func:`bitserial_dense`, unipolar activations x two's-complement
  weights).
- **binary activations** (``QuantSpec.binary()``: int8 codes -1/+1 made by ``where(y >= 0,
  1, -1)``) with binary weights (-1/+1) or ternary weights (-1/0/+1), matmul and conv2d: the
  packing takes the codes' sign bits and the popcount dense runs XNOR-Net's ``xnor`` mode
  (one plane pair) or the ``ternary`` mode (two). A convolution's zero padding (a real 0,
  neither -1 nor +1) is packed as +1 and corrected by a compile-time constant per output
  pixel and channel (the weights those padded taps met).
- **sub-byte GEMV** (weights of 2 or 4 bits, at most :data:`MAX_GEMV_ROWS` rows, VNNI
  targets; matmuls, and 1x1 convolutions over at most that many pixels): the weights
  packed two or four per byte (:func:`pack_subbyte`), unpacked in registers; the
  memory-bound shapes where fewer weight bytes are less time.

The GEMV runs the int8 kernels' epilogue (zero-point correction and bias, dyadic
requantization, clamp) before its store when the product is followed by one; elsewhere
only the integer product is replaced and what follows stays graph ops (fused by FuseOps).
The packed constants are what the compiled module stores, so the weights shrink in the
file as well.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..._compat import Constant, const_value, dtype_of, static_shape
from ...passes.analysis import emit_like
from .bitserial_dense import (
    WORD,
    bitpack,
    bitpack_conv_nhwc_kernel,
    bitpack_im2col_kernel,
    bitpack_kernel,
    bitserial_dense,
    conv_output_size,
    pack_conv_weight_nhwc,
    padded_words,
)
from .dispatch import _match_chains
from .subbyte_gemv import LANES, k_block, pack_subbyte, subbyte_gemv

MAX_GEMV_ROWS = 8
MAX_BITSERIAL_BITS = 3


def signed_bits(w: np.ndarray) -> int:
    """The fewest two's-complement bits holding every value of ``w`` (1 for {0, 1})."""
    lo, hi = int(w.min(initial=0)), int(w.max(initial=0))
    if lo >= 0 and hi <= 1:
        return 1
    bits = 2
    while not (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


def sign_mode(w: np.ndarray) -> str | None:
    """``"xnor"`` for weights in {-1, +1}, ``"ternary"`` in {-1, 0, +1}, else None."""
    values = set(np.unique(w).tolist())
    if values <= {-1, 1}:
        return "xnor"
    if values <= {-1, 0, 1}:
        return "ternary"
    return None


def sign_planes(w: np.ndarray, mode: str, pack=bitpack) -> np.ndarray:
    """Weight planes of the ``xnor`` (negative) or ``ternary`` (nonzero, negative) modes;
    ``pack`` lays one 0/1 plane out (:func:`bitpack` on ``[N, K]`` rows, or
    :func:`pack_conv_weight_nhwc` on OIHW weights)."""
    negative = pack((w < 0).astype(np.int64), 1)
    if mode == "xnor":
        return negative
    return np.concatenate([pack((w != 0).astype(np.int64), 1), negative])


def padding_correction(w: np.ndarray, h: int, wd: int, stride: int,
                       pad: tuple[int, int, int, int]) -> np.ndarray:
    """``[Ho, Wo, O]``: minus the weights that the taps falling into a conv2d's zero padding
    meet at each output pixel. The sign packing reads padding as +1 (a zero bit); the true
    padding value is 0, so ``out + correction`` is the exact convolution."""
    _, _, kh, kw = w.shape
    top, left, _, _ = pad
    ho, wo = conv_output_size(h, wd, kh, kw, stride, pad)
    ys = np.arange(ho)[:, None] * stride + np.arange(kh)[None, :] - top  # [Ho, kh]
    xs = np.arange(wo)[:, None] * stride + np.arange(kw)[None, :] - left  # [Wo, kw]
    outside = ((ys < 0) | (ys >= h))[:, None, :, None] | ((xs < 0) | (xs >= wd))[None, :, None, :]
    tap_sums = w.astype(np.int64).sum(axis=1)  # [O, kh, kw]
    return -np.einsum("yxij,oij->yxo", outside.astype(np.int64), tap_sums).astype(np.int32)


def _kernel_func(mod: tvm.IRModule, name: str) -> tvm.tirx.PrimFunc:
    return mod["main"].with_attrs({"global_symbol": name, "op_pattern": 8,
                                   "tirx.is_scheduled": True})


@relax.expr_functor.mutator
class _SubByteDispatcher(relax.PyExprMutator):
    def __init__(self, mod, func, gemv: bool, avx2: bool):
        super().__init__(mod)
        self.gemv, self.avx2 = gemv, avx2
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.value = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
        self.picked: list[str] = []
        # requantization chains (chain end -> match) whose product the GEMV will take whole
        # (a chain that is dequantized instead is left to the GEMV's own int32 output)
        self.fused = {v: m for v, m in _match_chains(func).items()
                      if m.requant is not None and self._gemv_bits(m.anchor) is not None}
        self.fused_anchors = {var for var, value in self.value.items()
                              if any(value.same_as(m.anchor) for m in self.fused.values())}

    def _gemv_bits(self, call) -> int | None:
        """2 or 4 if ``call`` (integer matmul or conv2d) goes to the sub-byte GEMV."""
        data = call.args[0]
        if not self.gemv or not isinstance(data, relax.Var) or dtype_of(data) != "uint8" or \
                not isinstance(call.args[1], Constant):
            return None
        w = const_value(call.args[1])
        wbits = signed_bits(w) if w.dtype == np.int8 else 8
        if wbits > 4 or (self._activation_bits(data) <= MAX_BITSERIAL_BITS and
                         wbits <= MAX_BITSERIAL_BITS):
            return None  # int8, or bit-serial
        if call.op.name == "relax.matmul":
            rows = self._rows(data)
            ok = w.ndim == 2 and rows is not None and rows[0] <= MAX_GEMV_ROWS
        else:
            ok = call.op.name == "relax.nn.conv2d" and self._conv1x1_rows(call) is not None
        return (2 if wbits <= 2 else 4) if ok else None

    def _conv1x1_rows(self, call):
        """Pixels of a 1x1, stride-1, unpadded NCHW conv2d over at most MAX_GEMV_ROWS."""
        attrs, shape = call.attrs, static_shape(call.args[0])
        w_shape = static_shape(call.args[1])
        if shape is None or w_shape is None or tuple(w_shape[2:]) != (1, 1) or \
                int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW" or \
                str(attrs.out_layout) != "NCHW" or \
                any(int(v) != 1 for v in (*attrs.strides, *attrs.dilation)) or \
                any(int(p) for p in attrs.padding):
            return None
        n, _, h, w = shape
        return n * h * w if n * h * w <= MAX_GEMV_ROWS else None

    def _kernel(self, key, build):
        if key not in self.kernels:
            name = f"tvmquant_x86_{key[0]}_{len(self.kernels)}"
            self.kernels[key] = self.builder_.add_func(_kernel_func(build(), name), name)
        return self.kernels[key]

    def _activation_bits(self, data) -> int:
        """Bits of unsigned activation codes, from the clamp that produced them (8 if none)."""
        v = self.value.get(data)
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
                v.op.name == "relax.astype":
            v = self.value.get(v.args[0])
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)
                and v.op.name == "relax.clip"):
            return 8
        lo, hi = v.args[1], v.args[2]
        if not hasattr(lo, "value") or int(lo.value) < 0:
            return 8
        return max(1, int(hi.value).bit_length())

    def _binary_codes(self, data) -> bool:
        """Whether ``data`` is binary codes ``where(cond, 1, -1)`` (int8)."""
        v = self.value.get(data)
        return isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and \
            v.op.name == "relax.where" and \
            [const_value(a).item() if isinstance(a, Constant) else None
             for a in v.args[1:]] == [1, -1]

    def _rows(self, data):
        shape = static_shape(data)
        if shape is None or len(shape) < 2:
            return None
        return int(np.prod(shape[:-1])), shape[-1]

    def _bitserial(self, call, w, abits, wbits, mode="unipolar"):
        data = self.visit_expr(call.args[0])
        rows, k = self._rows(call.args[0])
        n = w.shape[1]
        bb = self.builder_
        flat = bb.emit(relax.op.reshape(data, (rows, k)))
        dtype, offset = ("uint8", 0) if mode == "unipolar" else ("int8", 7)
        pack = self._kernel(("bitpack", rows, k, abits, dtype),
                            lambda: bitpack_kernel(rows, k, abits, dtype, offset))
        planes = bb.emit(relax.call_tir(pack, [flat], relax.TensorType(
            (abits, rows, padded_words(k)), "uint64")))
        dense = self._kernel(("bitserial", rows, n, k, abits, wbits, mode),
                             lambda: bitserial_dense(rows, n, k, mode=mode, abits=abits,
                                                     wbits=wbits))
        wplanes = relax.const(bitpack(w.T.astype(np.int64), wbits) if mode == "unipolar"
                              else sign_planes(w.T, mode), "uint64")
        out = bb.emit(relax.call_tir(dense, [planes, wplanes],
                                     relax.TensorType((rows, n), "int32")))
        return relax.op.reshape(out, static_shape(call))

    def _bitserial_conv(self, call, w, abits, wbits, mode="unipolar"):
        """im2col fused with the bit packing, then the popcount dense over output pixels."""
        attrs = call.attrs
        if int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW" or \
                str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW" or \
                any(int(d) != 1 for d in attrs.dilation) or \
                len({int(s) for s in attrs.strides}) != 1:
            return None
        data = self.visit_expr(call.args[0])
        n, c, h, wd = static_shape(call.args[0])
        o, _, kh, kw = w.shape
        stride = int(attrs.strides[0])
        pad = tuple(int(p) for p in attrs.padding)
        _, _, ho, wo = static_shape(call)
        rows, k = n * ho * wo, c * kh * kw
        bb = self.builder_
        dtype, offset = ("uint8", 0) if mode == "unipolar" else ("int8", 7)
        correction = None if mode == "unipolar" else padding_correction(w, h, wd, stride, pad)
        if self.avx2:  # NHWC, channels padded to 64: one word per pixel and 64 channels
            cp = -(-c // WORD) * WORD
            data = bb.emit(relax.op.permute_dims(data, [0, 2, 3, 1]))
            if cp != c:
                data = bb.emit(relax.op.nn.pad(data, [0, 0, 0, 0, 0, 0, 0, cp - c],
                                               pad_value=0.0))
            if mode == "xnor":  # the padded channels pack as +1 against +1
                correction -= (cp - c) * kh * kw
            k = kh * kw * cp
            pack = self._kernel(("bitpack_nhwc", n, h, wd, cp, kh, kw, stride, pad, abits,
                                 dtype),
                                lambda: bitpack_conv_nhwc_kernel(n, h, wd, cp, kh, kw, stride,
                                                                 pad, abits, dtype, offset))
            wplanes = pack_conv_weight_nhwc(w, wbits) if mode == "unipolar" else \
                sign_planes(w, mode, pack_conv_weight_nhwc)
        else:
            pack = self._kernel(("bitpack_im2col", n, c, h, wd, kh, kw, stride, pad, abits,
                                 dtype),
                                lambda: bitpack_im2col_kernel(n, c, h, wd, kh, kw, stride, pad,
                                                              abits, dtype, offset))
            wplanes = bitpack(w.reshape(o, k).astype(np.int64), wbits) if mode == "unipolar" \
                else sign_planes(w.reshape(o, k), mode)
        planes = bb.emit(relax.call_tir(pack, [data], relax.TensorType(
            (abits, rows, padded_words(k)), "uint64")))
        dense = self._kernel(("bitserial", rows, o, k, abits, wbits, mode),
                             lambda: bitserial_dense(rows, o, k, mode=mode, abits=abits,
                                                     wbits=wbits))
        out = bb.emit(relax.call_tir(dense, [planes, relax.const(wplanes, "uint64")],
                                     relax.TensorType((rows, o), "int32")))
        out = bb.emit(relax.op.reshape(out, (n, ho, wo, o)))
        if correction is not None and correction.any():
            out = bb.emit(relax.op.add(out, relax.const(correction[None], "int32")))
        return relax.op.permute_dims(out, [0, 3, 1, 2])

    def _gemv_call(self, call, bits, match=None):
        """The sub-byte GEMV for a matmul or a few-pixel 1x1 conv2d (pixels as rows), with
        the requantization of ``match`` fused when given; the result has ``call``'s shape."""
        w = const_value(call.args[1])
        data = self.visit_expr(call.args[0])
        bb = self.builder_
        if call.op.name == "relax.matmul":
            rows, k = self._rows(call.args[0])
            flat = bb.emit(relax.op.reshape(data, (rows, k)))
            w_nk = w.T
        else:
            n, k, h, wd = static_shape(call.args[0])
            rows = n * h * wd
            flat = bb.emit(relax.op.reshape(relax.op.permute_dims(data, [0, 2, 3, 1]),
                                            (rows, k)))
            w_nk = w.reshape(w.shape[0], k)
        n_out = w_nk.shape[0]
        kb = k_block(bits)
        kp = -(-k // kb) * kb
        if kp != k:
            flat = bb.emit(relax.op.nn.pad(flat, [0, 0, 0, kp - k], pad_value=0.0))
        n_pad = -(-n_out // LANES) * LANES
        args = [flat, relax.const(pack_subbyte(w_nk, bits), "int8")]
        dtype = "int32"
        if match is None:
            gv = self._kernel(("gemv", rows, n_out, kp, bits),
                              lambda: subbyte_gemv(rows, n_out, kp, bits))
        else:
            gv = self._kernel(("gemv", rows, n_out, kp, bits, match.requant),
                              lambda: subbyte_gemv(rows, n_out, kp, bits, match.requant))
            args += [relax.const(np.pad(v, (0, n_pad - n_out)).astype(np.int32), "int32")
                     for v in (match.bias, match.m0, match.shift)]
            dtype = match.requant.out_dtype
        out = bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, n_pad), dtype)))
        if n_pad != n_out:
            out = bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n_out]))
        kind = "gemv" if call.op.name == "relax.matmul" else "gemv conv1x1"
        self.picked.append(f"{kind} w{bits}" + (" +requant" if match is not None else ""))
        if call.op.name == "relax.matmul":
            return relax.op.reshape(out, static_shape(call))
        n, _, h, wd = static_shape(call.args[0])
        out = bb.emit(relax.op.reshape(out, (n, h, wd, n_out)))
        return relax.op.permute_dims(out, [0, 3, 1, 2])

    def _binary_conv(self, call, w):
        mode = sign_mode(w) if self._binary_codes(call.args[0]) else None
        if mode is None:
            return None
        new = self._bitserial_conv(call, w, 1, 1 if mode == "xnor" else 2, mode)
        if new is not None:
            self.picked.append(f"{mode} conv")
        return new

    def visit_var_binding_(self, binding):
        match = self.fused.get(binding.var)
        if match is not None:
            new = self._gemv_call(match.anchor, self._gemv_bits(match.anchor), match)
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))
            return
        call = binding.value
        if binding.var in self.fused_anchors:
            super().visit_var_binding_(binding)  # taken whole at the end of its chain
            return
        if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and \
                call.op.name == "relax.nn.conv2d" and str(call.attrs.out_dtype) == "int32" and \
                dtype_of(call.args[0]) in ("uint8", "int8") and \
                isinstance(call.args[1], Constant) and \
                isinstance(call.args[0], relax.Var) and static_shape(call.args[0]) is not None:
            w = const_value(call.args[1])
            abits = self._activation_bits(call.args[0])
            wbits = signed_bits(w) if w.dtype == np.int8 else 8
            new = None
            if dtype_of(call.args[0]) == "int8":
                new = self._binary_conv(call, w)
            elif abits <= MAX_BITSERIAL_BITS and wbits <= MAX_BITSERIAL_BITS:
                new = self._bitserial_conv(call, w, abits, wbits)
                if new is not None:
                    self.picked.append(f"bitserial conv a{abits}w{wbits}")
            elif (bits := self._gemv_bits(call)) is not None:
                new = self._gemv_call(call, bits)
            if new is not None:
                self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))
                return
        if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and \
                call.op.name == "relax.matmul" and str(call.attrs.out_dtype) == "int32" and \
                dtype_of(call.args[0]) in ("uint8", "int8") and \
                isinstance(call.args[1], Constant) and \
                isinstance(call.args[0], relax.Var) and self._rows(call.args[0]) is not None:
            w = const_value(call.args[1])
            if w.dtype == np.int8 and w.ndim == 2:
                new = self._pick(call, w)
                if new is not None:
                    self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))
                    return
        super().visit_var_binding_(binding)

    def _pick(self, call, w):
        if dtype_of(call.args[0]) == "int8":
            mode = sign_mode(w) if self._binary_codes(call.args[0]) else None
            if mode is None:
                return None
            self.picked.append(f"{mode} dense")
            return self._bitserial(call, w, 1, 1 if mode == "xnor" else 2, mode)
        wbits = signed_bits(w)
        abits = self._activation_bits(call.args[0])
        if abits <= MAX_BITSERIAL_BITS and wbits <= MAX_BITSERIAL_BITS:
            self.picked.append(f"bitserial a{abits}w{wbits}")
            return self._bitserial(call, w, abits, wbits)
        bits = self._gemv_bits(call)
        return self._gemv_call(call, bits) if bits is not None else None


@tvm.transform.module_pass(opt_level=0, name="tvmquant.DispatchSubByte")
class DispatchSubByte:
    """Replace few-bit integer matmuls by bit-serial or sub-byte GEMV kernels.

    Parameters
    ----------
    gemv : bool
        Allow the sub-byte GEMV kernels (they need AVX-512 VNNI).
    avx2 : bool
        Pack convolution inputs with AVX2's ``vpmovmskb`` (NHWC, 64 channels per word)
        instead of the portable bit-by-bit im2col packing.
    func_name : str
        The Relax function to rewrite.
    """

    def __init__(self, gemv: bool = True, avx2: bool = True, func_name: str = "main"):
        self.gemv, self.avx2 = gemv, avx2
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        dispatcher = _SubByteDispatcher(mod, func, self.gemv, self.avx2)
        new_func = dispatcher.visit_expr(func)
        if not dispatcher.picked:
            return mod
        new_mod = dispatcher.builder_.get()
        new_mod[self.func_name] = new_func.with_attr("tvmquant.subbyte_kernels",
                                                     list(dispatcher.picked))
        return relax.transform.DeadCodeElimination()(new_mod)


__all__ = ["DispatchSubByte", "padding_correction", "sign_mode", "sign_planes",
           "signed_bits"]
