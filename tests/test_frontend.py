"""Tests of tvmquant.frontend: ONNX loading, Clip canonicalization and error messages.

The PP-OCR models (from rapidocr-onnxruntime) are imported, compiled for LLVM untuned and run
on the Relax VM against ONNX Runtime. Each takes a few seconds (import about 3 s, of which
FoldConstant about 2 s; compile 3 s), so none is marked slow.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from tvmquant.frontend import FrontendError, InputInfo, load_onnx, parse_input_shapes
from tvmquant.zoo import PPOCR_INPUT_SHAPES, ppocr_model_path

ort = pytest.importorskip("onnxruntime")

LLVM = tvm.target.Target({"kind": "llvm"})

PPOCR_OUTPUT_SHAPES = {"cls": (1, 2), "det": (1, 1, 320, 320), "rec": (1, 40, 6625)}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _ops_and_calls(mod: tvm.IRModule) -> tuple[list[str], list[str]]:
    """Names of the Relax ops called in main, and of the GlobalVars it calls (call_tir etc.)."""
    ops: list[str] = []
    callees: list[str] = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            if isinstance(expr.op, tvm.ir.Op):
                ops.append(expr.op.name)
            for arg in expr.args:
                if isinstance(arg, relax.GlobalVar):
                    callees.append(arg.name_hint)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return ops, callees


def _run_tvm(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=LLVM), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


def _run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _text_like(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A light page with dark dashed bars, normalized like PP-OCR ((x/255 - 0.5) / 0.5).

    Random noise is a poor probe for det: its probability map stays below 1e-4 everywhere,
    so a 1e-4 tolerance would compare nothing. This input lights up about 1% of the map.
    """
    rng = np.random.default_rng(seed)
    _, _, h, w = shape
    img = np.full((h, w), 235.0) + rng.normal(0, 8, (h, w))
    for _ in range(max(2, h // 24)):
        y0 = int(rng.integers(0, h - 12))
        x0 = int(rng.integers(0, w // 3))
        bar_h = int(rng.integers(6, 14))
        bar_w = int(rng.integers(w // 4, w - x0))
        for x in range(x0, x0 + bar_w, 6):
            img[y0:y0 + bar_h, x:x + 4] = 30 + rng.normal(0, 10)
    x = (np.clip(img, 0, 255) / 255.0 - 0.5) / 0.5
    return np.broadcast_to(x, shape).astype("float32").copy()


def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "test_graph", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


# --------------------------------------------------------------------------------------------
# parse_input_shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x:1,3,48,192", {"x": (1, 3, 48, 192)}),
        ("a:1,3;b:1,10", {"a": (1, 3), "b": (1, 10)}),
        ("a:1,3 b:1,10", {"a": (1, 3), "b": (1, 10)}),
        ("  a:1,3   b:1,10\n", {"a": (1, 3), "b": (1, 10)}),
        ("a: 1, 3; b: 1,10;", {"a": (1, 3), "b": (1, 10)}),
        ("input:0:1,224,224,3", {"input:0": (1, 224, 224, 3)}),  # TF-style name with ':'
        ("input.1:8", {"input.1": (8,)}),
        ("", {}),
    ],
)
def test_parse_input_shapes_good(text, expected):
    assert parse_input_shapes(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("x", "bad input shape 'x'"),
        (":1,2", "bad input shape ':1,2'"),
        ("x:", "bad dimensions ''"),
        ("x:1,,3", "bad dimensions '1,,3'"),
        ("x:1,a", "bad dimensions '1,a'"),
        ("x:1.5", "bad dimensions '1.5'"),
        ("x:-1,3", "bad dimensions '-1,3'"),
        ("x:1 3", "bad dimensions '1 3'"),
        ("a:1,3 b", "bad dimensions '1,3 b'"),
        ("x:0,3", "must be positive"),
        ("x:1,3;x:1,3", "input 'x' is given twice"),
    ],
)
def test_parse_input_shapes_bad(text, needle):
    with pytest.raises(FrontendError) as info:
        parse_input_shapes(text)
    message = str(info.value)
    assert needle in message
    if "bad" in needle:
        assert "name:d0,d1,..." in message  # the syntax is shown


def test_frontend_error_is_value_error():
    assert issubclass(FrontendError, ValueError)


# --------------------------------------------------------------------------------------------
# PP-OCR models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppocr_loaded():
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = load_onnx(ppocr_model_path(kind), PPOCR_INPUT_SHAPES[kind])
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["cls", "det", "rec"])
def test_ppocr_import(kind, ppocr_loaded):
    """Static shapes, embedded weights, Clip as R.clip, no generated maximum/minimum."""
    mod, params, inputs = ppocr_loaded(kind)
    assert params == {}
    assert inputs == [InputInfo("x", PPOCR_INPUT_SHAPES[kind]["x"], "float32")]

    main = mod["main"]
    assert len(main.params) == 1  # weights are constants, not parameters
    assert [int(d) for d in main.params[0].ty.shape] == list(PPOCR_INPUT_SHAPES[kind]["x"])
    assert [int(d) for d in main.ret_ty.shape] == list(PPOCR_OUTPUT_SHAPES[kind])

    ops, callees = _ops_and_calls(mod)
    assert "relax.clip" in ops
    assert "relax.call_tir" not in ops, callees
    assert not [c for c in callees if c.startswith(("maximum", "minimum"))]
    assert [gv.name_hint for gv in mod.functions] == ["main"]  # helper PrimFuncs eliminated
    # FoldConstant turned reshape(bias) into constants: no reshape of a constant is left.
    assert "R.reshape(metadata" not in main.script()


@pytest.mark.parametrize("kind", ["cls", "det", "rec"])
def test_ppocr_matches_onnxruntime(kind, ppocr_loaded):
    mod, _, inputs = ppocr_loaded(kind)
    x = _text_like(inputs[0].shape)
    got = _run_tvm(mod, x)
    want = _run_ort(str(ppocr_model_path(kind)), {"x": x})
    assert got.shape == want.shape == PPOCR_OUTPUT_SHAPES[kind]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if kind == "det":
        assert (want > 0.3).mean() > 0.001  # the probe input really lights up text
    if kind == "rec":
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_ppocr_model_path():
    for kind in ("cls", "det", "rec"):
        path = ppocr_model_path(kind)
        assert path.is_file() and path.suffix == ".onnx"
    with pytest.raises(ValueError, match="unknown PP-OCR model kind 'seg'"):
        ppocr_model_path("seg")


def test_model_proto_input_is_not_modified():
    model = onnx.load(str(ppocr_model_path("cls")))
    before = model.SerializeToString()
    mod, _, inputs = load_onnx(model, {"x": (1, 3, 48, 192)})
    assert model.SerializeToString() == before
    assert inputs[0].shape == (1, 3, 48, 192)
    assert "relax.clip" in _ops_and_calls(mod)[0]


# --------------------------------------------------------------------------------------------
# Clip canonicalization on small models
# --------------------------------------------------------------------------------------------


def _clip_model(lo, hi, dtype=TensorProto.FLOAT, opset=17):
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits, names = [], []
    for name, value in (("lo", lo), ("hi", hi)):
        if value is None:
            names.append("")
        else:
            inits.append(helper.make_tensor(name, dtype, [], [value]))
            names.append(name)
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("Clip", ["x", *names], ["y"])
    model = _model([node], [_vi("x", dtype, [2, 8])], [_vi("y", dtype, [2, 8])], inits,
                   opset=opset)
    return model, np_dtype


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.0, 6.0), (-1.5, None), (None, 0.25), (float("nan"), 1.0), (-1.0, float("nan"))],
)
def test_clip_constant_bounds_become_relax_clip(lo, hi):
    model, _ = _clip_model(lo, hi)
    mod, _, _ = load_onnx(model)
    ops, callees = _ops_and_calls(mod)
    assert ops == ["relax.clip"], (ops, callees)
    x = np.linspace(-10, 10, 16, dtype="float32").reshape(2, 8)
    np.testing.assert_array_equal(_run_tvm(mod, x), _run_ort(model, {"x": x}))


def test_clip_integer_input():
    model, _ = _clip_model(-3, 5, dtype=TensorProto.INT32)
    mod, _, inputs = load_onnx(model)
    assert inputs[0].dtype == "int32"
    assert _ops_and_calls(mod)[0] == ["relax.clip"]
    x = np.arange(-8, 8, dtype="int32").reshape(2, 8)
    np.testing.assert_array_equal(_run_tvm(mod, x), _run_ort(model, {"x": x}))


@pytest.mark.filterwarnings("ignore:Field .shape. of .type. is required")  # TVM re-runs the checker
def test_clip_opset6_attributes():
    node = helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=2.0)
    model = _model([node], [_vi("x", TensorProto.FLOAT, [2, 8])],
                   [_vi("y", TensorProto.FLOAT, [2, 8])], opset=6)
    mod, _, _ = load_onnx(model)
    assert _ops_and_calls(mod)[0] == ["relax.clip"]
    x = np.linspace(-3, 3, 16, dtype="float32").reshape(2, 8)
    np.testing.assert_array_equal(_run_tvm(mod, x), _run_ort(model, {"x": x}))


def test_clip_runtime_bound_falls_back_to_upstream():
    node = helper.make_node("Clip", ["x", "lo"], ["y"])
    model = _model([node], [_vi("x", TensorProto.FLOAT, [2, 8]), _vi("lo", TensorProto.FLOAT, [])],
                   [_vi("y", TensorProto.FLOAT, [2, 8])])
    mod, _, inputs = load_onnx(model)
    assert [i.name for i in inputs] == ["x", "lo"]
    ops, callees = _ops_and_calls(mod)
    assert "relax.clip" not in ops and any(c.startswith("maximum") for c in callees)
    x = np.linspace(-3, 3, 16, dtype="float32").reshape(2, 8)
    lo = np.array(0.5, dtype="float32")
    np.testing.assert_array_equal(_run_tvm(mod, x, lo), _run_ort(model, {"x": x, "lo": lo}))


def test_convert_map_is_restored():
    model, _ = _clip_model(0.0, 1.0)
    load_onnx(model)
    assert onnx_frontend._get_convert_map()["Clip"] is onnx_frontend.Clip
    with pytest.raises(FrontendError):
        load_onnx(_reshape_from_tensor_model())
    assert onnx_frontend._get_convert_map()["Clip"] is onnx_frontend.Clip


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(ppocr_model_path("cls").read_bytes()[:1000])
    with pytest.raises(FrontendError) as info:
        load_onnx(path, {"x": (1, 3, 48, 192)})
    message = str(info.value)
    assert str(path) in message and "not a valid ONNX model" in message
    assert "truncated" in message


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(FrontendError, match="not a valid ONNX model") as info:
        load_onnx(path)
    assert str(path) in str(info.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(FrontendError, match="not a valid ONNX model"):
        load_onnx(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(FrontendError, match="is empty"):
        load_onnx(path)


def test_parseable_bytes_without_graph(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"\x08\x07")  # a valid ModelProto (ir_version=7) with no graph
    with pytest.raises(FrontendError, match="not a valid ONNX model: it has no graph"):
        load_onnx(path)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(FrontendError, match="does not exist") as info:
        load_onnx(path)
    assert str(path) in str(info.value)


def test_directory_path(tmp_path):
    with pytest.raises(FrontendError, match="is not a file"):
        load_onnx(tmp_path)


def test_wrong_argument_type():
    with pytest.raises(FrontendError, match=r"path to an \.onnx file or an onnx\.ModelProto"):
        load_onnx(12345)


def test_wrong_input_name():
    with pytest.raises(FrontendError) as info:
        load_onnx(ppocr_model_path("cls"), {"image": (1, 3, 48, 192)})
    message = str(info.value)
    assert "no input named 'image'" in message
    assert "its inputs are: 'x'" in message


def test_missing_shape_for_dynamic_input():
    with pytest.raises(FrontendError) as info:
        load_onnx(ppocr_model_path("cls"))
    message = str(info.value)
    assert "input 'x' has dynamic dimensions [?, 3, ?, ?]" in message
    assert "--input-shapes x:d0,3,d2,d3" in message
    assert "name:d0,d1,..." in message


def test_symbolic_dims_are_named():
    node = helper.make_node("Relu", ["a"], ["y"])
    model = _model([node], [_vi("a", TensorProto.FLOAT, ["batch", 16])],
                   [_vi("y", TensorProto.FLOAT, ["batch", 16])])
    with pytest.raises(FrontendError, match=r"input 'a' has dynamic dimensions \[batch, 16\]"):
        load_onnx(model)
    mod, _, inputs = load_onnx(model, parse_input_shapes("a:4,16"))
    assert inputs == [InputInfo("a", (4, 16), "float32")]
    assert [int(d) for d in mod["main"].ret_ty.shape] == [4, 16]


@pytest.mark.filterwarnings("ignore:Renaming name input.1")
def test_several_inputs_keep_onnx_names_and_order():
    node = helper.make_node("Mul", ["input.1", "scale"], ["y"])
    model = _model([node], [_vi("input.1", TensorProto.FLOAT, ["n", 4]),
                            _vi("scale", TensorProto.FLOAT, [])],
                   [_vi("y", TensorProto.FLOAT, ["n", 4])])
    mod, _, inputs = load_onnx(model, parse_input_shapes("input.1:2,4"))
    assert inputs == [InputInfo("input.1", (2, 4), "float32"), InputInfo("scale", (), "float32")]
    assert [p.name for p in mod["main"].params] == ["input_1", "scale"]  # TVM sanitizes
    a = np.arange(8, dtype="float32").reshape(2, 4)
    b = np.array(0.5, dtype="float32")
    np.testing.assert_array_equal(_run_tvm(mod, a, b), a * b)


def test_shape_rank_mismatch():
    with pytest.raises(FrontendError, match=r"input 'x' has rank 4 .* has rank 3"):
        load_onnx(ppocr_model_path("cls"), {"x": (1, 3, 48)})


def test_shape_conflicts_with_fixed_dim():
    with pytest.raises(FrontendError, match="dimension 1 fixed to 3"):
        load_onnx(ppocr_model_path("cls"), {"x": (1, 4, 48, 192)})


def test_unsupported_custom_domain_op():
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("FrobnicateTensor", ["h"], ["y"], domain="com.example"),
    ]
    model = _model(nodes, [_vi("x", TensorProto.FLOAT, [1, 4])],
                   [_vi("y", TensorProto.FLOAT, [1, 4])],
                   extra_opsets=[helper.make_opsetid("com.example", 1)])
    with pytest.raises(FrontendError) as info:
        load_onnx(model)
    message = str(info.value)
    assert "not support" in message and "com.example::FrobnicateTensor (1 node)" in message


def test_unsupported_standard_ops_are_all_listed():
    # Celu and LpNormalization are standard ONNX ops that TVM 0.27's importer lacks.
    nodes = [
        helper.make_node("Celu", ["x"], ["h"], alpha=1.0),
        helper.make_node("LpNormalization", ["h"], ["g"], axis=-1, p=2),
        helper.make_node("Celu", ["g"], ["y"], alpha=1.0),
    ]
    model = _model(nodes, [_vi("x", TensorProto.FLOAT, [1, 4])],
                   [_vi("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(FrontendError) as info:
        load_onnx(model)
    message = str(info.value)
    assert "Celu (2 nodes)" in message and "LpNormalization (1 node)" in message


def _reshape_from_tensor_model():
    """Reshape whose target shape is a run-time tensor: TVM's Reshape converter refuses it."""
    node = helper.make_node("Reshape", ["x", "s"], ["y"])
    return _model([node], [_vi("x", TensorProto.FLOAT, [2, 3]), _vi("s", TensorProto.INT64, [2])],
                  [_vi("y", TensorProto.FLOAT, [3, 2])])


def test_converter_failure_names_the_op(capsys):
    with pytest.raises(FrontendError) as info:
        load_onnx(_reshape_from_tensor_model())
    message = str(info.value)
    assert "TVM's ONNX importer failed while converting a 'Reshape' node" in message
    assert "Reshape requires the input new shape to be Shape" in message
    assert "Error converting operator" not in capsys.readouterr().out  # importer's print caught


def test_checker_failure_on_model_proto():
    model = _model([helper.make_node("Relu", ["x"], ["y"])],
                   [_vi("x", TensorProto.FLOAT, [1, 4])], [_vi("y", TensorProto.FLOAT, [1, 4])])
    model.graph.node[0].input[0] = "does_not_exist"
    with pytest.raises(FrontendError, match=r"not a valid ONNX model: onnx\.checker"):
        load_onnx(model)
