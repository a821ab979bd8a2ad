"""DispatchX86Int8: run integer convolutions and matmuls on the x86 kernels of this package.

Preconditions: an integer-only module from :class:`~tvmquant.passes.LowerToIntegerOnly`, whose
anchors are spelled ``conv2d/matmul(u8, const s8, out_dtype="int32")`` followed by the dyadic
requantization chain ``[add(bias)] -> astype(int64) -> multiply(m0) -> add(half) ->
right_shift(shift) -> add(zp) -> clip(lo, hi) -> astype(u8|s8|s16)``, each value used once.

Each such chain becomes one ``R.call_tir`` of a scheduled, tensorized kernel with the weights
packed once at compile time (``[O/16, K/4, 16, 4]``) and the bias, requantization and clamp
fused into its epilogue (:mod:`.int8_conv2d`, :mod:`.int8_dense`). A stride-1 convolution
whose output rows fill the 16 lanes better than its output channels do (24 channels on rows
of 80) runs on :mod:`.int8_conv2d_pixels` instead (pixels on the lanes), unless a lookup
table follows it: with its tables on that kernel too, rec and det measured 2% and 0.3%
slower, cls 2.5% faster (the table lookups there are per channel row, as in the
channel-lane kernel, and the kernels' own gains do not make up for them). Two neighbours join the
kernel too: a 16-bit lookup table after the chain (``astype(int32) -> subtract(c) ->
take(const table, mode="clip")``, sigmoid, ...) or the integer gate of hard-swish
(``astype(int32)``, ``(x + x_off) * clip(x + g_off, ..)``, then a requantization) runs in
the epilogue, and a constant spatial ``nn.pad`` before a convolution runs in the kernel's
input re-layout, so neither costs a pass over memory of its own. A depthwise convolution runs on
:mod:`.int8_depthwise_conv2d` (its pad, widened to what that kernel reads, stays one
``nn.pad`` before it). An anchor whose int32 sum the graph dequantizes instead
(an integer layer that only float layers read: a mixed-precision boundary, a model's last
layer) runs on the same kernels with an int32 output; the float ops after it stay in the
graph. A grouped convolution (not depthwise) runs as one call of the regular kernel per group
on that group's channels, and a concat. What does not match (dilation, signed activations,
batched matmuls) is left to TVM's default kernels. A transposed convolution
whose stride equals its kernel (the upsampling heads of detectors) is a 1x1 convolution
followed by a depth-to-space, and runs as one.
Kernels are cached by shape and epilogue within a module.

On CPUs with AMX-INT8 (``isa="amx"``), the stride-1 regular convolutions and the matmuls
that fill AMX's tiles well enough (:func:`.int8_conv2d_amx.prefer_amx`,
:func:`.int8_dense_amx.prefer_amx_dense`) run on :mod:`.int8_conv2d_amx` and
:mod:`.int8_dense_amx`, and the rest on the AVX-512 VNNI kernels.
The kernels use AVX-512 VNNI (``isa="avx512_vnni"``); on CPUs with AVX2 only
(``isa="avx2"``) the regular convolutions (pixel-lane and channel-lane, by the same rule),
the matmuls and the depthwise convolutions (strides 1 and 2 along the row) run on the same
kernels tensorized with exact ``vpmaddwd`` blocks instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from ..._compat import Constant, const_value, dtype_of, static_shape
from ...passes.analysis import emit_like, function_bindings
from .int8_conv2d import conv_output_size, int8_conv2d, pack_conv_weight
from .int8_conv2d_amx import amx_tiles, int8_conv2d_amx, pack_conv_weight_amx, prefer_amx
from .int8_conv2d_pixels import int8_conv2d_pixels, pack_conv_weight_pixels, prefer_pixels
from .int8_dense import (
    Gate,
    Requant,
    int8_dense,
    kernel_for_relax,
    pack_weight,
    scaled_high_word_is_exact,
)
from .int8_dense_amx import amx_dense_tiles, int8_dense_amx, pack_weight_amx, prefer_amx_dense
from .int8_depthwise_conv2d import (
    depthwise_input_size,
    depthwise_output_size,
    int8_depthwise_conv2d,
    pack_depthwise_weight,
)

#: A grouped convolution goes on the kernels group by group when it has at most
#: ``FEW_GROUPS`` groups, or at most ``MAX_GROUPS`` of at least ``GROUP_CHANNELS`` input
#: channels each; else it stays on TVM's default kernel (one kernel call per group costs
#: its own launch, slice and share of the concat). Measured on 9x13 inputs, 3x3, Zen 4,
#: 2 threads (default / per group): 4 groups of 8 channels 24 / 12 us, 8 of 8 26 / 26,
#: 32 of 8 93 / 220, 16 of 16 186 / 123, 16 of 32 740 / 356, 8 of 64 1483 / 256.
FEW_GROUPS, MAX_GROUPS, GROUP_CHANNELS = 4, 32, 16


def target_has_features(target: tvm.target.Target, *features: str) -> bool:
    """Whether an LLVM target may use all of the CPU ``features`` (LLVM names)."""
    if target.kind.name != "llvm":
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features(list(features), target))
    except Exception:  # older/odd targets (another architecture): be conservative
        return False


def target_has_vnni(target: tvm.target.Target) -> bool:
    """Whether an LLVM target may use AVX-512 VNNI."""
    return target_has_features(target, "avx512vnni")


def target_isa(target: tvm.target.Target) -> str | None:
    """The int8 kernels' instruction set on ``target``: ``"amx"`` (AMX-INT8 and AVX-512
    VNNI), ``"avx512_vnni"``, ``"avx2"`` or None."""
    if target_has_vnni(target):
        return "amx" if target_has_features(target, "amx-int8", "amx-tile") else "avx512_vnni"
    if target_has_features(target, "avx2"):
        return "avx2"
    return None


def _op(value, name: str) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
        value.op.name == name


def _const(expr) -> np.ndarray | None:
    return const_value(expr) if isinstance(expr, Constant) else None


def _per_channel(v: np.ndarray, n: int) -> np.ndarray | None:
    flat = np.asarray(v).reshape(-1)
    if flat.size == 1:
        return np.full(n, flat[0])
    return flat if flat.size == n else None


class _Match:
    """One anchor with its requantization chain (``requant`` None: the int32 sum with its
    bias, which the graph then dequantizes for a float reader)."""

    def __init__(self, anchor, data, weight, bias, m0, shift, requant: Requant | None,
                 out_var):
        self.anchor, self.data, self.weight = anchor, data, weight
        self.bias, self.m0, self.shift = bias, m0, shift
        self.requant = requant
        self.out_var = out_var
        self.lut: np.ndarray | None = None
        """The kernel's last epilogue input: a lookup table, or an integer gate's parameters."""
        self.pad: tuple[tuple[int, int, int, int], int, relax.Expr] | None = None
        """``((top, left, bottom, right), value, unpadded input)`` of a pad before a conv."""


def _use_high_word(m: _Match) -> None:
    """Requantize ``m`` from the product's high word (``Requant.high_word``) when every
    channel's shift is in 33..62, or scaled to that (``Requant.scaled``) where that is exact.
    Only on AVX2, where the int64 form is slow (no 64-bit arithmetic shift); on AVX-512 it
    measured level (``benchmarks/NOTES.md``), and the VNNI kernels keep the form their
    benchmarks were measured with."""
    if m.requant is None or m.shift is None or not len(m.shift):
        return
    if 33 <= int(np.min(m.shift)) and int(np.max(m.shift)) <= 62:
        m.requant = dataclasses.replace(m.requant, high_word=True)
    elif m.m0 is not None and scaled_high_word_is_exact(m.m0, m.shift, m.requant):
        m.requant = dataclasses.replace(m.requant, high_word=True, scaled=True)


def _has_table(m: _Match) -> bool:
    return m.requant is not None and bool(m.requant.lut_size)


def _result_dtype(m: _Match) -> str:
    return m.requant.result_dtype if m.requant is not None else "int32"


def _lookup_table(m: _Match, next_of, value: dict) -> None:
    """Extend ``m`` (an int16 result) with ``astype(int32) -> subtract(c) -> take(table)``;
    ``next_of(var, op name)`` is the single user of ``var`` when it is that op."""
    widen = next_of(m.out_var, "relax.astype")
    if widen is None or str(value[widen].attrs.dtype) != "int32":
        return
    sub = next_of(widen, "relax.subtract")
    if sub is None or not value[sub].args[0].same_as(widen):
        return
    c = _const(value[sub].args[1])
    take = next_of(sub, "relax.take")
    if c is None or c.size != 1 or take is None or not value[take].args[1].same_as(sub):
        return
    table = _const(value[take].args[0])
    if table is None or table.ndim != 1 or table.dtype not in (np.uint8, np.int8) or \
            int(value[take].attrs.axis) != 0 or str(value[take].attrs.mode) != "clip":
        return
    r = m.requant
    m.requant = Requant(r.zero_point, r.lo, r.hi, r.out_dtype, lut_size=int(table.size),
                        lut_offset=-int(c.reshape(())), lut_dtype=str(table.dtype))
    m.lut, m.out_var = table, take


def _integer_gate(m: _Match, users, value: dict) -> None:
    """Extend ``m`` (an int16 result) with the integer gate ``LowerToIntegerOnly`` writes
    for hard-swish, in int32: ``x = astype(int32)``, ``(x + x_off) * clip(x + g_off, g_lo,
    g_hi)``, then ``+ p_off``, ``>> pre_shift``, ``* m0``, ``+ half``, ``>> shift``,
    ``+ zero point``, ``clip``, ``astype``."""

    def only(v, name):
        us = users.get(v, [])
        return us[0] if len(us) == 1 and _op(value[us[0]], name) else None

    def scalar(expr):
        c = _const(expr)
        return int(c.reshape(())) if c is not None and c.size == 1 and \
            c.dtype == np.int32 else None

    x = only(m.out_var, "relax.astype")
    if x is None or str(value[x].attrs.dtype) != "int32":
        return
    adds = users.get(x, [])
    if len(adds) != 2 or not all(_op(value[a], "relax.add") and value[a].args[0].same_as(x)
                                 for a in adds):
        return
    clip = [only(a, "relax.clip") for a in adds]
    if (clip[0] is None) == (clip[1] is None):
        return
    x1, g = (adds[0], adds[1]) if clip[1] is not None else (adds[1], adds[0])
    clip = clip[0] or clip[1]
    prod = only(clip, "relax.multiply")
    if prod is None or users.get(x1) != [prod] or \
            not (value[prod].args[0].same_as(x1) and value[prod].args[1].same_as(clip)):
        return
    chain, cur = [], prod
    for name in ("relax.add", "relax.right_shift", "relax.multiply", "relax.add",
                 "relax.right_shift", "relax.add", "relax.clip", "relax.astype"):
        cur = only(cur, name)
        if cur is None or not value[cur].args[0].same_as(chain[-1] if chain else prod):
            return
        chain.append(cur)
    add_p, pre, mul, half, shr, addz, out_clip, cast = (value[v] for v in chain)
    params = [scalar(value[x1].args[1]), scalar(value[g].args[1]),
              int(value[clip].args[1].value), int(value[clip].args[2].value),
              scalar(add_p.args[1]), scalar(pre.args[1]), scalar(mul.args[1]),
              scalar(shr.args[1]), scalar(addz.args[1])]
    if any(p is None for p in params) or not 1 <= params[7] <= 30 or \
            scalar(half.args[1]) != 1 << (params[7] - 1) or not 0 <= params[5] <= 30 or \
            str(cast.attrs.dtype) not in ("uint8", "int8"):
        return
    r = m.requant
    gate = Gate(str(cast.attrs.dtype), int(out_clip.args[1].value),
                int(out_clip.args[2].value))
    m.requant = Requant(r.zero_point, r.lo, r.hi, r.out_dtype, gate=gate)
    m.lut, m.out_var = np.asarray(params, np.int32), chain[-1]


def _spatial_pad(call) -> tuple[tuple[int, int, int, int], int] | None:
    """``((top, left, bottom, right), value)`` of a constant uint8 pad of H and W only."""
    if not _op(call, "relax.nn.pad") or str(call.attrs.pad_mode) != "constant":
        return None
    width = [int(p) for p in call.attrs.pad_width]
    value = float(call.attrs.pad_value)
    if len(width) != 8 or any(width[:4]) or min(width) < 0 or value != int(value) or \
            not 0 <= value <= 255:
        return None
    return (width[4], width[6], width[5], width[7]), int(value)


def _match_chains(func: relax.Function, *, lut: bool = False) -> dict[relax.Var, _Match]:
    """Anchors and their requantization chains, keyed by the chain's last variable.

    With ``lut``, a 16-bit lookup table after an int16 chain joins it (the key is then the
    ``take``), and a conv2d reading a constant spatial pad records it in ``_Match.pad``.
    """
    bindings = function_bindings(func)
    value = {b.var: b.value for b in bindings}
    users: dict[relax.Var, list[relax.Var]] = {}
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for a in b.value.args:
                if isinstance(a, relax.Var):
                    users.setdefault(a, []).append(b.var)

    def next_of(v, name):
        us = users.get(v, [])
        if len(us) == 1 and _op(value[us[0]], name):
            return us[0]
        return None

    matches = {}
    for b in bindings:
        call = b.value
        if not (_op(call, "relax.nn.conv2d") or _op(call, "relax.matmul")
                or _op(call, "relax.nn.conv2d_transpose")):
            continue
        if str(call.attrs.out_dtype) != "int32" or dtype_of(call.args[0]) != "uint8":
            continue
        w = _const(call.args[1])
        if w is None or w.dtype != np.int8:
            continue
        n_out = static_shape(b.var)[-1 if _op(call, "relax.matmul") else 1]
        cur, bias = b.var, np.zeros(n_out, np.int32)
        # int32 constant adds (zero-point correction, bias) fold into one bias vector
        while (nxt := next_of(cur, "relax.add")) is not None:
            other = [a for a in value[nxt].args if not a.same_as(cur)]
            c = _const(other[0]) if other else None
            pc = _per_channel(c, n_out) if c is not None and c.dtype == np.int32 else None
            if pc is None:
                break
            bias, cur = (bias.astype(np.int64) + pc).astype(np.int32), nxt
        chain = []
        summed = cur
        for name in ("relax.astype", "relax.multiply", "relax.add", "relax.right_shift",
                     "relax.add", "relax.clip", "relax.astype"):
            nxt = next_of(cur, name)
            if nxt is None:
                break
            chain.append(nxt)
            cur = nxt
        if chain and str(value[chain[0]].attrs.dtype) == "float32":
            # an integer layer that only float layers read: its sum is dequantized, not
            # requantized; the kernel gives the int32 sum (and bias), the graph the rest
            matches[summed] = _Match(call, call.args[0], w, bias, None, None, None, summed)
            continue
        if len(chain) != 7:
            continue
        cast64, mul, _half, shr, addz, clip, cast = (value[v] for v in chain)
        if str(cast64.attrs.dtype) != "int64" or \
                str(cast.attrs.dtype) not in ("uint8", "int8", "int16"):
            continue
        m0 = _const(mul.args[1])
        sh = _const(shr.args[1])
        zp = _const(addz.args[1])
        if m0 is None or sh is None or zp is None or zp.size != 1:
            continue
        m0, sh = _per_channel(m0, n_out), _per_channel(sh, n_out)
        if m0 is None or sh is None or np.any(m0 >= 2**31) or np.any(sh > 62):
            continue
        m = _Match(call, call.args[0], w, bias, m0.astype(np.int32), sh.astype(np.int32),
                   Requant(int(zp.reshape(())), int(clip.args[1].value),
                           int(clip.args[2].value), str(cast.attrs.dtype)), chain[-1])
        if lut and m.requant.out_dtype == "int16":  # (a requantized chain here)
            _lookup_table(m, next_of, value)
            _integer_gate(m, users, value)
        if lut and _op(call, "relax.nn.conv2d") and isinstance(call.args[0], relax.Var):
            producer = value.get(call.args[0])
            pad = _spatial_pad(producer) if producer is not None else None
            if pad is not None:
                m.pad = (*pad, producer.args[0])
        matches[m.out_var] = m
    return matches


@relax.expr_functor.mutator
class _Dispatcher(relax.PyExprMutator):
    def __init__(self, mod, matches, isa: str, amx_backend: str = "amx"):
        super().__init__(mod)
        # an AMX CPU runs what AMX does not take on its AVX-512 VNNI kernels
        self.amx = amx_backend if isa == "amx" else None
        self.matches, self.isa = matches, "avx512_vnni" if isa == "amx" else isa
        if self.isa == "avx2":
            for m in matches.values():
                _use_high_word(m)
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.count = 0

    def _kernel(self, key, build):
        if key not in self.kernels:
            name = f"tvmquant_x86_int8_{len(self.kernels)}"
            self.kernels[key] = self.builder_.add_func(kernel_for_relax(build(), name), name)
        return self.kernels[key]

    def _conv(self, m: _Match):
        attrs = m.anchor.attrs
        if int(attrs.groups) > 1 and int(attrs.groups) == m.weight.shape[0] and \
                m.weight.shape[1] == 1:
            return self._depthwise(m)
        if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or \
                any(int(d) != 1 for d in attrs.dilation):
            return None
        sh, sw = (int(s) for s in attrs.strides)
        if sh != sw:
            return None
        # the kernel pads while it re-lays out its input: the conv's own (zero) padding, or
        # the zero point padding that LowerToIntegerOnly spells as an nn.pad before it
        pad, pad_value = tuple(int(p) for p in attrs.padding), 0
        if m.pad is not None and not any(pad):
            pad, pad_value, unpadded = m.pad
            data = self.visit_expr(unpadded)
        else:
            data = self.visit_expr(m.data)
        if int(attrs.groups) != 1:
            return self._grouped(m, data, pad, pad_value)
        return self._regular_conv(m, data, pad, pad_value)

    def _grouped(self, m: _Match, data, pad, pad_value):
        """A grouped convolution (``groups`` > 1, not depthwise): one call of the regular
        conv kernel per group, on the group's channels, joined by a concat. The groups share
        one kernel (same shape; their weights, bias and requantization are arguments)."""
        groups = int(m.anchor.attrs.groups)
        n, c, _, _ = static_shape(data)
        o = m.weight.shape[0]
        if c % groups or o % groups:
            return None
        cg, og = c // groups, o // groups
        if groups > FEW_GROUPS and (cg < GROUP_CHANNELS or groups > MAX_GROUPS):
            return None
        bb, outs = self.builder_, []
        out_ty = relax.TensorType((n, og, *static_shape(m.out_var)[2:]), _result_dtype(m))
        for g in range(groups):
            part = bb.emit(relax.op.strided_slice(data, [1], [g * cg], [(g + 1) * cg]))
            sub = _Match(m.anchor, None, m.weight[g * og:(g + 1) * og], None, None, None,
                         m.requant, None)
            gv, (x, packed) = self._regular_conv(sub, part, pad, pad_value)
            cut = slice(g * og, (g + 1) * og)
            args = [x, relax.const(packed, str(packed.dtype)), relax.const(m.bias[cut], "int32")]
            if m.requant is not None:
                args += [relax.const(m.m0[cut], "int32"), relax.const(m.shift[cut], "int32")]
            if m.lut is not None:
                args.append(relax.const(m.lut))
            outs.append(bb.emit(relax.call_tir(gv, args, out_ty)))
        return relax.op.concat(outs, axis=1)

    def _regular_conv(self, m: _Match, data, pad, pad_value, stride: int | None = None):
        """A ``groups == 1`` conv on ``data`` (already visited): its kernel and packed
        weight (``stride``: the anchor's by default)."""
        sh = stride if stride is not None else int(m.anchor.attrs.strides[0])
        n, c, h, w = static_shape(data)
        o, _, kh, kw = m.weight.shape
        _, ow = conv_output_size(h + pad[0] + pad[2], w + pad[1] + pad[3], kh, kw, sh)
        if sh == 1 and self.amx is not None and prefer_amx(c, o, ow, kh, kw):
            mb, nb = amx_tiles(ow, o)
            key = ("conv-amx", n, c, h, w, o, kh, kw, m.requant, pad, pad_value, self.amx)
            gv = self._kernel(key, lambda: int8_conv2d_amx(
                n, c, h, w, o, kh, kw, bias=True, requant=m.requant, mb=mb, nb=nb, pad=pad,
                pad_value=pad_value, backend=self.amx))
            return gv, [data, pack_conv_weight_amx(m.weight, nb)]
        if sh == 1 and not _has_table(m) and prefer_pixels(ow, o):
            key = ("conv-pixels", n, c, h, w, o, kh, kw, m.requant, pad, pad_value)
            gv = self._kernel(key, lambda: int8_conv2d_pixels(
                n, c, h, w, o, kh, kw, bias=True, requant=m.requant, pad=pad,
                pad_value=pad_value, isa=self.isa))
            return gv, [data, pack_conv_weight_pixels(m.weight, self.isa)]
        key = ("conv", n, c, h, w, o, kh, kw, sh, m.requant, pad, pad_value)
        gv = self._kernel(key, lambda: int8_conv2d(n, c, h, w, o, kh, kw, sh, bias=True,
                                                   requant=m.requant, pad=pad,
                                                   pad_value=pad_value, isa=self.isa))
        return gv, [data, pack_conv_weight(m.weight, self.isa)]

    def _depthwise(self, m: _Match):
        """A depthwise conv (one filter per channel) on :mod:`.int8_depthwise_conv2d`; its
        padding (and the few rows and columns more that the kernel reads) is one ``nn.pad``
        before it."""
        attrs = m.anchor.attrs
        if str(attrs.data_layout) != "NCHW" or \
                str(attrs.kernel_layout) != "OIHW" or any(int(d) != 1 for d in attrs.dilation):
            return None
        sh, sw = (int(s) for s in attrs.strides)
        if sw > (2 if self.isa == "avx2" else 3):
            return None
        pad, pad_value, data = tuple(int(p) for p in attrs.padding), 0, m.data
        if m.pad is not None and not any(pad):
            pad, pad_value, data = m.pad
        data = self.visit_expr(data)
        n, c, h, w = static_shape(data)
        kh, kw = m.weight.shape[2:]
        top, left, bottom, right = pad
        oh, ow = depthwise_output_size(h, w, kh, kw, sh, sw, pad)
        hp, wp = h + top + bottom, w + left + right
        hk, wk = depthwise_input_size(oh, ow, kh, kw, sh, sw, (hp, wp))
        padded = self.builder_.emit(relax.op.nn.pad(
            data, [0, 0, 0, 0, top, bottom + hk - hp, left, right + wk - wp],
            pad_value=float(pad_value)))
        key = ("depthwise", n, c, oh, ow, kh, kw, sh, sw, m.requant, (hp, wp))
        gv = self._kernel(key, lambda: int8_depthwise_conv2d(
            n, c, oh, ow, kh, kw, (sh, sw), bias=True, requant=m.requant,
            input_at_least=(hp, wp), isa=self.isa))
        return gv, [padded, pack_depthwise_weight(m.weight, self.isa)]

    def _conv_transpose(self, m: _Match):
        """Stride == kernel, no padding: a 1x1 conv to ``O * kh * kw`` channels +
        depth-to-space.

        Each input pixel writes its own ``kh x kw`` block of outputs, so the whole operator is
        one 1x1 convolution on the conv kernels (requantized per output channel, repeated
        over the block) followed by a movement of uint8/int8 values. (It was a matmul over
        the input transposed to ``[H*W, C]``: the 1x1 conv reads ``NCHW`` as it is and its
        few output channels go on the pixel-lane kernel; det 320 -2.9%, det 640 -2.5%.)
        """
        attrs = m.anchor.attrs
        c_in, o, kh, kw = m.weight.shape
        if int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW" or \
                str(attrs.kernel_layout) != "IOHW" or str(attrs.out_layout) != "NCHW" or \
                [int(s) for s in attrs.strides] != [kh, kw] or \
                any(int(p) for p in attrs.padding) or any(int(p) for p in attrs.output_padding) \
                or any(int(d) != 1 for d in attrs.dilation):
            return None
        data = self.visit_expr(m.data)
        n, _, h, w = static_shape(data)
        bb = self.builder_
        rep = kh * kw
        # output channels in (o, kh, kw) order: the 1x1 conv writes NCHW planes, the
        # depth-to-space below interleaves them
        w1 = m.weight.transpose(1, 2, 3, 0).reshape(o * rep, c_in, 1, 1)
        sub = _Match(m.anchor, None, w1, None, None, None, m.requant, None)
        gv, (x, packed) = self._regular_conv(sub, data, (0, 0, 0, 0), 0, stride=1)
        args = [x, relax.const(packed, str(packed.dtype)),
                relax.const(np.repeat(m.bias, rep), "int32")]
        if m.requant is not None:
            args += [relax.const(np.repeat(m.m0, rep), "int32"),
                     relax.const(np.repeat(m.shift, rep), "int32")]
        if m.lut is not None:
            args.append(relax.const(m.lut))
        out = bb.emit(relax.call_tir(gv, args, relax.TensorType((n, o * rep, h, w),
                                                                _result_dtype(m))))
        blocks = relax.op.reshape(out, (n, o, kh, kw, h, w))
        return relax.op.reshape(relax.op.permute_dims(blocks, [0, 1, 4, 2, 5, 3]),
                                (n, o, h * kh, w * kw))

    def _dense(self, m: _Match):
        data = self.visit_expr(m.data)
        shape = static_shape(data)
        if shape is None or len(shape) != 2 or m.weight.ndim != 2:
            return None
        (mm, k), n = shape, m.weight.shape[1]
        gv, packed = self._matmul(mm, n, k, m.requant, m.weight)
        return gv, [data, packed]

    def _matmul(self, mm: int, n: int, k: int, requant: Requant | None, weight_kn):
        """The kernel (and packed weight) of an ``mm x n x k`` matmul with a ``[K, N]``
        weight: on AMX where it fills the tiles well enough, else the VNNI (AVX2) one."""
        if self.amx is not None and prefer_amx_dense(mm, n, k):
            _, nb = amx_dense_tiles(mm, n)
            key = ("dense-amx", mm, n, k, requant, self.amx)
            gv = self._kernel(key, lambda: int8_dense_amx(mm, n, k, bias=True,
                                                          requant=requant, backend=self.amx))
            return gv, pack_weight_amx(weight_kn, "KN", nb)
        key = ("dense", mm, n, k, requant)
        gv = self._kernel(key, lambda: int8_dense(mm, n, k, bias=True, requant=requant,
                                                  isa=self.isa))
        return gv, pack_weight(weight_kn, "KN", self.isa)

    def visit_var_binding_(self, binding):
        m = self.matches.get(binding.var)
        if m is not None and _op(m.anchor, "relax.nn.conv2d_transpose"):
            out = self._conv_transpose(m)
            if out is not None:
                self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, out))
                self.count += 1
                return
        elif m is not None:
            picked = self._conv(m) if _op(m.anchor, "relax.nn.conv2d") else self._dense(m)
            if isinstance(picked, relax.Expr):  # a grouped conv: its calls and their concat
                self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, picked))
                self.count += 1
                return
            if picked is not None:
                gv, (data, packed) = picked
                args = [data, relax.const(packed, str(packed.dtype)), relax.const(m.bias, "int32")]
                if m.requant is not None:
                    args += [relax.const(m.m0, "int32"), relax.const(m.shift, "int32")]
                if m.lut is not None:
                    args.append(relax.const(m.lut))
                out_ty = relax.TensorType(static_shape(binding.var), _result_dtype(m))
                call = relax.call_tir(gv, args, out_ty)
                self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, call))
                self.count += 1
                return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="tvmquant.DispatchX86Int8")
class DispatchX86Int8:
    """Replace matching integer conv2d/matmul + requantization chains by tvmquant's kernels.

    ``isa``: ``"avx512_vnni"`` (the default), ``"amx"`` or ``"avx2"`` (build the result for
    a target with that instruction set; :func:`target_isa` names a target's).
    ``amx_backend="emulate"`` builds the AMX kernels on :mod:`.amx_emulator` instead of the
    AMX instructions (a check of an AMX build on any CPU; slow).
    """

    def __init__(self, func_name: str = "main", isa: str = "avx512_vnni",
                 amx_backend: str = "amx"):
        if isa not in ("avx512_vnni", "amx", "avx2"):
            raise ValueError(f"isa must be 'avx512_vnni', 'amx' or 'avx2', got {isa!r}")
        if amx_backend not in ("amx", "emulate"):
            raise ValueError(f"amx_backend must be 'amx' or 'emulate', got {amx_backend!r}")
        self.func_name, self.isa, self.amx_backend = func_name, isa, amx_backend

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        matches = _match_chains(func, lut=True)
        if not matches:
            return mod
        dispatcher = _Dispatcher(mod, matches, self.isa, self.amx_backend)
        new_func = dispatcher.visit_expr(func)
        new_mod = dispatcher.builder_.get()
        new_mod[self.func_name] = new_func
        return relax.transform.DeadCodeElimination()(new_mod)
