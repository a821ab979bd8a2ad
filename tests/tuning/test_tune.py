"""tvmquant.tuning: a smoke run, resuming, the exactness gate, and tuning through RPC.

Each run uses a handful of trials on the small test network in a temporary work dir (the
default test run stays short); the numbers measured are not asserted, only what was kept.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

import tvmquant
from tvmquant import tuning
from tvmquant.testing import loopback_rpc, random_inputs, small_convnet

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})


@pytest.fixture(scope="module")
def qmod():
    return tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False).mod


def _outputs(ex, sample):
    return tvmquant.run(ex, [sample["x"]])


def test_tune_smoke_and_apply(qmod, tmp_path):
    rep = tuning.tune(qmod, TARGET, tmp_path, trials=8, trials_per_iter=4, progress=False,
                      max_tasks=2, min_share=0.0)
    assert rep.tasks and rep.trials_run >= 1
    assert all(t.default_us is not None for t in rep.tasks)  # every kernel timed
    assert sum(t.trials for t in rep.tasks) >= 1
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved["tasks"]) == len(rep.tasks)
    assert (tmp_path / "records" / "database_workload.json").exists()
    assert tuning.records_database(tmp_path) == str(tmp_path / "records")
    kept = [t for t in rep.tasks if t.kept]
    assert all(t.tuned_us < t.default_us for t in kept)
    if kept:  # the whole model was timed both ways; slower records would have been dropped
        assert rep.end_to_end_default_ms > 0 and rep.end_to_end_tuned_ms > 0
        assert rep.records_dropped == (rep.end_to_end_tuned_ms >= rep.end_to_end_default_ms)
    # the tuned build computes what the default build computes
    tuned = tvmquant.build(qmod, TARGET, database=tuning.records_database(tmp_path))
    plain = tvmquant.build(qmod, TARGET)
    for sample in random_inputs(2, seed=5):
        for a, b in zip(_outputs(tuned, sample), _outputs(plain, sample)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    # resume: the same budget again runs nothing new; a larger one runs only the difference
    again = tuning.tune(qmod, TARGET, tmp_path, trials=8, trials_per_iter=4, progress=False,
                        max_tasks=2, min_share=0.0)
    assert again.trials_run == 0
    more = tuning.tune(qmod, TARGET, tmp_path, trials=12, trials_per_iter=4, progress=False,
                       max_tasks=2, min_share=0.0)
    assert 1 <= more.trials_run <= 4 + 4  # the rest of the budget (a batch may overshoot)


def test_a_fast_wrong_record_is_never_kept(qmod, tmp_path):
    """Plant the 'fastest' candidate, with an int16 accumulator that overflows: rejected."""
    # a target without AVX2 (x86-64-v2): no tvmquant kernels, so the convolutions are
    # tuning tasks (on AVX2 and VNNI targets every conv of this network runs on a kernel)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2", "num-cores": 2})
    tasks = tuning.extract_tasks(qmod, target)
    task = next(t for t in tasks if t.task_name.startswith("fused_conv2d"))
    task_mod = task.dispatched[0]
    (tmp_path / "candidates").mkdir()
    db = ms.database.JSONDatabase(work_dir=str(tmp_path / "candidates"))
    sch = s_tir.Schedule(task_mod)
    conv = next(b for b in sch.get_child_blocks(sch.get_sblock("root"))
                if "conv2d" in sch.get(b).name_hint)
    sch.unsafe_set_dtype(conv, 0, "int16")
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(task_mod), run_secs=[1e-9], target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])))
    rep = tuning.tune(qmod, target, tmp_path, trials=1, progress=False, max_tasks=len(tasks),
                      min_share=0.0)
    result = next(t for t in rep.tasks if t.name == task.task_name)
    assert result.rejected >= 1 and not result.kept
    kept_db = ms.database.JSONDatabase(work_dir=str(tmp_path / "records"))
    assert not kept_db.has_workload(task_mod)


def test_interrupted_run_keeps_its_candidates_and_resumes(tmp_path):
    """SIGINT during the search: candidates stay on disk; the next run resumes from them."""
    script = textwrap.dedent("""
        import sys, tvm, tvmquant
        from tvmquant import tuning
        from tvmquant.testing import random_inputs, small_convnet
        q = tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False)
        target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
        # every task (max_tasks above their number): which 3 of several small kernels are
        # the largest depends on timings, and a resumed run that picks other tasks than the
        # interrupted one does not count the candidates it already has
        rep = tuning.tune(q.mod, target, sys.argv[1], trials=int(sys.argv[2]),
                          trials_per_iter=4, progress=False, max_tasks=99, min_share=0.0)
        print("RESULT", rep.trials_run, rep.interrupted, flush=True)
    """)
    path = tmp_path / "tune_script.py"
    path.write_text(script)
    work = tmp_path / "work"
    records = work / "candidates" / "database_tuning_record.json"
    proc = subprocess.Popen([sys.executable, str(path), str(work), "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 240
    while not (records.exists() and records.read_text().count("\n") >= 4):
        assert proc.poll() is None, "the tuning process ended before it measured anything"
        assert time.monotonic() < deadline, "no candidate measured in 240 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    _, ran, interrupted = line.split()
    assert interrupted == "True" and 4 <= int(ran) < 400
    measured = records.read_text().count("\n")
    json.loads(records.read_text().splitlines()[0])  # the database stays readable
    # resume with a budget just above what is there: only the difference runs
    out = subprocess.run([sys.executable, str(path), str(work), str(measured + 2)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    _, ran, interrupted = next(ln for ln in out.splitlines() if ln.startswith("RESULT")).split()
    assert interrupted == "False" and 1 <= int(ran) <= 4


@pytest.mark.skipif(sys.platform != "linux", reason="the loopback RPC setup uses Linux "
                    "process groups")
def test_tune_through_rpc_tracker(qmod, tmp_path):
    with loopback_rpc("tvmquant-test") as tracker:
        rep = tuning.tune(qmod, TARGET, tmp_path, trials=4, trials_per_iter=4,
                          progress=False, max_tasks=1, min_share=0.0,
                          rpc=tuning.RPCDevice(tracker, "tvmquant-test"))
    measured = [t for t in rep.tasks if t.trials]
    assert measured and rep.trials_run >= 1
    db = ms.database.JSONDatabase(work_dir=str(tmp_path / "candidates"))
    runs = [float(r.run_secs[0]) for r in db.get_all_tuning_records() if r.run_secs]
    assert runs and all(0 < s < 1 for s in runs)  # really measured on the RPC device


def test_rpc_errors_are_clear():
    with pytest.raises(tuning.TuningError, match="HOST:PORT"):
        _ = tuning.RPCDevice("no-port", "k").host_port
    with pytest.raises(tuning.TuningError, match="cannot get device"):
        tuning._Session(TARGET, tuning.RPCDevice(f"127.0.0.1:{_closed_port()}", "k", 2))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_intrinsics_import_whole_and_leave_inspect_as_it_was():
    """The fast import of ``tvm.s_tir.tensor_intrin`` (which ``TuneContext`` does) registers
    every target's intrinsics, CUDA's too, and takes its hint out of ``inspect`` again."""
    script = textwrap.dedent("""
        import inspect, sys
        from tvm.s_tir import TensorIntrin
        from tvmquant import tuning
        assert "tvm.s_tir.tensor_intrin" not in sys.modules
        tuning._import_tensor_intrinsics()
        assert "tvm.s_tir.tensor_intrin.cuda" in sys.modules
        for name in ("dot_16x4_vnni", "dot_4x4_i8i8s32_sdot", "wmma_sync_16x16x16_f16f16f32"):
            TensorIntrin.get(name)
        assert not [f for f in inspect.modulesbyfile if f.startswith("<frozen")]
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


def test_records_database_error(tmp_path):
    with pytest.raises(tuning.TuningError, match="no tuning records"):
        tuning.records_database(tmp_path)


def test_one_work_dir_per_target(tmp_path):
    tuning._check_target(tmp_path, TARGET)
    tuning._check_target(tmp_path, TARGET)  # same target: fine
    other = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    with pytest.raises(tuning.TuningError, match="one work directory per target"):
        tuning._check_target(tmp_path, other)


def test_torn_database_line_is_dropped(tmp_path):
    good = '[0, ["trace", [1e-6], "target", []]]'
    path = tmp_path / "database_tuning_record.json"
    path.write_text(f"{good}\n{good[:17]}")  # killed while appending the second record
    tuning._repair_database(tmp_path)
    assert path.read_text() == f"{good}\n"


def test_records_slower_end_to_end_are_dropped(qmod, tmp_path, monkeypatch):
    """Kernels faster alone, model slower as a whole: the records are not kept."""
    from tvmquant.mixed_precision import latency

    calls = []

    def timing(ex, inputs, **kw):  # default and tuned builds alternate: the tuned one slower
        calls.append(1)
        return float(len(calls))

    monkeypatch.setattr(latency, "time_module", timing)
    monkeypatch.setattr(tuning, "_check_task", lambda task, db, *a: _any_record(db, task))
    rep = tuning.tune(qmod, TARGET, tmp_path, trials=4, trials_per_iter=4, progress=False,
                      max_tasks=1, min_share=0.0)
    # 5 rounds: default 1, 3, 5, 7, 9 (median 5), tuned 2, 4, 6, 8, 10 (median 6)
    assert len(calls) == 10 and rep.records_dropped
    assert (rep.end_to_end_default_ms, rep.end_to_end_tuned_ms) == (5.0, 6.0)
    db = ms.database.JSONDatabase(work_dir=str(tmp_path / "records"))
    assert len(db) == 0
    assert json.loads((tmp_path / "report.json").read_text())["records_dropped"] is True


def _any_record(db, task):
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    return top[0] if top else None
