"""DispatchSubByte: few-bit matmuls onto the bit-serial and sub-byte GEMV kernels.

A small network mixing 8-, 4-, 2- and 1-bit layers runs end to end, bit-exact with the same
integer module on TVM's default kernels; the packed weights make the compiled file smaller.
"""

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmquant.schedules.pipeline import build_pipeline
from tvmquant.schedules.x86.bitserial_dense import (
    bitpack,
    bitpack_conv_nhwc_kernel,
    bitpack_im2col_kernel,
    bitpack_kernel,
    bitserial_dense,
    conv_output_size,
    pack_conv_weight_nhwc,
    padded_words,
)
from tvmquant.schedules.x86.dispatch_subbyte import (
    DispatchSubByte,
    padding_correction,
    sign_mode,
    sign_planes,
    signed_bits,
)

import tvmquant
from tvmquant.config import LayerOverride, get_preset
from tvmquant.spec import QuantSpec
from tvmquant.testing import mlp

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
#: The bit-serial kernels alone: built for any AVX2 CPU (``popcnt``, ``vpmovmskb``).
BITSERIAL_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _need_avx2():
    if not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2 (avx2 not in /proc/cpuinfo): the bit-serial kernels "
                    "here are built for AVX2 CPUs (popcnt, vpmovmskb)")


def _need_vnni():
    if not _cpu_has("avx512_vnni"):
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo): the "
                    "sub-byte GEMV kernels cannot run here")


def _mixed_config():
    """matmul_0 and matmul_3 int8; matmul_1 int4 weights writing 1-bit activations;
    matmul_2 ternary (2-bit restricted range) weights reading them."""
    base = get_preset("int8")
    return base.with_overrides(
        LayerOverride("matmul_1", weight=base.weight.with_(bits=4),
                      activation=QuantSpec(bits=1, signed=False, symmetric=True)),
        LayerOverride("matmul_2", weight=base.weight.with_(bits=2)),
    )


@pytest.fixture(scope="module")
def mixed():
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(0, 1, (1, 64)).astype("float32")} for _ in range(8)]
    return tvmquant.quantize(mlp(), calib, _mixed_config(), progress=False)


def test_signed_bits():
    assert signed_bits(np.array([0, 1])) == 1
    assert signed_bits(np.array([-1, 0, 1])) == 2
    assert signed_bits(np.array([-4, 3])) == 3
    assert signed_bits(np.array([-8, 7])) == 4
    assert signed_bits(np.array([-127, 127])) == 8


def test_mixed_network_picks_a_kernel_per_layer(mixed):
    assert mixed.report["lowering_fallbacks"] == []
    after = DispatchSubByte()(mixed.mod)
    relax.analysis.well_formed(after)
    assert list(after["main"].attrs["tvmquant.subbyte_kernels"]) == ["gemv w4 +requant",
                                                                    "bitserial a1w2"]
    text = after["main"].script()
    assert text.count("R.matmul") == 2  # the two int8 layers (VNNI dispatch takes them later)
    # without VNNI only the bit-serial layer is taken
    no_vnni = DispatchSubByte(gemv=False)(mixed.mod)
    assert list(no_vnni["main"].attrs["tvmquant.subbyte_kernels"]) == ["bitserial a1w2"]


def test_bitserial_structure():
    """Before/Expected: one few-bit matmul becomes bitpack + popcount dense."""
    rng = np.random.default_rng(1)
    w = rng.integers(-1, 2, (70, 5)).astype("int8")

    def function(body):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((2, 70), "uint8"))
        with bb.function("main", [x]):
            with bb.dataflow():
                a = bb.emit(relax.op.clip(x, 0, 3))
                out = bb.emit_output(body(bb, a))
            bb.emit_func_output(out)
        return bb

    before = function(lambda bb, a: relax.op.matmul(a, relax.const(w, "int8"),
                                                    out_dtype="int32")).get()

    def expected_body(bb, a):
        def add(mod, name):
            f = mod["main"].with_attrs({"global_symbol": name, "op_pattern": 8,
                                        "tirx.is_scheduled": True})
            return bb.add_func(f, name)

        pack = add(bitpack_kernel(2, 70, 2), "tvmquant_x86_bitpack_0")
        dense = add(bitserial_dense(2, 5, 70, mode="unipolar", abits=2, wbits=2),
                    "tvmquant_x86_bitserial_1")
        flat = bb.emit(relax.op.reshape(a, (2, 70)))
        planes = bb.emit(relax.call_tir(pack, [flat], relax.TensorType((2, 2, 2), "uint64")))
        out = bb.emit(relax.call_tir(dense, [planes, relax.const(bitpack(w.T, 2), "uint64")],
                                     relax.TensorType((2, 5), "int32")))
        return relax.op.reshape(out, (2, 5))

    bb = function(expected_body)
    expected = bb.get()
    expected["main"] = expected["main"].with_attr("tvmquant.subbyte_kernels",
                                                  ["bitserial a2w2"])
    tvm.ir.assert_structural_equal(DispatchSubByte()(before), expected)


def test_mixed_network_bit_exact_and_close_to_float(mixed):
    _need_vnni()
    fast = relax.VirtualMachine(tvmquant.build(mixed.mod, TARGET), tvm.cpu())
    plain = relax.VirtualMachine(tvmquant.build(mixed.mod, TARGET, kernels=False,
                                                schedules=False), tvm.cpu())
    fq = relax.VirtualMachine(tvm.compile(mixed.fake_quant_mod, TARGET), tvm.cpu())
    rng = np.random.default_rng()  # fresh inputs every run
    for _ in range(4):
        x = tvm.runtime.tensor(rng.normal(0, 1, (1, 64)).astype("float32"))
        got, ref = fast["main"](x).numpy(), plain["main"](x).numpy()
        np.testing.assert_array_equal(got, ref)
        sim = fq["main"](x).numpy()  # the integer graph computes what was simulated
        assert np.abs(got - sim).max() <= 2 * np.abs(sim).max() / 127 + 1e-6


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_weights_shrink_the_compiled_file(tmp_path, bits):
    """One 1024x1024 matmul: the exported library holds K*N*bits/8 weight bytes, not K*N."""
    _need_vnni()
    rng = np.random.default_rng(2)
    calib = [{"x": rng.normal(0, 1, (1, 1024)).astype("float32")} for _ in range(2)]
    model = mlp((1024, 1024), seed=3)
    base = get_preset("int8")
    sizes = {}
    for b in (8, bits):
        q = tvmquant.quantize(model, calib, base.with_overrides(
            LayerOverride("*", weight=base.weight.with_(bits=b))), progress=False)
        path = tmp_path / f"w{b}.so"
        tvmquant.build(q.mod, TARGET).export_library(str(path))
        sizes[b] = path.stat().st_size
    saved = sizes[8] - sizes[bits]
    expected = 1024 * 1024 * (8 - bits) // 8
    assert 0.97 * expected <= saved <= 1.03 * expected, (sizes, expected)


@pytest.mark.parametrize("packing", ["nhwc-avx2", "im2col"])
def test_bitserial_conv_in_a_convnet(packing):
    """conv2d_0 writes 2-bit activations, conv2d_1 reads them with ternary weights: a
    bit-serial convolution (packing + popcount dense), bit-exact end to end."""
    from tvmquant.testing import random_inputs, small_convnet

    base = get_preset("int8")
    config = base.with_overrides(
        LayerOverride("conv2d_0", activation=QuantSpec(bits=2, signed=False, symmetric=True)),
        LayerOverride("conv2d_1", weight=base.weight.with_(bits=2)),
    )
    q = tvmquant.quantize(small_convnet(), random_inputs(4), config, progress=False)
    after = DispatchSubByte()(q.mod)
    relax.analysis.well_formed(after)
    assert list(after["main"].attrs["tvmquant.subbyte_kernels"]) == ["bitserial conv a2w2"]
    target = _packing_target(packing)
    lowered = build_pipeline(tvmquant.resolve_target(target))(q.mod)
    kernels = [gv.name_hint for gv in lowered.functions]
    assert any(("bitpack_nhwc" if packing == "nhwc-avx2" else "bitpack_im2col") in k
               for k in kernels), kernels
    _assert_same_as_plain_build(q, target)


def _packing_target(packing: str):
    """The target that makes the dispatch pick this packing (skips without AVX2)."""
    if packing == "nhwc-avx2":
        if not _cpu_has("avx2"):
            pytest.skip("this CPU has no AVX2 (avx2 not in /proc/cpuinfo)")
        return "x86-avx2"
    return {"kind": "llvm", "mcpu": "generic"}  # no AVX2: the portable packing


def _assert_same_as_plain_build(q, target):
    """The model on ``target``'s kernels equals TVM's default kernels, fresh inputs."""
    from tvmquant.testing import random_inputs

    fast = relax.VirtualMachine(tvmquant.build(q.mod, target), tvm.cpu())
    plain = relax.VirtualMachine(tvmquant.build(q.mod, "llvm", kernels=False,
                                                schedules=False), tvm.cpu())
    for x in random_inputs(3, seed=np.random.default_rng().integers(1 << 30)):
        x = tvm.runtime.tensor(x["x"])
        # integer-exact; only the output's float rescale may round differently (1 ulp)
        np.testing.assert_allclose(fast["main"](x).numpy(), plain["main"](x).numpy(),
                                   rtol=1e-6, atol=0)


def _conv_reference(a, wt, s, pad):
    """Direct NumPy convolution of NCHW ``a`` by OIHW ``wt`` with zero padding, int64."""
    n, _, h, w = a.shape
    o, _, kh, kw = wt.shape
    ho, wo = conv_output_size(h, w, kh, kw, s, pad)
    ap = np.pad(a.astype(np.int64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    ref = np.zeros((n, o, ho, wo), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = ap[:, :, i:i + s * ho:s, j:j + s * wo:s]
            ref += np.einsum("nchw,oc->nohw", patch, wt[:, :, i, j].astype(np.int64))
    return ref


def _nhwc_channels_padded(a):
    """NCHW codes as NHWC with channels zero-padded to 64: (data, padded channels)."""
    n, c, h, w = a.shape
    cp = -(-c // 64) * 64
    data = np.zeros((n, h, w, cp), a.dtype)
    data[..., :c] = a.transpose(0, 2, 3, 1)
    return data, cp


@pytest.mark.parametrize("packing", ["nhwc-avx2", "im2col"])
@pytest.mark.parametrize("shape", [(1, 5, 7, 9, 6, 3, 3, 1, (1, 1, 1, 1), 2, 2),
                                   (2, 70, 8, 8, 4, 3, 3, 2, (1, 0, 1, 0), 1, 2),
                                   (1, 64, 14, 14, 32, 1, 1, 1, (0, 0, 0, 0), 3, 3)])
def test_bitserial_conv_exact(shape, packing):
    """Packing (NHWC with vpmovmskb, or portable im2col) + popcount dense against a direct
    NumPy convolution, fresh inputs."""
    n, c, h, w, o, kh, kw, s, pad, ab, wb = shape
    rng = np.random.default_rng()
    a = rng.integers(0, 1 << ab, (n, c, h, w)).astype(np.uint8)
    wt = rng.integers(-(1 << (wb - 1)), 1 << (wb - 1), (o, c, kh, kw)).astype(np.int8)
    ho, wo = conv_output_size(h, w, kh, kw, s, pad)
    _need_avx2()
    if packing == "nhwc-avx2":
        data, cp = _nhwc_channels_padded(a)
        k = kh * kw * cp
        pack = tvm.compile(bitpack_conv_nhwc_kernel(n, h, w, cp, kh, kw, s, pad, ab),
                           BITSERIAL_TARGET)
        wplanes = pack_conv_weight_nhwc(wt, wb)
    else:
        data, k = a, c * kh * kw
        pack = tvm.compile(bitpack_im2col_kernel(n, c, h, w, kh, kw, s, pad, ab), BITSERIAL_TARGET)
        wplanes = bitpack(wt.reshape(o, k), wb)
    planes = tvm.runtime.tensor(np.zeros((ab, n * ho * wo, padded_words(k)), np.uint64))
    pack.mod["main"](tvm.runtime.tensor(data), planes)
    dense = tvm.compile(bitserial_dense(n * ho * wo, o, k, abits=ab, wbits=wb), BITSERIAL_TARGET)
    out = tvm.runtime.tensor(np.zeros((n * ho * wo, o), np.int32))
    dense.mod["main"](planes, tvm.runtime.tensor(wplanes), out)
    np.testing.assert_array_equal(out.numpy().reshape(n, ho, wo, o).transpose(0, 3, 1, 2),
                                  _conv_reference(a, wt, s, pad))


def _binary_config():
    """conv2d_0 and matmul_2 stay int8; conv2d_1 and matmul_0 write binary activations;
    conv2d_2 (binary weights, BatchNorm folded) reads and writes them; conv2d_3 has ternary
    (TWN) weights and matmul_1 binary weights."""
    binary = QuantSpec.binary()
    binary_w = QuantSpec.binary(granularity="per_channel")
    return get_preset("int8").with_overrides(
        LayerOverride("conv2d_1", activation=binary),
        LayerOverride("conv2d_2", weight=binary_w, activation=binary),
        LayerOverride("conv2d_3", weight=QuantSpec.ternary()),
        LayerOverride("matmul_0", activation=binary),
        LayerOverride("matmul_1", weight=binary_w),
    )


@pytest.mark.parametrize("packing", ["nhwc-avx2", "im2col"])
def test_binary_network_runs_xnor_and_ternary_kernels(packing):
    """XNOR-Net layers end to end: integer-only, the xnor / ternary popcount kernels picked
    per layer, bit-exact with the same integer module on TVM's default kernels."""
    from tvmquant.testing import binary_convnet, random_inputs

    q = tvmquant.quantize(binary_convnet(), random_inputs(4), _binary_config(), progress=False)
    assert list(q.mod["main"].attrs["tvmquant.float_fallbacks"]) == []
    after = DispatchSubByte(avx2=packing == "nhwc-avx2")(q.mod)
    relax.analysis.well_formed(after)
    assert list(after["main"].attrs["tvmquant.subbyte_kernels"]) == \
        ["xnor conv", "ternary conv", "xnor dense"]
    _assert_same_as_plain_build(q, _packing_target(packing))


@pytest.mark.parametrize("packing", ["nhwc-avx2", "im2col"])
@pytest.mark.parametrize("mode", ["xnor", "ternary"])
@pytest.mark.parametrize("shape", [(1, 5, 7, 9, 6, 3, 3, 1, (1, 1, 1, 1)),
                                   (2, 70, 8, 8, 4, 3, 3, 2, (1, 0, 1, 0)),
                                   (1, 64, 6, 6, 32, 1, 1, 1, (0, 0, 0, 0))])
def test_sign_conv_exact(shape, mode, packing):
    """Binary -1/+1 codes (int8, sign bit packed) against binary or ternary weights, plus the
    padding correction: equal to a NumPy convolution with zero padding, fresh inputs."""
    n, c, h, w, o, kh, kw, s, pad = shape
    rng = np.random.default_rng()
    a = np.where(rng.random((n, c, h, w)) < 0.5, -1, 1).astype(np.int8)
    wt = rng.integers(-1, 2, (o, c, kh, kw)) if mode == "ternary" else \
        np.where(rng.random((o, c, kh, kw)) < 0.5, -1, 1)
    wt = wt.astype(np.int8)
    assert sign_mode(wt) == mode
    ho, wo = conv_output_size(h, w, kh, kw, s, pad)
    correction = padding_correction(wt, h, w, s, pad)
    _need_avx2()
    if packing == "nhwc-avx2":
        data, cp = _nhwc_channels_padded(a)
        k = kh * kw * cp
        pack = tvm.compile(bitpack_conv_nhwc_kernel(n, h, w, cp, kh, kw, s, pad, 1, "int8", 7),
                           BITSERIAL_TARGET)
        wplanes = sign_planes(wt, mode, pack_conv_weight_nhwc)
        if mode == "xnor":
            correction = correction - (cp - c) * kh * kw
    else:
        data, k = a, c * kh * kw
        pack = tvm.compile(bitpack_im2col_kernel(n, c, h, w, kh, kw, s, pad, 1, "int8", 7),
                           BITSERIAL_TARGET)
        wplanes = sign_planes(wt.reshape(o, k), mode)
    planes = tvm.runtime.tensor(np.zeros((1, n * ho * wo, padded_words(k)), np.uint64))
    pack.mod["main"](tvm.runtime.tensor(data), planes)
    dense = tvm.compile(bitserial_dense(n * ho * wo, o, k, mode=mode), BITSERIAL_TARGET)
    out = tvm.runtime.tensor(np.zeros((n * ho * wo, o), np.int32))
    dense.mod["main"](planes, tvm.runtime.tensor(wplanes), out)
    got = out.numpy().reshape(n, ho, wo, o) + correction[None]
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), _conv_reference(a, wt, s, pad))


@pytest.mark.parametrize("mode", ["xnor", "ternary"])
def test_sign_dense_exact(mode):
    """The run-time sign packing of int8 -1/+1 rows and the popcount dense, against NumPy."""
    rng = np.random.default_rng()
    m, n, k = 3, 17, 700
    _need_avx2()
    a = np.where(rng.random((m, k)) < 0.5, -1, 1).astype(np.int8)
    wt = rng.integers(-1, 2, (n, k)) if mode == "ternary" else \
        np.where(rng.random((n, k)) < 0.5, -1, 1)
    pack = tvm.compile(bitpack_kernel(m, k, 1, "int8", 7), BITSERIAL_TARGET)
    planes = tvm.runtime.tensor(np.zeros((1, m, padded_words(k)), np.uint64))
    pack.mod["main"](tvm.runtime.tensor(a), planes)
    dense = tvm.compile(bitserial_dense(m, n, k, mode=mode), BITSERIAL_TARGET)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    dense.mod["main"](planes, tvm.runtime.tensor(sign_planes(wt, mode)), out)
    np.testing.assert_array_equal(out.numpy(), a.astype(np.int64) @ wt.T)


def test_packing_rejects_bits_outside_the_byte():
    with pytest.raises(ValueError, match=r"bits 7\.\.8"):
        bitpack_kernel(4, 64, 2, "int8", 7)


def test_binary_network_cross_compiles_for_arm_neon():
    """Structure only (no run): on AArch64 the binary layers take the portable packing and
    the popcount is NEON's ``cnt``."""
    from tvmquant.testing import binary_convnet, random_inputs

    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    q = tvmquant.quantize(binary_convnet(), random_inputs(4), _binary_config(), progress=False)
    lowered = build_pipeline(tvmquant.resolve_target(arm))(q.mod)
    kernels = [gv.name_hint for gv in lowered.functions]
    assert any("bitpack_im2col" in k for k in kernels), kernels
    assert not any("bitpack_nhwc" in k for k in kernels), kernels
    ex = tvmquant.build(q.mod, arm)
    asm = "".join(m.inspect_source("asm") for m in ex.mod.imports)
    assert "\tcnt\t" in asm


def test_few_pixel_1x1_convolutions_run_on_the_gemv():
    """A 1x1 convolution over 4 pixels with 4-bit (and 2-bit) weights is memory-bound: it
    runs on the packed GEMV (pixels as rows), bit-exact with TVM's default kernels."""
    _need_vnni()
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 256, 2, 2), "float32"))
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(
                rng.normal(0, 0.1, (128, 256, 1, 1)).astype("float32"))))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(
                rng.normal(0, 0.1, (1, 128, 1, 1)).astype("float32"))))))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(
                rng.normal(0, 0.1, (64, 128, 1, 1)).astype("float32"))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    base = get_preset("int8")
    config = base.with_overrides(LayerOverride("conv2d_0", weight=base.weight.with_(bits=4)),
                                 LayerOverride("conv2d_1", weight=base.weight.with_(bits=2)))
    samples = [{"x": rng.normal(0, 1, (1, 256, 2, 2)).astype("float32")} for _ in range(4)]
    q = tvmquant.quantize(bb.get(), samples, config, progress=False)
    after = DispatchSubByte()(q.mod)
    relax.analysis.well_formed(after)
    assert list(after["main"].attrs["tvmquant.subbyte_kernels"]) == \
        ["gemv conv1x1 w4 +requant", "gemv conv1x1 w2"]
    fast = relax.VirtualMachine(tvmquant.build(q.mod, TARGET), tvm.cpu())
    plain = relax.VirtualMachine(tvmquant.build(q.mod, "llvm", kernels=False,
                                                schedules=False), tvm.cpu())
    for _ in range(3):
        v = tvm.runtime.tensor(np.random.default_rng().normal(0, 1, (1, 256, 2, 2))
                               .astype("float32"))
        np.testing.assert_allclose(fast["main"](v).numpy(), plain["main"](v).numpy(),
                                   rtol=1e-6, atol=0)
