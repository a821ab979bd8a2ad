"""Per-device tuning with MetaSchedule and its XGBoost cost model (``tvmquant tune``).

What is tuned: the kernels that :func:`tvmquant.schedules.pipeline.build_pipeline` would give
a *default* schedule (fused elementwise/requantization kernels, depthwise and transposed
convolutions, pooling, lookup tables, the float layers); tvmquant's tensorized VNNI kernels
are hand-scheduled and are not tasks. The search space is MetaSchedule's own CPU rules
("post-order-apply"); the search is evolutionary, guided by the XGBoost cost model.

A work directory holds everything, so an interrupted run loses nothing::

    WORK/candidates/   every measured candidate (MetaSchedule JSON database, appended as it
                       goes; re-running ``tune`` resumes: each task only gets the trials it
                       has not had yet)
    WORK/records/      the records that passed the checks below: what ``--tuning-records``
                       / ``tvmquant.build(database=...)`` applies (rewritten atomically)
    WORK/report.json   per task: trials, default and tuned time, rejected candidates

Checks before a record is kept (fast and wrong is the trap: see ``../shared`` notes):

1. **exact**: the tuned kernel, built alone, must give the same outputs as the unscheduled
   kernel on random inputs (bit for bit for integer outputs; ``rtol=1e-5`` for float);
   candidates are tried fastest first and wrong ones are counted as rejected;
2. **faster than the default schedule**: both are timed the same way on the device; a tuned
   record slower than tvmquant's default schedule is not kept, so a tuned build is never
   slower than an untuned one, kernel by kernel.

Remote devices: ``rpc=RPCDevice("host:port", "key")`` measures through TVM's RPC tracker
(``python -m tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server --tracker ...``),
and the checks run on the device too.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir, tirx

from .io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

_MS_LOGGER = "tvm.s_tir.meta_schedule"
_STOP = "tvmquant: tuning interrupted"


class TuningError(RuntimeError):
    """Tuning cannot run as asked (bad work directory, unreachable device...)."""


# --------------------------------------------------------------------------------------------
# devices: local or through the RPC tracker
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RPCDevice:
    """A device behind TVM's RPC tracker: ``tracker`` is ``host:port``, ``key`` its key."""

    tracker: str
    key: str
    timeout_s: int = 60

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.tracker.rpartition(":")
        if not host or not port.isdigit():
            raise TuningError(f"--rpc-tracker must be HOST:PORT, got {self.tracker!r}")
        return host, int(port)


def connect_rpc(rpc: RPCDevice):
    """A session on the device behind the tracker (fails fast if the tracker is not there)."""
    host, port = rpc.host_port
    try:
        # fail fast: connect_tracker itself retries for a minute
        socket.create_connection((host, port), timeout=5).close()
        tracker = tvm.rpc.connect_tracker(host, port)
        return tracker.request(rpc.key, session_timeout=rpc.timeout_s)
    except Exception as err:
        raise TuningError(f"cannot get device {rpc.key!r} from the RPC tracker at "
                          f"{rpc.tracker}: {err}") from None


class _Session:
    """Where kernels run for the checks: this process's CPU or an RPC session."""

    def __init__(self, target: tvm.target.Target, rpc: RPCDevice | None):
        self.target, self.rpc = target, rpc
        self._remote = None
        self._loaded: dict = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="tvmquant-tune-")
        self._n = 0
        if rpc is not None:
            self._remote = connect_rpc(rpc)

    @property
    def device(self):
        return self._remote.cpu() if self._remote is not None else tvm.cpu()

    def load(self, prim_mod: tvm.IRModule):
        """Build (once per module object: checks run then time the same kernel) and load."""
        cached = self._loaded.get(id(prim_mod))
        if cached is not None and cached[0] is prim_mod:
            return cached[1]
        module = self._build_and_load(prim_mod)
        self._loaded = {id(prim_mod): (prim_mod, module)}  # keep only the latest one
        return module

    def _build_and_load(self, prim_mod: tvm.IRModule):
        ex = tvm.compile(prim_mod, self.target)
        if self._remote is None:
            return ex.mod
        self._n += 1
        path = os.path.join(self._tmp.name, f"kernel{self._n}.so")
        ex.export_library(path)
        self._remote.upload(path)
        return self._remote.load_module(os.path.basename(path))

    def run(self, prim_mod: tvm.IRModule, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        mod = self.load(prim_mod)
        tensors = [tvm.runtime.tensor(a, device=self.device) for a in args]
        mod["main"](*tensors)
        return [t.numpy() for t in tensors]

    def time_us(self, prim_mod: tvm.IRModule, args: Sequence[np.ndarray]) -> float:
        mod = self.load(prim_mod)
        tensors = [tvm.runtime.tensor(a, device=self.device) for a in args]
        timer = mod.time_evaluator("main", self.device, number=5, repeat=5, min_repeat_ms=20)
        return float(np.median(timer(*tensors).results)) * 1e6

    def close(self):
        self._tmp.cleanup()


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
def _is_scheduled(func) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target, *, kernels: bool = True):
    """The tuning tasks of ``mod``: its fused kernels that have no schedule yet."""
    from tvm.s_tir import meta_schedule as ms

    from .schedules.pipeline import fusion_phases

    with target:
        fused = tvm.transform.Sequential(fusion_phases(target, kernels=kernels))(mod)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    return [t for t in tasks if not _is_scheduled(t.dispatched[0]["main"])]


def _random_args(func: tirx.PrimFunc, seed: int) -> list[np.ndarray]:
    """Inputs for the checks: full range for 8/16-bit data, small values for wider ints
    (full-range int32 biases saturate a requantized output and hide wrong kernels), and
    int64 in [0, 31]: in tvmquant's integer graphs int64 parameters are requantization
    multipliers and shifts, and a shift outside [0, 63] is undefined behaviour that two
    correct schedules may legitimately compute differently."""
    from tvm.s_tir import meta_schedule as ms

    rng = np.random.default_rng(seed)
    out = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], str(info.dtype)
        if dtype == "bool":
            out.append(rng.integers(0, 2, shape).astype(bool))
        elif dtype.startswith(("int", "uint")):
            ii = np.iinfo(dtype)
            lo, hi = (ii.min, ii.max) if ii.bits <= 16 else (max(ii.min, -1000), 1000)
            if ii.bits == 64:
                lo, hi = 0, 31
            out.append(rng.integers(lo, hi, size=shape, dtype=dtype, endpoint=True))
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def _same(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> bool:
    for r, g in zip(ref, got):
        if r.dtype.kind == "f":
            if not np.allclose(r, g, rtol=1e-5, atol=1e-5, equal_nan=True):
                return False
        elif not np.array_equal(r, g):
            return False
    return True


def _default_schedule(task_mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The kernel as the build would schedule it without records (a new module)."""
    from .schedules.cpu import default_rules

    func = task_mod["main"]
    with target:
        for rule in default_rules():
            sch = rule.apply(func, target, False)
            if sch is not None:
                return sch.mod
    return task_mod


def _replay(record) -> tvm.IRModule:
    sch = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    """One kernel's tuning outcome (times in microseconds, measured on the device)."""

    name: str
    weight: int
    trials: int = 0
    default_us: float | None = None
    tuned_us: float | None = None
    rejected: int = 0  # candidates faster than the kept one that computed wrong results
    kept: bool = False
    note: str = ""


@dataclass
class TuneReport:
    work_dir: str
    target: str
    tasks: list[TaskResult] = field(default_factory=list)
    trials_run: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    end_to_end_default_ms: float | None = None  # the whole model, default schedules
    end_to_end_tuned_ms: float | None = None  # the whole model with the kept records
    records_dropped: bool = False  # the kept records did not make the model faster

    @property
    def records_dir(self) -> Path:
        return Path(self.work_dir) / "records"

    def estimated_speedup(self) -> float:
        """Sum over tasks of weight x default time / weight x best kept time."""
        base = sum(t.weight * t.default_us for t in self.tasks if t.default_us)
        best = sum(t.weight * (t.tuned_us if t.kept else t.default_us)
                   for t in self.tasks if t.default_us)
        return base / best if best else 1.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "estimated_speedup": self.estimated_speedup()}


# --------------------------------------------------------------------------------------------
# tuning
# --------------------------------------------------------------------------------------------
def _measure_callback(on_batch: Callable[[int, int], bool]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            # Asked to stop: raise (the batch just measured is already in the database).
            # terminate_task() from here fails a check inside TVM; tune_tasks re-raises
            # any exception as a RuntimeError, which _run_search recognises by _STOP.
            if on_batch(task_id, len(measure_candidates)):
                raise RuntimeError(_STOP)

    return _Progress()


def _records_per_task(db, tasks) -> list[int]:
    counts = []
    for t in tasks:
        mod = t.dispatched[0]
        counts.append(len(db.get_top_k(db.commit_workload(mod), 1 << 30))
                      if db.has_workload(mod) else 0)
    return counts


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    work_dir: str | os.PathLike,
    *,
    trials: int = 256,
    trials_per_iter: int = 16,
    rpc: RPCDevice | None = None,
    kernels: bool = True,
    progress: bool = True,
    seed: int = 0,
    builder_workers: int | None = None,
    max_tasks: int = 16,
    min_share: float = 0.01,
    end_to_end: bool = True,
) -> TuneReport:
    """Tune the kernels of ``mod`` for ``target``; see the module docstring.

    Every kernel is first timed with its default schedule; the ``max_tasks`` heaviest ones
    (each at least ``min_share`` of the model's kernel time) are tuned. ``trials`` is the
    total budget of measured candidates (spread over those tasks by MetaSchedule's gradient
    task scheduler). Running again with the same ``work_dir`` resumes: only the missing
    trials run, then the tuned tasks are checked again.

    With ``end_to_end`` (the default), the whole model is then timed with the default
    schedules and with the kept records (on the same device): records that do not make the
    model faster are dropped (every kernel faster alone does not guarantee it: layouts,
    caches and fusion boundaries interact), and the report says so.
    """
    from tvm.s_tir import meta_schedule as ms

    work = Path(work_dir)
    if work.exists() and not work.is_dir():
        raise TuningError(f"work directory {work} exists and is not a directory")
    (work / "candidates").mkdir(parents=True, exist_ok=True)
    _check_target(work, target)
    _repair_database(work / "candidates")
    t_start = time.perf_counter()
    tasks = extract_tasks(mod, target, kernels=kernels)
    report = TuneReport(str(work), str(target))
    kept: list = []
    if not tasks:
        _write_records(work, [])
        atomic_write_json(work / "report.json", report.as_dict())
        return report

    session = _Session(target, rpc)
    try:
        # 1. where the time is: every kernel with its default schedule, on the device
        results, args, refs = [], [], []
        bar = _bar(len(tasks), "timing default kernels", progress)
        for i, task in enumerate(tasks):
            result, task_args, ref = _time_default(task, session, target, seed + i)
            results.append(result)
            args.append(task_args)
            refs.append(ref)
            bar.update(1)
        bar.close()
        picked = _pick(results, max_tasks, min_share)
        report.tasks = results
        chosen = [tasks[i] for i in picked]
        logger.info("tuning %d of %d kernels (%.0f%% of the default time)", len(chosen),
                    len(tasks), 100 * _share(results, picked))

        # 2. search, resuming what the candidates database already holds
        db = ms.database.JSONDatabase(work_dir=str(work / "candidates"))
        done = sum(_records_per_task(db, chosen))
        remaining = max(0, trials - done)
        logger.info("%d candidates already measured in %s; %d trials to run", done,
                    work / "candidates", remaining)
        if remaining and chosen:
            report.trials_run, report.interrupted = _run_search(
                chosen, target, work, db, remaining, trials_per_iter, rpc, progress, seed,
                builder_workers)

        # 3. checks: exact, and faster than the default
        kept = []
        counts = _records_per_task(db, chosen)
        bar = _bar(len(chosen), "checking tuned kernels", progress)
        for i, n_records in zip(picked, counts):
            record = _check_task(tasks[i], db, session, results[i], args[i], refs[i],
                                 n_records)
            if record is not None:
                kept.append(record)
            bar.update(1)
        bar.close()
        _write_records(work, kept)
        if end_to_end and kept and not report.interrupted:
            _end_to_end_check(mod, target, work, session, report, kernels)
    finally:
        session.close()
    if report.records_dropped:
        _write_records(work, [])
    report.seconds = time.perf_counter() - t_start
    atomic_write_json(work / "report.json", report.as_dict())
    return report


_END_TO_END_ROUNDS = 5


def _end_to_end_check(mod, target, work: Path, session: _Session, report: TuneReport,
                      kernels: bool) -> None:
    """Time the whole model without and with the records; mark them dropped if no faster."""
    from .calibration.runner import input_signature
    from .mixed_precision.latency import time_module
    from .schedules.pipeline import build

    rng = np.random.default_rng(0)
    inputs = []
    for shape, dtype in input_signature(mod).values():
        if np.dtype(dtype).kind == "f":
            inputs.append(rng.normal(0, 1, shape).astype(dtype))
        else:
            inputs.append(rng.integers(0, 8, shape).astype(dtype))
    default = build(mod, target, kernels=kernels)
    tuned = build(mod, target, kernels=kernels, database=str(work / "records"))
    # the two builds in alternating rounds, medians compared: one measurement of each, a
    # minute apart on a shared machine, differed by more than the tuning gained (rec's
    # 1.5x faster softmax was dropped that way)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(_END_TO_END_ROUNDS):
        for ex, out in ((default, times[0]), (tuned, times[1])):
            out.append(time_module(ex, inputs, number=10, repeat=1, remote=session._remote))
    ms_default, ms_tuned = (float(np.median(t)) for t in times)
    report.end_to_end_default_ms, report.end_to_end_tuned_ms = ms_default, ms_tuned
    if ms_tuned >= ms_default:
        report.records_dropped = True
        logger.warning("the tuned kernels do not make the model faster end to end (%.3f ms "
                       "against %.3f ms with the default schedules): records dropped",
                       ms_tuned, ms_default)


def _share(results: Sequence[TaskResult], picked: Sequence[int]) -> float:
    total = sum(r.weight * (r.default_us or 0) for r in results) or 1.0
    return sum(results[i].weight * (results[i].default_us or 0) for i in picked) / total


def _pick(results: Sequence[TaskResult], max_tasks: int, min_share: float) -> list[int]:
    """The heaviest kernels (weight x default time), at most ``max_tasks``, each taking at
    least ``min_share`` of the total: tuning a 1-microsecond kernel cannot pay off."""
    total = sum(r.weight * (r.default_us or 0) for r in results) or 1.0
    order = sorted(range(len(results)),
                   key=lambda i: -(results[i].weight * (results[i].default_us or 0)))
    return [i for i in order[:max_tasks]
            if results[i].weight * (results[i].default_us or 0) >= min_share * total]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task" if "check" in desc else "trial",
                disable=not enabled, leave=False)


def _import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (``TuneContext`` does, for the intrinsics its
    rules name) in seconds rather than a minute.

    Its modules parse some 500 TVMScript intrinsics at import, and each ``@T.prim_func``
    calls ``inspect.stack()``. ``inspect.getmodule`` knows no module for the import system's
    frozen frames (``<frozen importlib._bootstrap>``), so it scans all of ``sys.modules``
    for each such frame of each call: 35 s in a bare process, 67 s in one that has pytest,
    scipy and xgboost loaded (2-vCPU Zen 3). Telling ``inspect`` which module those frames
    belong to (its own cache, and the true answer) for the length of the import cuts that to
    under 10 s; the frames' source stays unavailable, as before.
    """
    name = "tvm.s_tir.tensor_intrin"
    cache = getattr(inspect, "modulesbyfile", None)
    if name in sys.modules or not isinstance(cache, dict):
        __import__(name)
        return
    frozen = {f"<frozen {m}>": m for m in ("importlib._bootstrap",
                                           "importlib._bootstrap_external")}
    added = [f for f in frozen if f not in cache]
    cache.update({f: frozen[f] for f in added})
    try:
        __import__(name)
    finally:
        for f in added:
            cache.pop(f, None)


def _run_search(tasks, target, work, db, trials, per_iter, rpc, progress, seed,
                builder_workers) -> tuple[int, bool]:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    ms_logger = logging.getLogger(_MS_LOGGER)
    old_level = ms_logger.level
    ms_logger.setLevel(logging.WARNING)  # MetaSchedule's tables go to WORK/candidates/logs
    for handler in list(ms_logger.handlers):
        # MetaSchedule's logging setup re-lists this logger's handlers by name and fails on
        # an unnamed one (left by an earlier setup in the same process, or added by a host)
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)
    loggers = get_loggers_from_work_dir(str(work / "candidates"), [t.task_name for t in tasks])
    _import_tensor_intrinsics()
    contexts = [
        ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                       search_strategy=ms.search_strategy.EvolutionarySearch(
                           population_size=128, init_min_unmeasured=32, genetic_num_iters=3),
                       task_name=t.task_name, logger=lg, rand_state=s,
                       num_threads="physical").clone()
        for t, lg, s in zip(tasks, loggers, fork_seed(seed, n=len(tasks)))
    ]
    if rpc is None:
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=50))
    else:
        host, port = rpc.host_port
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                           tracker_key=rpc.key,
                                           session_timeout_sec=rpc.timeout_s),
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50),
            max_workers=1)
    def build_kernel(mod, target, _params):
        # MetaSchedule's default_build minus its `import tvm.s_tir.tensor_intrin`, which costs
        # 13+ s in every fresh builder worker (and times builds out on a busy 2-core machine);
        # a tensorized candidate carries its intrinsic's body already. A local function, so
        # that cloudpickle ships it by value (the worker need not import tvmquant).
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    builder = ms.builder.LocalBuilder(max_workers=builder_workers or os.cpu_count() or 1,
                                      f_build=build_kernel, timeout_sec=120)
    bar = _bar(trials, f"tuning {len(tasks)} kernels", progress)
    state = {"done": 0, "stop": False}

    def on_batch(_task_id: int, n: int) -> bool:
        state["done"] += n
        bar.update(n)
        return state["stop"]

    def on_sigint(_signum, _frame):
        if state["stop"]:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        state["stop"] = True
        logger.warning("interrupted: stopping after the current batch; measured candidates "
                       "are kept in %s (run again to resume)", work / "candidates")

    previous = signal.getsignal(signal.SIGINT)
    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        ms.tune_tasks(
            tasks=contexts, task_weights=[float(t.weight) for t in tasks],
            work_dir=str(work / "candidates"), max_trials_global=trials,
            num_trials_per_iter=per_iter, builder=builder, runner=runner, database=db,
            # (the default XGBModel predicts at random for its first 100 samples: with
            # budgets of a few hundred trials it would hardly ever be used)
            cost_model=ms.cost_model.XGBModel(
                num_warmup_samples=max(8, min(32, trials // 8)),
                num_tuning_cores=os.cpu_count() or 1),
            measure_callbacks=[*ms.MeasureCallback.create("default"),
                               _measure_callback(on_batch)],
            task_scheduler="gradient")
    except RuntimeError as err:
        if not (state["stop"] and _STOP in str(err)):
            raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
        bar.close()
        ms_logger.setLevel(old_level)
    return state["done"], state["stop"]


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _time_default(task, session: _Session, target, seed: int):
    """The kernel's default schedule: checked against the unscheduled kernel, timed."""
    task_mod = task.dispatched[0]
    result = TaskResult(task.task_name, int(task.weight))
    args = _random_args(task_mod["main"], seed)
    reference = None
    try:
        reference = session.run(task_mod, args)
        default = _default_schedule(task_mod, target)
        if not _same(reference, session.run(default, args)):  # never expected
            result.note = "default schedule differs from the unscheduled kernel"
        result.default_us = session.time_us(default, args)
    except Exception as err:
        result.note = f"cannot run this kernel for the checks: {err}".splitlines()[0][:200]
        reference = None
    return result, args, reference


def _check_task(task, db, session: _Session, result: TaskResult, args, reference,
                n_records: int):
    """Keep the fastest exact tuned record if it beats the default schedule."""
    from tvm.s_tir import meta_schedule as ms

    result.trials = n_records
    if not n_records or reference is None or result.default_us is None:
        return None
    task_mod = task.dispatched[0]
    records = db.get_top_k(db.commit_workload(task_mod), 1 << 30)  # fastest first
    for record in records:
        try:
            tuned = _replay(record)
            ok = _same(reference, session.run(tuned, args))
        except Exception:
            ok = False
        if not ok:
            result.rejected += 1
            continue
        result.tuned_us = session.time_us(tuned, args)
        if result.tuned_us < result.default_us:
            result.kept = True
            return ms.database.TuningRecord(
                record.trace, record.workload, [result.tuned_us * 1e-6], record.target,
                record.args_info)
        result.note = "the default schedule is faster"
        return None
    result.note = "no exact candidate"
    return None


def _check_target(work: Path, target: tvm.target.Target) -> None:
    """One work directory per target: MetaSchedule's lookup ignores the target."""
    path = work / "target.json"
    text = str(target)
    if path.exists():
        saved = path.read_text(encoding="utf-8").strip()
        if saved != text:
            raise TuningError(f"{work} holds records tuned for {saved}, not for {text}; use "
                              "one work directory per target")
    else:
        atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _repair_database(path: Path) -> None:
    """Drop a torn last line (a process killed while appending): the rest stays usable."""
    import json

    for name in ("database_workload.json", "database_tuning_record.json"):
        file = path / name
        if not file.exists():
            continue
        lines = file.read_text(encoding="utf-8").splitlines()
        good = []
        for line in lines:
            try:
                json.loads(line)
                good.append(line)
            except ValueError:
                logger.warning("dropping an unreadable line of %s (an interrupted write)",
                               file)
        if len(good) != len(lines):
            tmp = file.with_suffix(".tmp")
            tmp.write_text("".join(f"{ln}\n" for ln in good), encoding="utf-8")
            os.replace(tmp, file)


def _write_records(work: Path, records) -> None:
    """Replace ``work/records`` atomically with a database of ``records``."""
    from tvm.s_tir import meta_schedule as ms

    tmp = Path(tempfile.mkdtemp(prefix=".records-", dir=work))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual directory mode
    try:
        db = ms.database.JSONDatabase(work_dir=str(tmp))
        for rec in records:
            workload = db.commit_workload(rec.workload.mod)
            db.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
        final = work / "records"
        old = work / ".records-old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def records_database(path: str | os.PathLike) -> str:
    """The records directory to apply for a work dir (or a records dir) ``path``."""
    p = Path(path)
    if (p / "records" / "database_workload.json").exists():
        return str(p / "records")
    if (p / "database_workload.json").exists():
        return str(p)
    raise TuningError(f"no tuning records in {p} (expected {p}/records/database_*.json, "
                      "written by `tvmquant tune`)")


__all__ = ["RPCDevice", "TaskResult", "TuneReport", "TuningError", "extract_tasks",
           "records_database", "tune"]
