#!/usr/bin/env python
"""Fidelity of quantized PP-OCR models against the FP32 ONNX Runtime reference.

For each model (cls, det at each size, rec) the eval split of :mod:`tvmquant.datasets` is run
through the FP32 ONNX Runtime reference and through every engine; each engine's outputs are
scored against the reference (arg-max agreement for cls, mask IoU and box agreement for det,
decoded-string agreement and character accuracy for rec). All engines are calibrated on the
same calibration split. The Markdown report is printed and written atomically to ``--out``.

Engines (``--engines``):

* ``ort-int8``: ONNX Runtime ``quantize_static`` (QDQ, per-channel S8 weights, U8 activations,
  MinMax); ``ov-fp32``, ``ov-int8``: OpenVINO, FP32 and NNCF INT8 (see ``peers.py``);
* ``tvmquant-int8``: ``tvmquant.quantize(..., config)`` built integer-only with
  ``tvmquant.build``; ``tvmquant-fq``: its simulated-quantization module (``fake_quant_mod``);
* ``tvm-fp32`` (not in the default set): TVM's float build of the imported model, a check of
  the import and of the harness itself.

Example::

    python benchmarks/fidelity.py --models cls,det,rec --out benchmarks/fidelity.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import inspect
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]

ENGINE_TITLES: dict[str, str] = {
    "ort-int8": "ORT int8 (QDQ)",
    "ov-fp32": "OpenVINO fp32",
    "ov-int8": "OpenVINO int8 (NNCF)",
    "tvmquant-int8": "tvmquant int8",
    "tvmquant-int8-tuned": "tvmquant int8 tuned",
    "tvmquant-fq": "tvmquant fake-quant",
    "tvm-fp32": "TVM fp32",
    "tvm-fp32-sched": "TVM fp32 + tvmquant schedules",
    "tvm-fp32-tuned": "TVM fp32 tuned",
}
DEFAULT_ENGINES = ("ort-int8", "ov-fp32", "ov-int8", "tvmquant-int8", "tvmquant-fq")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@functools.cache
def datasets():
    """``tvmquant.datasets``; loaded from its file alone if the package does not import.

    The data and metrics do not need the quantizer, so a broken ``tvmquant`` package (work in
    progress) costs only the tvmquant columns, not the peers'.
    """
    try:
        from tvmquant import datasets as ds
    except Exception as exc:
        path = Path(__file__).resolve().parent.parent / "tvmquant" / "datasets.py"
        _log(f"tvmquant does not import ({type(exc).__name__}: {exc}); loading {path} alone")
        spec = importlib.util.spec_from_file_location("_tvmquant_datasets", path)
        ds = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = ds  # dataclasses look their module up
        spec.loader.exec_module(ds)
    return ds


# --------------------------------------------------------------------------------------------
# Cases and engines
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One model at one static input shape, with its calibration and eval inputs."""

    key: str
    kind: str
    shape: tuple[int, ...]
    path: Path
    calib: list[np.ndarray]
    eval: list[np.ndarray]
    ref: list[np.ndarray] = field(default_factory=list)
    ref_ms: float = 0.0


@dataclass
class Result:
    outputs: list[np.ndarray] | None = None
    error: str | None = None
    prepare_s: float = 0.0
    infer_ms: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


class TvmEngines:
    """tvmquant (and TVM float) engines; one import and one quantization per case."""

    def __init__(self, target: str, config: str, records: Path | None = None) -> None:
        self.target = target
        self.config = config
        self.records = records  # tuning records: <records>/<case key>/{int8,fp32}
        self._import_error: str | None = None
        self._float: dict[str, object] = {}
        self._quant: dict[str, object] = {}

    def _modules(self):
        try:
            import tvm
            from tvm import relax

            import tvmquant
            from tvmquant.frontend import load_onnx
        except ImportError as exc:
            raise RuntimeError(
                f"tvmquant/TVM API not available ({type(exc).__name__}: {exc}); "
                "the peer columns are unaffected") from exc
        return tvm, relax, tvmquant, load_onnx

    def _float_mod(self, case: Case):
        if case.key not in self._float:
            _, _, _, load_onnx = self._modules()
            mod, _params, _inputs = load_onnx(str(case.path), {"x": case.shape})
            self._float[case.key] = mod
        return self._float[case.key]

    def _quantized(self, case: Case):
        if case.key not in self._quant:
            _, _, tvmquant, _ = self._modules()
            kwargs = {}
            if "progress" in inspect.signature(tvmquant.quantize).parameters:
                kwargs["progress"] = False
            samples = [{"x": c} for c in case.calib]
            self._quant[case.key] = tvmquant.quantize(self._float_mod(case), samples,
                                                      config=self.config, **kwargs)
        return self._quant[case.key]

    def _runner(self, ex) -> Runner:
        tvm, relax, _, _ = self._modules()
        vm = relax.VirtualMachine(ex, tvm.cpu())
        main = vm["main"]

        def run(x: np.ndarray) -> np.ndarray:
            out = main(tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32)))
            while not hasattr(out, "numpy"):  # tuple outputs: the first one
                out = out[0]
            return out.numpy()

        return run

    def _database(self, case: Case, precision: str) -> str:
        from tvmquant.tuning import records_database

        if self.records is None:
            raise RuntimeError("no tuning records given (--records)")
        return records_database(self.records / case.key / precision)

    def make(self, engine: str, case: Case) -> Runner:
        tvm, _, tvmquant, _ = self._modules()
        if engine == "tvm-fp32":  # TVM's own tvm.compile, no schedules at all
            target = tvm.target.Target({"kind": "llvm"}) if self.target == "llvm" else (
                self.target)
            return self._runner(tvmquant.build(self._float_mod(case), target, kernels=False,
                                               schedules=False))
        if engine in ("tvm-fp32-sched", "tvm-fp32-tuned"):
            db = self._database(case, "fp32") if engine.endswith("tuned") else None
            return self._runner(tvmquant.build(self._float_mod(case), self.target,
                                               database=db))
        q = self._quantized(case)
        if engine == "tvmquant-fq":
            return self._runner(tvmquant.build(q.fake_quant_mod, target=self.target))
        db = self._database(case, "int8") if engine.endswith("tuned") else None
        return self._runner(tvmquant.build(q.mod, target=self.target, database=db))


def make_engine(engine: str, case: Case, threads: int, tvm_engines: TvmEngines) -> Runner:
    import peers

    if engine == "ort-int8":
        return peers.ort_int8(case.path, case.shape, case.calib, threads)
    if engine == "ov-fp32":
        return peers.openvino_fp32(case.path, case.shape, threads)
    if engine == "ov-int8":
        return peers.openvino_int8(case.path, case.shape, case.calib, threads)
    if engine.startswith(("tvmquant-", "tvm-")):
        return tvm_engines.make(engine, case)
    raise ValueError(f"unknown engine {engine!r}; expected one of {sorted(ENGINE_TITLES)}")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def metric_names(kind: str) -> list[str]:
    return {
        "cls": ["top-1 agreement"],
        "det": ["mask IoU (p > 0.3)", "box agreement (IoU >= 0.9)"],
        "rec": ["exact string agreement", "exact, spaces ignored", "char accuracy (1 - NED)"],
    }[kind]


def score(kind: str, ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, float]:
    ds = datasets()
    names = metric_names(kind)
    if kind == "cls":
        return {names[0]: ds.cls_agreement(ref, test)}
    if kind == "det":
        return {names[0]: ds.det_mask_iou(ref, test), names[1]: ds.det_box_agreement(ref, test)}
    r, t = [ds.rec_text(x) for x in ref], [ds.rec_text(x) for x in test]
    return {names[0]: ds.rec_agreement(r, t), names[1]: ds.rec_agreement(r, t, True),
            names[2]: ds.rec_char_accuracy(r, t)}


def reference_vs_truth(case: Case) -> str | None:
    """FP32 reference accuracy against the ground truth that the data carries."""
    ds = datasets()
    n = len(case.eval)
    if case.kind == "cls":
        labels = np.array(ds.cls_labels("eval", n))
        pred = np.concatenate(case.ref).argmax(-1)
        return f"orientation accuracy {np.mean(pred == labels):.1%} ({n} crops)"
    if case.kind == "rec":
        pairs = [(gt, ds.rec_text(r)) for gt, r in zip(ds.rec_labels("eval", n), case.ref,
                                                      strict=True) if gt is not None]
        if not pairs:
            return None
        gts, preds = [g for g, _ in pairs], [p for _, p in pairs]
        return (f"rendered lines ({len(pairs)}): exact {ds.rec_agreement(gts, preds):.1%}, "
                f"spaces ignored {ds.rec_agreement(gts, preds, True):.1%}, "
                f"char accuracy {ds.rec_char_accuracy(gts, preds):.1%}")
    boxes = [len(ds.det_boxes(r)) for r in case.ref]
    return f"{sum(boxes)} text boxes on {n} pages (min {min(boxes)}, max {max(boxes)} per page)"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def build_cases(models: Sequence[str], det_sizes: Sequence[int], n_calib: int,
                n_eval: int | None) -> list[Case]:
    ds = datasets()
    cases = []
    for kind in models:
        shapes: list[tuple[str, tuple[int, ...], dict]] = []
        if kind == "cls":
            shapes.append(("cls", (1, *ds.CLS_SHAPE), {}))
        elif kind == "rec":
            shapes.append(("rec", (1, 3, ds.REC_HEIGHT, 320), {"rec_width": 320}))
        elif kind == "det":
            for s in det_sizes:
                shapes.append((f"det-{s}", (1, 3, s, s), {"det_size": (s, s)}))
        else:
            raise SystemExit(f"unknown model {kind!r}; expected cls, det or rec")
        for key, shape, kw in shapes:
            avail_calib = len(ds.model_inputs(kind, "calib", None, **kw))
            avail_eval = len(ds.model_inputs(kind, "eval", None, **kw))
            calib = ds.model_inputs(kind, "calib", min(n_calib, avail_calib), **kw)
            evals = ds.model_inputs(kind, "eval", min(n_eval or avail_eval, avail_eval), **kw)
            cases.append(Case(key, kind, shape, ds.model_path(kind), calib, evals))
    return cases


def run_case(case: Case, engines: Sequence[str], threads: int,
             tvm_engines: TvmEngines) -> dict[str, Result]:
    import peers

    ref = peers.ort_fp32(case.path, case.shape, threads)
    ref(case.eval[0])  # warm-up
    t0 = time.perf_counter()
    case.ref = [ref(x) for x in case.eval]
    case.ref_ms = (time.perf_counter() - t0) / len(case.eval) * 1e3
    results: dict[str, Result] = {}
    for engine in engines:
        res = Result()
        _log(f"[{case.key}] {engine}: preparing")
        t0 = time.perf_counter()
        try:
            run = make_engine(engine, case, threads, tvm_engines)
            res.prepare_s = time.perf_counter() - t0
            _log(f"[{case.key}] {engine}: ready in {res.prepare_s:.1f} s, "
                 f"running {len(case.eval)} samples")
            run(case.eval[0])  # warm-up
            t0 = time.perf_counter()
            res.outputs = [run(x) for x in case.eval]
            res.infer_ms = (time.perf_counter() - t0) / len(case.eval) * 1e3
            res.metrics = score(case.kind, case.ref, res.outputs)
            _log(f"[{case.key}] {engine}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in res.metrics.items()))
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            _log(f"[{case.key}] {engine}: FAILED: {res.error}")
            _log(traceback.format_exc(limit=4))
        results[engine] = res
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _versions() -> str:
    from importlib import metadata

    parts = []
    for pkg in ("onnxruntime", "openvino", "nncf", "apache-tvm", "tvmquant", "numpy"):
        try:
            parts.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(cases: Sequence[Case], all_results: dict[str, dict[str, Result]],
           engines: Sequence[str], args: argparse.Namespace) -> str:
    titles = [ENGINE_TITLES[e] for e in engines]
    lines = [
        "# PP-OCR fidelity: quantized engines vs the FP32 ONNX Runtime reference",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by "
        f"`python benchmarks/fidelity.py --models {args.models} --det-sizes {args.det_sizes} "
        f"--engines {args.engines} --n-calib {args.n_calib}"
        + (f" --n-eval {args.n_eval}" if args.n_eval else "")
        + f" --threads {args.threads} --tvm-target {args.tvm_target} "
        f"--tvmquant-config {args.tvmquant_config}`; CPU: {_cpu()}.",
        "",
        f"Versions: {_versions()}.",
        "",
        "Data (`tvmquant.datasets`): eval split, calibration on the disjoint calib split "
        "(same samples for every engine). Each cell compares an engine's outputs with the FP32 "
        "ONNX Runtime outputs on the same inputs.",
        "",
        "| Model | n calib / eval | Metric | " + " | ".join(titles) + " |",
        "|---|---|---|" + "---|" * len(titles),
    ]
    notes: list[str] = []
    for case in cases:
        res = all_results[case.key]
        shape = "x".join(str(d) for d in case.shape)
        for i, name in enumerate(metric_names(case.kind)):
            cells = []
            for e in engines:
                r = res[e]
                cells.append("error" if r.error else f"{r.metrics[name]:.1%}")
            head = (f"{case.key} ({shape})", f"{len(case.calib)} / {len(case.eval)}") if i == 0 \
                else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {name} | " + " | ".join(cells) + " |")
        for e in engines:
            if res[e].error:
                notes.append(f"- {case.key}, {ENGINE_TITLES[e]}: {res[e].error}")
    lines += [
        "",
        f"## Latency (ms per inference, batch 1, {args.threads} threads)",
        "",
        "Indicative only: TVM builds are untuned (`--tvm-target "
        f"{args.tvm_target}`); engine preparation (quantization, compilation) in parentheses, "
        "in seconds.",
        "",
        "| Model | ORT fp32 (reference) | " + " | ".join(titles) + " |",
        "|---|---|" + "---|" * len(titles),
    ]
    for case in cases:
        res = all_results[case.key]
        cells = ["-" if res[e].error else f"{res[e].infer_ms:.1f} ({res[e].prepare_s:.0f} s)"
                 for e in engines]
        lines.append(f"| {case.key} | {case.ref_ms:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "## FP32 reference vs ground truth", ""]
    for case in cases:
        text = reference_vs_truth(case)
        if text:
            lines.append(f"- {case.key}: {text}")
    if notes:
        lines += ["", "## Engine errors", "", *notes]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cls,det,rec", help="comma-separated: cls, det, rec")
    p.add_argument("--det-sizes", default="320,640", help="square det input sizes")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, from {', '.join(ENGINE_TITLES)}")
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples per model")
    p.add_argument("--n-eval", type=int, default=None,
                   help="cap on eval samples per model (default: the whole eval split)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per engine")
    p.add_argument("--tvm-target", default="llvm", help="target for tvmquant.build")
    p.add_argument("--tvmquant-config", default="int8", help="tvmquant preset")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "fidelity.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Before TVM (imported by tvmquant) starts its thread pool.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINE_TITLES]
    if unknown:
        raise SystemExit(f"unknown engines {unknown}; expected some of {list(ENGINE_TITLES)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    det_sizes = [int(s) for s in args.det_sizes.split(",") if s.strip()]

    t_start = time.perf_counter()
    cases = build_cases(models, det_sizes, args.n_calib, args.n_eval)
    _log(f"data ready in {time.perf_counter() - t_start:.1f} s: " + ", ".join(
        f"{c.key} {len(c.calib)} calib / {len(c.eval)} eval" for c in cases))
    tvm_engines = TvmEngines(args.tvm_target, args.tvmquant_config)
    all_results = {c.key: run_case(c, engines, args.threads, tvm_engines) for c in cases}
    report = render(cases, all_results, engines, args)
    print(report)
    write_atomic(args.out, report)
    _log(f"wrote {args.out} ({time.perf_counter() - t_start:.0f} s in total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
