"""Tests of the ``tvmquant`` command line (``tvmquant.cli``) and its file helpers (``tvmquant.io``).

A tiny ONNX model (Conv -> Relu -> Conv, residual Add, Relu, GlobalAveragePool; input
``input.1`` of shape 1x3x16x16, which TVM renames ``input_1``) is compiled once per module
with int8 and a report; the other compile tests fail before building or compile the float
model, so the whole file runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from tvmquant.calibration.runner import CalibrationDataError
from tvmquant.cli import main
from tvmquant.io import (
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    export_library_atomic,
    load_calibration_npz,
)

ort = pytest.importorskip("onnxruntime")

INPUT = "input.1"  # TVM sanitizes it to input_1: exercises the name mapping
SHAPE = (1, 3, 16, 16)
TARGET = "native"  # runs on any x86-64 machine that runs the tests


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Conv", [INPUT, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "c1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 1, 1])],
        [init("w1", (8, 3, 3, 3), 0.3), init("b1", (8,), 0.1),
         init("w2", (8, 8, 3, 3), 0.2), init("b2", (8,), 0.1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The model, its calibration data (4 samples) and one input, in a module-wide folder."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    model = root / "tiny.onnx"
    onnx.save(_tiny_model(), str(model))
    calib = root / "calib.npz"
    np.savez(calib, **{INPUT: rng.standard_normal((4, *SHAPE)).astype(np.float32)})
    inputs = root / "inputs.npz"
    np.savez(inputs, x=rng.standard_normal(SHAPE).astype(np.float32))
    return {"root": root, "model": model, "calib": calib, "inputs": inputs}


def _main(argv: list[str]) -> tuple[int, str, str]:
    """Run ``main`` and capture its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compiled(files) -> dict:
    """``tvmquant compile`` of the tiny model with int8, a report and fidelity."""
    folder = files["root"] / "int8"
    folder.mkdir()
    lib, report = folder / "model.so", folder / "report.json"
    code, out, err = _main([
        "compile", files["model"], "--input-shapes", f"{INPUT}:1,3,16,16",
        "--target", TARGET, "--quantize", "int8", "--calibration-data", files["calib"],
        "--output", lib, "--report", report, "--fidelity-samples", "2", "--no-progress",
    ])
    assert code == 0, err
    return {"lib": lib, "report": report, "stdout": out, "folder": folder}


def _ort_output(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: x})[0]


def _rel_err(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.linalg.norm(test - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------------------------
# compile and run, end to end
# --------------------------------------------------------------------------------------------


def test_compile_writes_library_report_and_summary(compiled):
    assert compiled["lib"].is_file() and compiled["report"].is_file()
    # nothing else (no temporary files) next to the outputs
    assert sorted(p.name for p in compiled["folder"].iterdir()) == ["model.so", "report.json"]
    out = compiled["stdout"]
    assert "layers:" in out and "integer" in out and "fidelity" in out
    assert str(compiled["lib"]) in out


def test_run_matches_onnxruntime(files, compiled, tmp_path):
    outputs = tmp_path / "outputs.npz"
    code, out, err = _main(["run", compiled["lib"], "--inputs", files["inputs"],
                            "--output", outputs, "--repeat", "3"])
    assert code == 0, err
    assert "latency: median" in out
    with np.load(outputs) as saved:
        assert saved.files == ["output_0"]
        got = saved["output_0"]
    with np.load(files["inputs"]) as inputs:
        ref = _ort_output(files["model"], inputs["x"])
    assert got.shape == ref.shape == (1, 8, 1, 1)
    assert _rel_err(ref, got) < 0.10


def test_report_contents(files, compiled):
    report = json.loads(compiled["report"].read_text())
    assert report["model"] == str(files["model"])
    assert report["input_shapes"] == {INPUT: list(SHAPE)}
    assert json.loads(report["target"])["kind"] == "llvm"
    assert report["quantize"] == "int8"
    assert report["calibration"]["samples"] == 4
    tensors = report["tensors"]
    assert tensors and all("scale" in t and "zero_point" in t for t in tensors)
    assert {"input_1", "conv2d_0"} <= {t["name"] for t in tensors}
    names = {layer["name"] for layer in report["layers"]}
    assert {"conv2d_0", "conv2d_1"} <= names
    assert report["summary"]["layers"] == len(report["layers"])
    fidelity = report["fidelity"]
    assert fidelity["samples"] == 2
    assert fidelity["integer"]["rel_l2"] < 0.10


@pytest.mark.parametrize("math", [[], ["--exact-math"]], ids=["fast-math", "exact-math"])
def test_float_compile_and_run_by_name(files, tmp_path, math):
    """--quantize none needs no calibration; run matches inputs by (sanitized) name."""
    lib = tmp_path / "float.so"
    code, out, err = _main(["compile", files["model"], "--quantize", "none", "--target",
                            TARGET, "-o", lib, *math])
    assert code == 0, err
    assert "none (float model)" in out
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, input_1=x)
    code, out, err = _main(["run", lib, "-i", inputs, "-o", outputs])
    assert code == 0, err
    with np.load(outputs) as saved:
        np.testing.assert_allclose(saved["output_0"], _ort_output(files["model"], x),
                                   rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# help and listings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    ([], ["compile", "run", "presets", "targets", "--verbose"]),
    (["compile"], ["--input-shapes", "--target", "--quantize", "--calibration-data",
                   "--output", "--report", "--fake-quant", "--skip", "--fidelity-samples",
                   "--no-progress", "int8-dynamic", "examples:"]),
    (["run"], ["--inputs", "--output", "--repeat", "--profile", "output_0", "examples:"]),
    (["presets"], ["presets"]),
    (["targets"], ["targets"]),
])
def test_help(argv, expected):
    code, out, err = _main([*argv, "--help"])
    assert code == 0
    assert err == ""
    for word in expected:
        assert word in out, word


def test_presets_and_targets_listings():
    code, out, _ = _main(["presets"])
    assert code == 0
    for name in ("int8", "int8-per-tensor", "int8-dynamic", "w4a8", "none"):
        assert f"  {name} " in out
    assert "int8 sym narrow per_channel" in out and "uint8 asym per_tensor" in out
    code, out, _ = _main(["targets"])
    assert code == 0
    for name in ("x86-vnni", "x86-avx2", "llvm", "native"):
        assert f"  {name} " in out
    assert "cascadelake" in out


# --------------------------------------------------------------------------------------------
# user errors: exit status 2, one message, no traceback, no output file
# --------------------------------------------------------------------------------------------


def _bad_files(folder: Path, files: dict[str, Path]) -> dict[str, Path]:
    data = files["model"].read_bytes()
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    made = {"truncated": truncated}
    arrays = {
        "wrong_name": {"x": np.zeros((4, *SHAPE), np.float32)},
        "wrong_shape": {INPUT: np.zeros((4, 1, 3, 8, 8), np.float32)},
        "no_sample_axis": {INPUT: np.zeros(SHAPE, np.float32)},
        "wrong_dtype": {INPUT: np.zeros((4, *SHAPE), np.int64)},
    }
    for name, content in arrays.items():
        made[name] = folder / f"{name}.npz"
        np.savez(made[name], **content)
    return made


@pytest.mark.parametrize("case, extra, message", [
    ("truncated ONNX", ["--model", "truncated", "--calibration-data", "calib"],
     "is not a valid ONNX model (malformed or truncated file?)"),
    ("wrong input name", ["--calibration-data", "wrong_name"],
     "'x' that are not inputs of the model; the model's inputs are 'input.1'"),
    ("wrong shape", ["--calibration-data", "wrong_shape"],
     "has shape (4, 1, 3, 8, 8), expected N x (1, 3, 16, 16)"),
    ("no sample axis", ["--calibration-data", "no_sample_axis"], "add a leading sample axis"),
    ("wrong dtype", ["--calibration-data", "wrong_dtype"],
     "has dtype int64, the model expects float32"),
    ("missing calibration file", ["--calibration-data", "absent"], "does not exist"),
    ("no calibration data", [], "needs --calibration-data"),
    ("unknown preset", ["--quantize", "int3", "--calibration-data", "calib"],
     "invalid choice: 'int3'"),
    ("unknown target", ["--target", "x86-quantum", "--calibration-data", "calib"],
     "unknown target 'x86-quantum'"),
    ("bad input shapes", ["--input-shapes", "input.1:1,3,x", "--calibration-data", "calib"],
     "bad dimensions"),
    ("unknown input in shapes", ["--input-shapes", "y:1,3", "--calibration-data", "calib"],
     "has no input named 'y'"),
])
def test_compile_user_errors(files, tmp_path, case, extra, message):
    bad = _bad_files(tmp_path, files)
    named = {**bad, "calib": files["calib"], "absent": tmp_path / "absent.npz"}
    model = files["model"]
    argv: list = []
    it = iter(extra)
    for arg in it:
        if arg == "--model":
            model = named[next(it)]
        elif arg == "--calibration-data":
            argv += [arg, named[next(it)]]
        else:
            argv.append(arg)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    lib, report = out_dir / "model.so", out_dir / "report.json"
    code, _, err = _main(["compile", model, "--target", TARGET, "--output", lib,
                          "--report", report, "--no-progress", *argv])
    assert code == 2, (case, err)
    assert "error:" in err and message in err, (case, err)
    assert "Traceback" not in err
    assert not lib.exists() and not report.exists()
    assert list(out_dir.iterdir()) == []


def test_compile_missing_output_folder(files, tmp_path):
    code, _, err = _main(["compile", files["model"], "--quantize", "none",
                          "-o", tmp_path / "nowhere" / "model.so"])
    assert code == 2
    assert "does not exist" in err and "nowhere" in err


@pytest.mark.filterwarnings("ignore:Renaming name")  # TVM's, shown with --verbose
def test_verbose_shows_traceback(files, tmp_path):
    bad = _bad_files(tmp_path, files)
    code, _, err = _main(["compile", files["model"], "-v", "--calibration-data",
                          bad["wrong_dtype"], "-o", tmp_path / "model.so"])
    assert code == 2
    assert "Traceback" in err and "CalibrationDataError" in err


def test_export_failure_leaves_no_output(files, tmp_path, monkeypatch):
    """A failing export_library (after writing half a file) leaves nothing at the output."""
    calls = []

    def failing_export(self, file_name, **kwargs):
        calls.append(file_name)
        Path(file_name).write_bytes(b"\x7fELF half a library")
        raise RuntimeError("linker killed")

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", failing_export)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    lib, report = out_dir / "model.so", out_dir / "report.json"
    code, _, err = _main(["compile", files["model"], "--quantize", "none", "--target",
                          TARGET, "-o", lib, "--report", report])
    assert calls and Path(calls[0]) != lib
    assert code == 1  # not a user error: an internal one, reported in one line
    assert "linker killed" in err and "Traceback" not in err
    assert not lib.exists() and not report.exists()
    assert list(out_dir.iterdir()) == []


def test_run_user_errors(files, compiled, tmp_path):
    outputs = tmp_path / "outputs.npz"
    # missing library
    code, _, err = _main(["run", tmp_path / "absent.so", "-i", files["inputs"]])
    assert code == 2 and "does not exist" in err
    # not a library
    code, _, err = _main(["run", files["model"], "-i", files["inputs"]])
    assert code == 2 and "cannot load" in err
    # no inputs given: names the model's parameter
    code, _, err = _main(["run", compiled["lib"]])
    assert code == 2 and "input_1" in err
    # too many arrays
    two = tmp_path / "two.npz"
    np.savez(two, a=np.zeros(SHAPE, np.float32), b=np.zeros(SHAPE, np.float32))
    code, _, err = _main(["run", compiled["lib"], "-i", two, "-o", outputs])
    assert code == 2 and "has 2 array(s)" in err
    # wrong shape: TVM's check, one line, and no output file
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((1, 3, 8, 8), np.float32))
    code, _, err = _main(["run", compiled["lib"], "-i", small, "-o", outputs])
    assert code == 2 and "failed" in err and "Traceback" not in err
    assert not outputs.exists()


# --------------------------------------------------------------------------------------------
# tvmquant.io
# --------------------------------------------------------------------------------------------

SIGNATURE = {"a": ((1, 3), "float32"), "b": ((2,), "int64")}


def test_load_calibration_npz(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, b=np.arange(6).reshape(3, 2), a=np.ones((3, 1, 3), np.float64))
    samples = load_calibration_npz(path, SIGNATURE)
    assert len(samples) == 3
    assert samples[1]["a"].dtype == np.float32 and samples[1]["a"].shape == (1, 3)
    np.testing.assert_array_equal(samples[2]["b"], [4, 5])
    # an alias (TVM's sanitized name) is accepted
    np.savez(path, **{"b": np.zeros((3, 2), np.int64), "a_alias": np.ones((3, 1, 3))})
    assert len(load_calibration_npz(path, SIGNATURE, aliases={"a_alias": "a"})) == 3


@pytest.mark.parametrize("arrays, message", [
    ({"a": np.ones((3, 1, 3), np.float32)}, "lacks input(s) 'b'"),
    ({"a": np.ones((3, 1, 3), np.float32), "b": np.zeros((2, 2), np.int64)},
     "different numbers of samples"),
    ({"a": np.ones((3, 1, 3), np.float32), "b": np.zeros((3, 2), np.float32)},
     "'b' has dtype float32, the model expects int64"),
    ({"a": np.ones((0, 1, 3), np.float32), "b": np.zeros((0, 2), np.int64)}, "no samples"),
    ({"a": np.ones((3, 1, 3), np.float32), "b": np.zeros((3, 2), np.int64),
      "c": np.zeros(1)}, "'c' that are not inputs of the model; the model's inputs are 'a', 'b'"),
])
def test_load_calibration_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError, match="calibration data") as info:
        load_calibration_npz(path, SIGNATURE)
    assert message in str(info.value)


def test_load_calibration_npz_not_an_npz(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CalibrationDataError, match=r"not a NumPy \.npz file"):
        load_calibration_npz(garbage, SIGNATURE)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((3, 1, 3)))
    with pytest.raises(CalibrationDataError, match=r"single \.npy array"):
        load_calibration_npz(single, SIGNATURE)


def test_atomic_writers(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"x": np.float32(0.5), "n": np.int64(3), "a": np.arange(3),
                             "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 0.5, "n": 3, "a": [0, 1, 2],
                                            "p": str(tmp_path)}
    assert path.read_text().startswith('{\n  "x"')
    # an unserialisable object leaves the previous content
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["n"] == 3
    # npz at exactly the given path (numpy.savez would append .npz)
    npz = tmp_path / "outputs.bin"
    atomic_save_npz(npz, output_0=np.ones(2), output_1=np.zeros(3))
    with np.load(npz) as saved:
        assert saved.files == ["output_0", "output_1"]
    atomic_write_bytes(tmp_path / "b", b"abc")
    assert (tmp_path / "b").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "outputs.bin", "report.json"]


def test_export_library_atomic_keeps_previous_file(tmp_path):
    path = tmp_path / "model.so"
    path.write_bytes(b"previous")

    class Failing:
        def export_library(self, file_name: str) -> None:
            Path(file_name).write_bytes(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_library_atomic(Failing(), path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.so"]


# --------------------------------------------------------------------------------------------
# mixed precision
# --------------------------------------------------------------------------------------------


def _mixed_args(files, folder, *budget):
    return ["mixed-precision", files["model"], "--input-shapes", f"{INPUT}:1,3,16,16",
            "--target", TARGET, "--calibration-data", files["calib"], *budget,
            "--output", folder / "mp.so", "--latency-table", folder / "lat.json",
            "--sensitivity-cache", folder / "sens.json", "--no-progress"]


def test_mixed_precision_writes_model_report_and_plots(files, tmp_path):
    code, out, err = _main([*_mixed_args(files, tmp_path, "--size-budget", "0.75x-int8"),
                            "--report", tmp_path / "mp.json", "--plots", tmp_path])
    assert code == 0, err
    report = json.loads((tmp_path / "mp.json").read_text())
    assert report["counts"]["int4"] >= 1  # 0.75x the int8 bytes needs some 4-bit layers
    assert report["size_bytes"] <= report["budgets"][0]["limit"]
    assert "predicted" in out and "measured" in out
    sim = report["simulated_divergence"]
    assert f"divergence:    {sim['chosen']:.4g} simulated" in out and sim["uniform_int8"] > 0
    for name in ("tiny-sensitivity.png", "tiny-pareto.png", "mp.so", "lat.json", "sens.json"):
        assert (tmp_path / name).is_file(), name
    # the table is reused: a second search measures nothing new
    before = (tmp_path / "lat.json").read_text()
    code, _, err = _main(_mixed_args(files, tmp_path, "--latency-budget", "2x-int8"))
    assert code == 0, err
    assert (tmp_path / "lat.json").read_text() == before


def test_mixed_precision_errors_leave_nothing(files, tmp_path):
    code, _, err = _main(_mixed_args(files, tmp_path))
    assert code == 2 and "give a budget" in err
    code, _, err = _main(_mixed_args(files, tmp_path, "--size-budget", "10"))
    assert code == 2 and "least any assignment reaches" in err
    code, _, err = _main(_mixed_args(files, tmp_path, "--latency-budget", "fast"))
    assert code == 2 and "cannot read latency budget" in err
    assert not (tmp_path / "mp.so").exists()


def test_targets_this_cpu_cannot_run(files, tmp_path):
    """Tuning or measuring locally for a target whose instructions this CPU lacks would die
    of an illegal instruction: a clear error first (cross-compiling stays allowed, with a
    note)."""
    from tvmquant.targets import missing_host_features, resolve_target

    alien = next((name for name in ("x86-amx", "x86-vnni", "x86-avx2")
                  if missing_host_features(resolve_target(name))), None)
    if alien is None:
        pytest.skip("this CPU has every feature of tvmquant's x86 targets")
    missing = missing_host_features(resolve_target(alien))
    code, _, err = _main(["tune", files["model"], "--quantize", "none", "--target", alien,
                          "--work-dir", tmp_path / "tune", "--trials", "1"])
    assert code == 2 and missing[0] in err and "--rpc-tracker" in err
    assert not (tmp_path / "tune").exists()
    argv = _mixed_args(files, tmp_path, "--size-budget", "0.75x-int8")
    argv[argv.index("--target") + 1] = alien
    code, _, err = _main(argv)
    assert code == 2 and missing[0] in err
    assert not (tmp_path / "lat.json").exists()
    lib = tmp_path / "alien.so"
    code, out, err = _main(["compile", files["model"], "--quantize", "none", "--target", alien,
                            "-o", lib])
    assert code == 0, err
    assert lib.exists() and "not here" in out and missing[0] in out
    assert missing_host_features(resolve_target("native")) == []
