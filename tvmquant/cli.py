"""The ``tvmquant`` command line: quantize and compile ONNX models, run them, list options.

Subcommands (``tvmquant SUBCOMMAND --help`` for each):

``compile``
    Load an ONNX model, calibrate and quantize it (or not: ``--quantize none``), compile it for
    a CPU target and export a shared library, plus a JSON report of the quantization.
``run``
    Run an exported library on inputs from an ``.npz`` file, save its outputs to an ``.npz``
    file and optionally time it.
``presets`` / ``targets``
    List the quantization presets and the friendly target names.

:func:`main` returns an exit code instead of exiting: 0 on success, 2 for a user error (a bad
model, calibration file, preset, target or path: one line ``tvmquant: error: ...`` on stderr,
no traceback unless ``--verbose``), 1 for an unexpected internal error, 130 when interrupted.
Output files are written atomically (see :mod:`tvmquant.io`): a failed command never leaves
a partial file at an output path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from . import __version__
from .api import build, quantize
from .calibration.runner import CalibrationDataError, input_signature
from .config import PRESETS, QuantConfig, get_preset
from .frontend import FrontendError, InputInfo, load_onnx, parse_input_shapes
from .io import (
    atomic_save_npz,
    atomic_write_bytes,
    export_library_atomic,
    json_dumps,
    load_calibration_npz,
)
from .targets import (
    TARGETS,
    host_target,
    missing_host_features,
    request_amx_permission,
    resolve_target,
)
from .tuning import RPCDevice, TuningError, records_database, tune

__all__ = ["CLIError", "build_parser", "main"]

logger = logging.getLogger(__name__)

PROG = "tvmquant"
NO_QUANTIZATION = "none"

#: One line on what each preset is for (the specs themselves come from QuantSpec.describe()).
PRESET_DESCRIPTIONS: dict[str, str] = {
    "int8": "the default: lowers to integer-only graphs",
    "int8-per-tensor": "one weight scale per tensor (for kernels without per-channel scales)",
    "int8-dynamic": "activation ranges computed per input at run time; no calibration data",
    "w4a8": "4-bit weights (one scale per 32 input channels), 8-bit activations",
}

#: What each friendly target name means.
TARGET_DESCRIPTIONS: dict[str, str] = {
    "x86-vnni": "x86-64 with AVX-512 VNNI (Cascade Lake and newer Xeons, Zen 4+)",
    "x86-amx": "x86-64 with AVX-512 VNNI and AMX-INT8 (Sapphire Rapids and newer)",
    "x86-avx512": "x86-64 with AVX-512 (Skylake-SP); no VNNI",
    "x86-avx2": "x86-64 with AVX2 (Haswell and newer)",
    "llvm": "generic x86-64: no instruction-set extension assumed (runs anywhere, slowest)",
    "native": "this machine's CPU, detected by LLVM",
}

_COMPILE_EPILOG = """\
examples:
  # int8 with calibration data, report, for an AVX-512 VNNI CPU
  tvmquant compile model.onnx --input-shapes x:1,3,48,192 --target x86-vnni \\
      --quantize int8 --calibration-data calib.npz --output model.so --report report.json

  # keep the first conv and every softmax in float, measure fidelity on 8 samples
  tvmquant compile model.onnx --calibration-data calib.npz -o model.so \\
      --skip conv2d_0 --skip softmax --fidelity-samples 8

  # dynamic int8 needs no calibration data; 'none' compiles the float model
  tvmquant compile model.onnx --quantize int8-dynamic -o model_dyn.so
  tvmquant compile model.onnx --quantize none -o model_fp32.so

calibration data:
  An .npz file with one array per model input, named like the ONNX input (TVM's
  sanitized name, e.g. input_1 for input.1, is accepted too), holding N samples stacked
  on a new leading axis: an input of shape 1x3x48x192 is an array of shape
  N x 1x3x48x192. Make one with numpy.savez("calib.npz", x=np.stack(samples)).
  float64 arrays are cast to float32; other dtype differences are errors.

layer names (for --skip):
  op name and index in dataflow order: conv2d_0, conv2d_1, matmul_0, ...; a glob matches
  a layer name or an op name ('conv2d_*', 'matmul'). See "layers" in the report.
"""

_RUN_EPILOG = """\
examples:
  tvmquant run model.so --inputs inputs.npz --output outputs.npz
  tvmquant run model.so --inputs inputs.npz --repeat 50      # median latency of 50 runs

inputs:
  An .npz file with one array per model input (no sample axis: exactly the input's
  shape and dtype). If the array names are the compiled model's parameter names (TVM's
  sanitized ONNX names, e.g. input_1 for input.1) they are matched by name; otherwise
  the arrays are passed in the order they were saved in the file (numpy.savez keeps
  the keyword order). A single-array .npz (or .npy) file feeds a one-input model.

outputs:
  Saved as output_0, output_1, ... in the order the model returns them (nested tuples
  flattened).
"""

_MAIN_EPILOG = """\
examples:
  tvmquant presets
  tvmquant targets
  tvmquant compile model.onnx --input-shapes x:1,3,48,192 --target x86-vnni \\
      --quantize int8 --calibration-data calib.npz --output model.so --report report.json
  tvmquant tune model.onnx --input-shapes x:1,3,48,192 --calibration-data calib.npz \
      --work-dir tuning/ --trials 512
  tvmquant compile model.onnx ... --tuning-records tuning/ --output model.so
  tvmquant run model.so --inputs inputs.npz --output outputs.npz --repeat 20
  tvmquant mixed-precision model.onnx --target x86-vnni --calibration-data calib.npz \
      --latency-budget 0.8x-int8 --output model.so --report report.json --plots plots/

Run 'tvmquant SUBCOMMAND --help' for the options of each subcommand.
exit status: 0 success, 2 user error (bad model, data, option or path), 1 internal error.
"""


_MIXED_EPILOG = """\
examples:
  tvmquant mixed-precision det.onnx --input-shapes x:1,3,320,320 --target x86-vnni \\
      --calibration-data calib.npz --latency-budget 0.8x-int8 --output det.so \\
      --report report.json --plots plots/
  tvmquant mixed-precision rec.onnx ... --size-budget 2MB --precisions int8,int4

budgets (at least one; several are all met):
  --latency-budget 0.8x-int8   0.8 times the uniform int8 model's latency (or 12ms, 0.5s)
  --size-budget 0.6x-int8      weight bytes (or 4MB, 300KiB, 1e6)
  --bops-budget 0.5x-int8      bit operations, MACs x weight bits x activation bits (or 2G)
  'x-float', 'x-int8', 'x-int4' name the uniform assignment the factor applies to.

how it chooses:
  Each conv2d/matmul layer gets one of the --precisions (weights; activations stay 8-bit).
  Its sensitivity at each precision is measured on the first --sensitivity-samples
  calibration samples (kl: the output's divergence from float with only that layer
  quantized; hessian: Hutchinson's Hessian trace times the weight perturbation), its
  latency on the target with tvmquant's kernels (a lookup table cached in
  --latency-table, shared by every model). An integer linear program (scipy's milp) then
  minimises the total sensitivity within the budgets. The chosen model is compiled and
  timed: the report gives the table's predicted latency next to the measured one.
"""


def _add_rpc_options(p: argparse.ArgumentParser, tracker_help: str) -> None:
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help=tracker_help)
    p.add_argument("--rpc-key", metavar="KEY", help="the device key at the tracker")


def _rpc_device(args: argparse.Namespace) -> RPCDevice | None:
    """The device of ``--rpc-tracker``/``--rpc-key``, checked before any slow step."""
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise CLIError("--rpc-tracker and --rpc-key go together")
    if not args.rpc_tracker:
        return None
    rpc = RPCDevice(args.rpc_tracker, args.rpc_key)
    _ = rpc.host_port  # validates HOST:PORT
    return rpc


def _cache_file(name: str) -> str:
    """``$XDG_CACHE_HOME/tvmquant/NAME`` (``~/.cache`` by default)."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvmquant"
               / name)


def _para(text: str) -> str:
    """A description paragraph wrapped for the raw-text help formatter."""
    return textwrap.fill(text, width=88)


class CLIError(Exception):
    """A user error detected by the command line; printed as one line, exit status 2."""


def _check_runs_here(target, name: str, why: str) -> None:
    """A clear error, before any slow step, where ``target``'s code cannot run on this CPU
    (it would die of an illegal instruction)."""
    missing = missing_host_features(target)
    if missing:
        raise CLIError(
            f"{why} on this machine, whose CPU lacks {', '.join(missing)} that target "
            f"{name!r} uses: run it on such a machine, or through --rpc-tracker/--rpc-key, "
            "or pick a target this CPU has (tvmquant targets; 'native' is this one)")


_USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    FrontendError,
    CalibrationDataError,
    TuningError,
    ValueError,
    OSError,
)


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout; wider help column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _verbose_parent(top_level: bool) -> argparse.ArgumentParser:
    """``-v/--verbose``, accepted before and after the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="count",
        default=0 if top_level else argparse.SUPPRESS,
        help="log progress (INFO; -vv for DEBUG) and show tracebacks on errors",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``tvmquant`` argument parser with its four subcommands.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_para(
            "Quantize ONNX models with Apache TVM (Relax), compile them for CPUs and "
        "run them."
        ),
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
        parents=[_verbose_parent(top_level=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    verbose = _verbose_parent(top_level=False)

    # --- compile --------------------------------------------------------------------------
    quantize_choices = [*PRESETS, NO_QUANTIZATION]
    p = sub.add_parser(
        "compile",
        help="quantize an ONNX model and compile it into a shared library",
        description=_para(
            "Load an ONNX model, calibrate and quantize it, compile it for a CPU "
        "target and export a shared library (plus an optional JSON report). Output files "
        "are written atomically: on any error no file is left at the output paths."
        ),
        epilog=_COMPILE_EPILOG,
        formatter_class=_Formatter,
        parents=[verbose],
    )
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to compile")
    p.add_argument(
        "-o", "--output", required=True, metavar="PATH",
        help="the shared library to write (e.g. model.so; a .tar suffix writes object files)",
    )
    p.add_argument(
        "--input-shapes", action="append", metavar="SHAPES", default=[],
        help="static input shapes, 'name:d0,d1,...'; several inputs separated by ';' or given "
        "with repeated options (needed for inputs with dynamic dimensions)",
    )
    p.add_argument(
        "--target", default="native", metavar="TARGET",
        help="friendly target name (see 'tvmquant targets') or a TVM target as JSON, e.g. "
        "'{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}' (default: native, this machine's CPU)",
    )
    p.add_argument(
        "-q", "--quantize", default="int8", choices=quantize_choices, metavar="PRESET",
        help=f"quantization preset: {', '.join(quantize_choices)} (default: int8; see "
        "'tvmquant presets'; 'none' compiles the float model)",
    )
    p.add_argument(
        "--calibration-data", metavar="CALIB.npz",
        help="calibration samples: one array per input, samples on a leading axis (required "
        "for static presets; see below)",
    )
    p.add_argument(
        "--report", metavar="REPORT.json",
        help="write the quantization report (tensor scales and zero points, layers, float "
        "layers and why, fidelity) as JSON",
    )
    p.add_argument(
        "--fake-quant", action="store_true",
        help="compile the simulated-quantization module (float ops between quantize/"
        "dequantize pairs) instead of the integer-only one; for debugging accuracy",
    )
    p.add_argument(
        "--skip", action="extend", nargs="+", default=[], metavar="PATTERN",
        help="keep layers in float: globs of layer names (conv2d_0) or op names (softmax); "
        "may be repeated",
    )
    p.add_argument(
        "--fidelity-samples", type=_non_negative_int, default=0, metavar="N",
        help="run N calibration samples through the float, fake-quant and integer models and "
        "report their output errors (default: 0, not measured)",
    )
    p.add_argument(
        "--tuning-records", metavar="DIR",
        help="apply the kernels tuned by 'tvmquant tune' (its --work-dir, or a records "
        "directory); untuned kernels keep the default schedules",
    )
    p.add_argument(
        "--exact-math", action="store_true",
        help="compute the float exp/softmax/sigmoid/erf/tanh that remain with libm instead "
        "of TVM's vectorizable approximations (about 1e-7 relative error; 4x faster softmax)",
    )
    p.add_argument("--no-progress", action="store_true", help="no calibration progress bar")
    p.set_defaults(func=_cmd_compile)

    # --- mixed-precision ----------------------------------------------------------------
    p = sub.add_parser(
        "mixed-precision",
        help="choose each layer's precision (float/int8/int4) under a latency, size or BOPs "
        "budget, and compile the result",
        description=_para(
            "HAWQ-V3-style mixed precision: per-layer sensitivity on calibration data, "
            "per-layer latency measured on the target, an integer linear program under the "
            "budgets. Writes the compiled model, and optionally a JSON report and PNG plots "
            "(per-layer sensitivity, Pareto front). Output files are written atomically."
        ),
        epilog=_MIXED_EPILOG,
        formatter_class=_Formatter,
        parents=[verbose],
    )
    p.add_argument("model", metavar="MODEL.onnx", help="the float ONNX model")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="the shared library to write (the chosen mixed-precision model)")
    p.add_argument("--input-shapes", action="append", metavar="SHAPES", default=[],
                   help="static input shapes, as for compile")
    p.add_argument("--target", default="native", metavar="TARGET",
                   help="where latencies are measured and the model compiled (default: native)")
    p.add_argument("--calibration-data", required=True, metavar="CALIB.npz",
                   help="calibration samples (as for compile)")
    p.add_argument("--latency-budget", metavar="BUDGET", help="e.g. 0.8x-int8 or 12ms")
    p.add_argument("--size-budget", metavar="BUDGET", help="e.g. 0.6x-int8 or 4MB")
    p.add_argument("--bops-budget", metavar="BUDGET", help="e.g. 0.5x-int8 or 2G")
    p.add_argument("--precisions", default="float,int8,int4", metavar="LIST",
                   help="candidate precisions per layer (default: float,int8,int4)")
    p.add_argument("--sensitivity", default="kl",
                   choices=["kl", "kl-int8", "measured", "hessian"],
                   help="sensitivity measure: kl (only that layer quantized, ZeroQ), kl-int8 "
                        "(the change from uniform int8 with every quantized tensor "
                        "simulated, one compiled module), measured (the same through the "
                        "real pipeline: one build per layer and precision, slow), hessian "
                        "(HAWQ-V2 trace) (default: kl)")
    p.add_argument("--sensitivity-samples", type=_positive_int, default=4, metavar="N",
                   help="calibration samples used for sensitivity (default: 4)")
    p.add_argument("--latency-table", metavar="FILE",
                   default=_cache_file("latency.json"),
                   help="measured layer latencies, reused across models (default: %(default)s)")
    p.add_argument("--sensitivity-cache", metavar="FILE",
                   default=_cache_file("sensitivity.json"),
                   help="sensitivities per model and data, reused when they match "
                   "(default: %(default)s)")
    p.add_argument("--report", metavar="REPORT.json", help="write the search's report as JSON")
    p.add_argument("--plots", metavar="DIR", help="write sensitivity and Pareto plots (PNG)")
    p.add_argument("--tuning-records", metavar="DIR",
                   help="tuned kernels ('tvmquant tune') for every build and measurement")
    _add_rpc_options(p, "measure latencies on a device behind TVM's RPC tracker")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_mixed_precision)

    # --- tune -----------------------------------------------------------------------------
    p = sub.add_parser(
        "tune",
        help="tune the model's kernels for this CPU (or a remote one) with MetaSchedule",
        description=_para(
            "Quantize the model as 'compile' would, then search schedules for its kernels "
            "with MetaSchedule and the XGBoost cost model. Every candidate measured is kept "
            "in WORK_DIR/candidates as it is measured: an interrupted run (Ctrl-C) resumes "
            "where it stopped when run again. Before a tuned kernel is kept it must compute "
            "exactly what the untuned kernel computes on random inputs and be faster than "
            "the default schedule; the kept records (WORK_DIR/records) are what 'compile "
            "--tuning-records WORK_DIR' applies. Use the same model, shapes, preset and "
            "calibration data for both commands."
        ),
        formatter_class=_Formatter,
        parents=[verbose],
    )
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to tune")
    p.add_argument("--work-dir", required=True, metavar="DIR",
                   help="where candidates, checked records and report.json live")
    p.add_argument("--input-shapes", action="append", metavar="SHAPES", default=[],
                   help="static input shapes, as for compile")
    p.add_argument("--target", default="native", metavar="TARGET",
                   help="as for compile (default: native)")
    p.add_argument("-q", "--quantize", default="int8", choices=quantize_choices,
                   metavar="PRESET", help="quantization preset, as for compile")
    p.add_argument("--calibration-data", metavar="CALIB.npz",
                   help="calibration samples, as for compile")
    p.add_argument("--skip", action="extend", nargs="+", default=[], metavar="PATTERN",
                   help="layers kept in float, as for compile")
    p.add_argument("--trials", type=_positive_int, default=256, metavar="N",
                   help="measured candidates in total, over all kernels (default: 256)")
    p.add_argument("--trials-per-iter", type=_positive_int, default=16, metavar="N",
                   help="candidates measured per search round (default: 16)")
    _add_rpc_options(p, "measure on a device behind TVM's RPC tracker instead of this CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_tune)

    # --- run ------------------------------------------------------------------------------
    p = sub.add_parser(
        "run",
        help="run a compiled library on inputs from an .npz file",
        description=_para(
            "Load a library exported by 'tvmquant compile', run its 'main' function "
        "on the CPU with inputs from an .npz file, save the outputs and optionally time it."
        ),
        epilog=_RUN_EPILOG,
        formatter_class=_Formatter,
        parents=[verbose],
    )
    p.add_argument("library", metavar="MODEL.so", help="the library to run")
    p.add_argument("-i", "--inputs", metavar="INPUTS.npz",
                   help="the model's inputs (see below); required unless it takes none")
    p.add_argument("-o", "--output", metavar="OUTPUTS.npz",
                   help="write the outputs as output_0, output_1, ... to this .npz file")
    p.add_argument("--profile", action="store_true",
                   help="time the model and print its median latency (10 repeats unless "
                   "--repeat is given)")
    p.add_argument("--repeat", type=_positive_int, metavar="N",
                   help="time N repeats and print the median latency (implies --profile)")
    p.add_argument("--number", type=_positive_int, default=1, metavar="N",
                   help="runs averaged in each timed repeat (default: 1)")
    p.set_defaults(func=_cmd_run)

    # --- presets / targets ----------------------------------------------------------------
    p = sub.add_parser(
        "presets", help="list the quantization presets",
        description=_para(
            "List the quantization presets accepted by 'compile --quantize', with "
        "their weight and activation specs."
        ),
        formatter_class=_Formatter, parents=[verbose],
    )
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser(
        "targets", help="list the friendly target names",
        description=_para(
            "List the friendly target names accepted by 'compile --target' and the "
        "TVM target each stands for. Any TVM target can also be given as JSON."
        ),
        formatter_class=_Formatter, parents=[verbose],
    )
    p.set_defaults(func=_cmd_targets)
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _out(text: str = "") -> None:
    """User-facing output of the command line (stdout)."""
    print(text, file=sys.stdout)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _check_output_path(path: str, what: str, inputs: Sequence[str] = ()) -> Path:
    """Fail early (before any slow work) if an output path cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{what} {path!r} is a folder, not a file")
    folder = out.parent
    if not folder.is_dir():
        raise CLIError(f"the folder of {what} {path!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"the folder of {what} {path!r} is not writable")
    for other in inputs:
        if other and Path(other).exists() and out.exists() and out.samefile(other):
            raise CLIError(f"{what} {path!r} would overwrite the input {other!r}")
    return out


def _configure(args: argparse.Namespace) -> QuantConfig | None:
    """The QuantConfig of ``--quantize`` and ``--skip`` (None for ``--quantize none``)."""
    if args.quantize == NO_QUANTIZATION:
        contradicting = [
            flag for flag, given in (("--fake-quant", args.fake_quant),
                                     ("--skip", bool(args.skip)),
                                     ("--fidelity-samples", args.fidelity_samples > 0))
            if given
        ]
        if contradicting:
            raise CLIError(f"{' and '.join(contradicting)} need"
                           f"{'s' if len(contradicting) == 1 else ''} quantization; "
                           f"'--quantize {NO_QUANTIZATION}' compiles the float model")
        return None
    config = get_preset(args.quantize)
    if args.skip:
        config = dataclasses.replace(config, skip=(*config.skip, *args.skip))
    return config


def _relax_names(mod: Any, inputs: Sequence[InputInfo]) -> list[str]:
    """The Relax parameter names of the ONNX inputs (TVM sanitizes ``input.1`` to ``input_1``)."""
    names = list(input_signature(mod))
    if len(names) != len(inputs):  # should not happen; fall back to the ONNX names
        logger.warning("the imported module has %d inputs, the ONNX model %d", len(names),
                       len(inputs))
        return [info.name for info in inputs]
    return names


def _load_calibration(path: str, inputs: Sequence[InputInfo],
                      relax_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Calibration samples keyed by the Relax parameter names ``quantize`` expects."""
    signature = {info.name: (info.shape, info.dtype) for info in inputs}
    aliases = {r: info.name for r, info in zip(relax_names, inputs) if r != info.name}
    samples = load_calibration_npz(path, signature, aliases=aliases)
    rename = {info.name: r for r, info in zip(relax_names, inputs)}
    return [{rename[k]: v for k, v in sample.items()} for sample in samples]


def _percent(value: float) -> str:
    return f"{100.0 * value:.2f}%"


def _print_compile_summary(args: argparse.Namespace, report: dict[str, Any],
                           inputs: Sequence[InputInfo], target_text: str) -> None:
    _out(f"tvmquant: compiled {args.model} -> {args.output}")
    _out(f"  target:        {args.target} {target_text}")
    _out("  inputs:        " + ", ".join(
        f"{info.name} {_shape_text(info.shape)} {info.dtype}" for info in inputs))
    if args.quantize == NO_QUANTIZATION:
        _out("  quantization:  none (float model)")
    else:
        summary = report.get("summary", {})
        mode = "fake-quant (simulated in float)" if args.fake_quant else "integer"
        _out(f"  quantization:  {args.quantize}, {mode}")
        _out(f"  layers:        {summary.get('integer_layers', 0)} integer, "
             f"{summary.get('float_layers', 0)} float (of {summary.get('layers', 0)})")
        for layer in report.get("float_layers", []):
            reason = layer.get("reason") or "not quantizable"
            _out(f"    float: {layer['name']} ({layer['op']}): {reason}")
        for fallback in report.get("lowering_fallbacks", []):
            _out(f"    lowering fallback: {fallback}")
        fidelity = report.get("fidelity")
        if fidelity:
            _out(f"  fidelity:      vs float on {fidelity.get('samples', 0)} sample(s)")
            for key in ("integer", "fake_quant"):
                if key in fidelity:
                    m = fidelity[key]
                    _out(f"    {key.replace('_', '-'):10s} rel. L2 error {_percent(m['rel_l2'])}, "
                         f"max abs error {m['max_abs']:.4g}, cosine {m['cosine']:.6f}")
    if args.report:
        _out(f"  report:        {args.report}")
    _out(f"  output:        {args.output}")


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def _cmd_compile(args: argparse.Namespace) -> int:
    """``tvmquant compile``: ONNX -> (quantize) -> build -> export library (+ report)."""
    # Everything cheap is checked before the slow steps (import, calibration, build).
    model_path = Path(args.model)
    if not model_path.exists():
        raise FileNotFoundError(f"ONNX model {args.model!r} does not exist")
    _check_output_path(args.output, "output", [args.model])
    if args.report:
        _check_output_path(args.report, "report", [args.model])
        if Path(args.report).absolute() == Path(args.output).absolute():
            raise CLIError("--report and --output are the same file")
    if args.calibration_data and not Path(args.calibration_data).exists():
        raise CalibrationDataError(f"calibration data {args.calibration_data!r} does not exist")
    shapes = parse_input_shapes(";".join(args.input_shapes))
    config = _configure(args)
    try:
        target = resolve_target(args.target)
    except ValueError as err:
        raise CLIError(str(err)) from None
    target_text = str(target)
    needs_data = config is not None and not config.dynamic
    if needs_data and not args.calibration_data:
        raise CalibrationDataError(
            f"preset {args.quantize!r} calibrates activation ranges and needs "
            "--calibration-data CALIB.npz; use --quantize int8-dynamic (no calibration) or "
            f"--quantize {NO_QUANTIZATION} (float)"
        )
    if args.fidelity_samples and not args.calibration_data:
        raise CLIError("--fidelity-samples measures on calibration samples: give "
                       "--calibration-data too")

    logger.info("loading %s", args.model)
    mod, _params, inputs = load_onnx(model_path, shapes or None)
    relax_names = _relax_names(mod, inputs)
    samples = None
    if args.calibration_data:
        samples = _load_calibration(args.calibration_data, inputs, relax_names)

    report: dict[str, Any] = {
        "model": str(args.model),
        "target": target_text,
        "target_name": args.target,
        "input_shapes": {info.name: list(info.shape) for info in inputs},
        "inputs": [{"name": info.name, "param": r, "shape": list(info.shape),
                    "dtype": info.dtype} for info, r in zip(inputs, relax_names)],
        "quantize": args.quantize,
        "fake_quant": bool(args.fake_quant),
        "calibration": {"path": args.calibration_data,
                        "samples": len(samples) if samples is not None else 0},
        "output": str(args.output),
        "tvmquant_version": __version__,
    }
    database = records_database(args.tuning_records) if args.tuning_records else None
    report["tuning_records"] = database
    if config is None:
        logger.info("compiling the float model for %s", target_text)
        ex = build(mod, target, database=database, fast_math=not args.exact_math)
    else:
        logger.info("quantizing with preset %s", args.quantize)
        qmod = quantize(mod, samples, config, progress=not args.no_progress,
                        fidelity_samples=args.fidelity_samples)
        report.update(qmod.report)
        logger.info("compiling the %s module for %s",
                    "fake-quant" if args.fake_quant else "integer", target_text)
        ex = build(qmod.fake_quant_mod if args.fake_quant else qmod, target,
                   database=database, fast_math=not args.exact_math)

    report_text = json_dumps(report) if args.report else None  # fail before writing anything
    export_library_atomic(ex, args.output)
    if report_text is not None:
        atomic_write_bytes(args.report, report_text.encode("utf-8"))
    _print_compile_summary(args, report, inputs, target_text)
    missing = missing_host_features(target)
    if missing:
        _out(f"  note: built for a CPU with {', '.join(missing)}, which this machine's CPU "
             "lacks: the library runs on such a machine, not here")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    """``tvmquant tune``: ONNX -> (quantize) -> MetaSchedule search -> checked records."""
    model_path = Path(args.model)
    if not model_path.exists():
        raise FileNotFoundError(f"ONNX model {args.model!r} does not exist")
    rpc = _rpc_device(args)
    if args.calibration_data and not Path(args.calibration_data).exists():
        raise CalibrationDataError(f"calibration data {args.calibration_data!r} does not exist")
    args.fake_quant, args.fidelity_samples = False, 0  # (compile-only options)
    config = _configure(args)
    try:
        target = resolve_target(args.target)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if rpc is None:
        _check_runs_here(target, args.target, "tuning runs its candidates")
    if config is not None and not config.dynamic and not args.calibration_data:
        raise CalibrationDataError(
            f"preset {args.quantize!r} needs --calibration-data CALIB.npz (the same as for "
            "compile, so that the tuned kernels are the compiled ones)")
    shapes = parse_input_shapes(";".join(args.input_shapes))
    mod, _params, inputs = load_onnx(model_path, shapes or None)
    if config is not None:
        samples = None
        if args.calibration_data:
            samples = _load_calibration(args.calibration_data, inputs, _relax_names(mod, inputs))
        mod = quantize(mod, samples, config, progress=not args.no_progress).mod
    rep = tune(mod, target, args.work_dir, trials=args.trials,
               trials_per_iter=args.trials_per_iter, rpc=rpc, progress=not args.no_progress)
    _out(f"tuned {len(rep.tasks)} kernels of {args.model} for {target} "
         f"({rep.trials_run} new trials, {rep.seconds:.0f} s)")
    _out(f"{'default us':>11} {'tuned us':>9} {'kept':>4} {'wrong':>5}  kernel")
    for t in sorted(rep.tasks, key=lambda t: -(t.default_us or 0) * t.weight):
        tuned = f"{t.tuned_us:9.1f}" if t.tuned_us is not None else f"{'-':>9}"
        default = f"{t.default_us:11.1f}" if t.default_us is not None else f"{'-':>11}"
        name = t.name if len(t.name) <= 60 else t.name[:57] + "..."
        _out(f"{default} {tuned} {'yes' if t.kept else 'no':>4} {t.rejected:5d}  {name}"
             + (f" x{t.weight}" if t.weight > 1 else ""))
    _out(f"estimated speed-up of the tuned kernels over the default ones: "
         f"{rep.estimated_speedup():.2f}x; records: {rep.records_dir}")
    if rep.end_to_end_default_ms is not None:
        _out(f"whole model: {rep.end_to_end_default_ms:.3f} ms with the default schedules, "
             f"{rep.end_to_end_tuned_ms:.3f} ms tuned"
             + (" -> not faster: records dropped" if rep.records_dropped else ""))
    if rep.interrupted:
        _out("interrupted: run the same command again to resume")
        return 130
    return 0


def _cmd_mixed_precision(args: argparse.Namespace) -> int:
    """``tvmquant mixed-precision``: sensitivity + latency table -> ILP -> compiled model."""
    from .mixed_precision import LatencyTable, search, write_plots

    model_path = Path(args.model)
    if not model_path.exists():
        raise FileNotFoundError(f"ONNX model {args.model!r} does not exist")
    _check_output_path(args.output, "output", [args.model])
    if args.report:
        _check_output_path(args.report, "report", [args.model])
    if args.plots and not Path(args.plots).is_dir():
        raise CLIError(f"--plots folder {args.plots!r} does not exist")
    if not Path(args.calibration_data).exists():
        raise CalibrationDataError(f"calibration data {args.calibration_data!r} does not exist")
    if not (args.latency_budget or args.size_budget or args.bops_budget):
        raise CLIError("give a budget: --latency-budget, --size-budget or --bops-budget "
                       "(e.g. --latency-budget 0.8x-int8)")
    rpc = _rpc_device(args)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    try:
        target = resolve_target(args.target)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if rpc is None:
        _check_runs_here(target, args.target, "the latency table is measured by running layers")
    table_path = Path(args.latency_table)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    Path(args.sensitivity_cache).parent.mkdir(parents=True, exist_ok=True)
    table = LatencyTable(table_path)
    shapes = parse_input_shapes(";".join(args.input_shapes))
    mod, _params, inputs = load_onnx(model_path, shapes or None)
    samples = _load_calibration(args.calibration_data, inputs, _relax_names(mod, inputs))
    database = records_database(args.tuning_records) if args.tuning_records else None
    result = search(mod, samples, target, latency_budget=args.latency_budget,
                    size_budget=args.size_budget, bops_budget=args.bops_budget,
                    precisions=precisions, sensitivity=args.sensitivity,
                    sensitivity_samples=args.sensitivity_samples, latency_table=table,
                    cache=args.sensitivity_cache, database=database,
                    progress=not args.no_progress, rpc=rpc)
    report = dict(result.report, model=str(args.model), output=str(args.output),
                  tvmquant_version=__version__)
    report_text = json_dumps(report) if args.report else None
    export_library_atomic(result.executable, args.output)
    if report_text is not None:
        atomic_write_bytes(args.report, report_text.encode("utf-8"))
    plots = write_plots(result, args.plots, model_path.stem) if args.plots else []
    lat = report["latency_ms"]
    _out(f"tvmquant: mixed precision for {args.model} on {args.target} -> {args.output}")
    _out("  layers:        " + ", ".join(f"{n} {p}" for p, n in report["counts"].items()))
    _out(f"  latency:       predicted {lat['predicted']:.3f} ms, measured "
         + (f"{lat['measured']:.3f} ms ({100 * lat['error']:+.1f}%)" if lat["measured"]
            else "-") + f"; uniform int8 {lat['uniform_int8_measured']:.3f} ms")
    if report.get("knock_on_float"):
        _out("  also float:    " + ", ".join(report["knock_on_float"]) +
             " (a float neighbour took their integer rule; predicted as float)")
    _out(f"  weights:       {report['size_bytes'] / 1e6:.3f} MB "
         f"(uniform int8 {result.uniform['int8']['size'] / 1e6:.3f} MB)")
    _out(f"  sensitivity:   {report['total_sensitivity']:.4g} "
         f"(uniform int8 {result.uniform['int8']['sensitivity']:.4g})")
    if report.get("simulated_divergence"):
        sim = report["simulated_divergence"]
        _out(f"  divergence:    {sim['chosen']:.4g} simulated "
             f"(uniform int8 {sim['uniform_int8']:.4g})")
    for layer in report["layers"]:
        if layer["precision"] != "int8":
            _out(f"    {layer['name']:>14s} {layer['precision']}")
    for path in plots:
        _out(f"  plot:          {path}")
    if args.report:
        _out(f"  report:        {args.report}")
    return 0


def _sanitize(name: str) -> str:
    """TVM's ONNX importer's renaming of a graph input (``input.1`` -> ``input_1``)."""
    return name.replace(".", "_")


def _load_run_inputs(path: str | None, param_names: list[str] | None,
                     arity: int | None) -> list[np.ndarray]:
    """The input arrays in parameter order (by name when the names match, else file order)."""
    if path is None:
        if arity:
            names = f" ({', '.join(param_names)})" if param_names else ""
            raise CLIError(f"the model takes {arity} input(s){names}: give --inputs INPUTS.npz")
        return []
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"inputs file {path!r} does not exist")
    try:
        loaded = np.load(file, allow_pickle=False)
    except Exception as err:
        raise CLIError(f"inputs file {path!r} is not a NumPy .npz file "
                       f"({type(err).__name__}: {err})") from None
    if isinstance(loaded, np.ndarray):  # a single .npy array
        items = [("array", loaded)]
    else:
        with loaded:
            try:
                items = [(key, loaded[key]) for key in loaded.files]
            except Exception as err:
                raise CLIError(f"inputs file {path!r} cannot be read "
                               f"({type(err).__name__}: {err})") from None
    if not items:
        raise CLIError(f"inputs file {path!r} holds no arrays")
    if param_names:
        by_name = {key: arr for key, arr in items}
        if set(by_name) != set(param_names):
            by_name = {_sanitize(key): arr for key, arr in items}
        if len(by_name) == len(items) and set(by_name) == set(param_names):
            return [np.ascontiguousarray(by_name[name]) for name in param_names]
    if arity is not None and len(items) != arity:
        names = f" ({', '.join(param_names)})" if param_names else ""
        raise CLIError(f"inputs file {path!r} has {len(items)} array(s) "
                       f"({', '.join(key for key, _ in items)}) but the model takes {arity} "
                       f"input(s){names}")
    logger.info("passing the inputs in file order: %s", ", ".join(key for key, _ in items))
    return [np.ascontiguousarray(arr) for _, arr in items]


def _flatten(out: Any) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result: list[np.ndarray] = []
    for item in out:
        result.extend(_flatten(item))
    return result


def _cmd_run(args: argparse.Namespace) -> int:
    """``tvmquant run``: load a library, run ``main`` on the CPU, save outputs, time it."""
    if not Path(args.library).is_file():
        raise FileNotFoundError(f"library {args.library!r} does not exist")
    if args.output:
        _check_output_path(args.output, "output", [args.library, args.inputs or ""])
    request_amx_permission()  # (a library built for AMX needs it; a no-op elsewhere)
    try:
        lib = tvm.runtime.load_module(str(args.library))
        vm = relax.VirtualMachine(lib, tvm.cpu())
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CLIError(f"cannot load {args.library!r} as a TVM Relax library: {first}") \
            from None
    arity: int | None
    param_names: list[str] | None
    try:
        arity = int(vm.module["get_function_arity"]("main"))
        param_names = [str(vm.module["get_function_param_name"]("main", i))
                       for i in range(arity)]
    except Exception:  # not fatal: inputs are then passed in file order, unchecked
        arity, param_names = None, None
    arrays = _load_run_inputs(args.inputs, param_names, arity)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, device=dev) for a in arrays]
    try:
        outputs = _flatten(vm["main"](*tensors))
    except Exception as err:
        text = " ".join(str(err).split())
        shapes = ", ".join(f"{_shape_text(a.shape)} {a.dtype}" for a in arrays)
        raise CLIError(f"running {args.library!r} failed (inputs: {shapes}): {text}") from None

    if args.output:
        atomic_save_npz(args.output, **{f"output_{i}": out for i, out in enumerate(outputs)})
    _out(f"tvmquant: ran {args.library} on {len(arrays)} input(s)")
    for i, out in enumerate(outputs):
        _out(f"  output_{i}: {_shape_text(out.shape)} {out.dtype}")
    if args.output:
        _out(f"  saved to {args.output}")

    if args.profile or args.repeat:
        repeat = args.repeat or 10
        timer = vm.time_evaluator("main", dev, number=args.number, repeat=repeat)
        result = timer(*tensors)
        ms = [float(r) * 1e3 for r in result.results]
        _out(f"  latency: median {float(np.median(ms)):.4f} ms (mean {np.mean(ms):.4f}, min "
             f"{np.min(ms):.4f}, max {np.max(ms):.4f}, std {np.std(ms):.4f} ms) over {repeat} "
             f"repeat(s) of {args.number} run(s)")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    """``tvmquant presets``: one line per preset with its weight and activation specs."""
    width = max(len(name) for name in [*PRESETS, NO_QUANTIZATION])
    _out("quantization presets (compile --quantize PRESET):")
    for name, config in PRESETS.items():
        mode = "dynamic" if config.dynamic else f"calibrated ({config.activation.observer})"
        _out(f"  {name:<{width}}  {PRESET_DESCRIPTIONS.get(name, '')}".rstrip())
        _out(f"  {'':<{width}}  weights {config.weight.describe()}; activations "
             f"{config.activation.describe()}, {mode}")
    _out(f"  {NO_QUANTIZATION:<{width}}  no quantization: compile the float model")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    """``tvmquant targets``: the friendly names, their TVM fields and meaning."""
    rows: list[tuple[str, dict]] = [(name, fields) for name, fields in TARGETS.items()]
    try:
        rows.append(("native", host_target()))
    except Exception as err:  # LLVM CPU detection failed: still list the others
        logger.info("cannot detect the host CPU: %s", err)
        rows.append(("native", {"kind": "llvm"}))
    width = max(len(name) for name, _ in rows)
    _out("targets (compile --target NAME, or a TVM target as JSON):")
    for name, fields in rows:
        _out(f"  {name:<{width}}  {json.dumps(fields)}")
        if name in TARGET_DESCRIPTIONS:
            _out(f"  {'':<{width}}  {TARGET_DESCRIPTIONS[name]}")
    _out("'num-cores' defaults to this machine's CPU count. Example of a JSON target:")
    _out('  --target \'{"kind": "llvm", "mcpu": "znver4", "num-cores": 8}\'')
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _error_text(err: BaseException) -> str:
    """One line for a user error; OSErrors without errno noise."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.strerror}: {os.fspath(err.filename)!r}"
    return str(err).strip() or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tvmquant`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 success (also for ``--help``), 2 user error or bad usage, 1 internal
        error, 130 interrupted.
    """
    # TVM's thread pool assumes hyper-threading and uses half the logical CPUs unless told;
    # on a 2-vCPU machine that is one thread. The pool reads this when it first starts.
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse printed the message
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    verbose = int(getattr(args, "verbose", 0) or 0)
    root = logging.getLogger()
    handler: logging.Handler | None = None
    old_level = root.level
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    try:
        with warnings.catch_warnings():
            if not verbose:  # e.g. TVM's "Renaming name input.1 to input_1"
                warnings.simplefilter("ignore")
            return int(args.func(args))
    except BrokenPipeError:  # stdout closed early (``tvmquant presets | head -1``)
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what the shell reports for a program killed by it
    except _USER_ERRORS as err:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        _error(_error_text(err))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as err:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        first = (str(err).strip().splitlines() or [""])[0]
        _error(f"internal error: {type(err).__name__}: {first} (run with --verbose for the "
               "traceback)")
        return 1
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
