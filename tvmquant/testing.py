"""Small models for tests and examples (built with Relax's BlockBuilder)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import tvm
from tvm import relax


def _normal_consts(rng):
    """``const(*shape, scale=0.3)``: a float32 constant drawn from N(0, scale)."""
    def const(*shape, scale=0.3):
        return relax.const(rng.normal(0, scale, shape).astype("float32"))
    return const


def small_convnet(seed: int = 0, channels: int = 8, size: int = 12,
                  with_bn: bool = False) -> tvm.IRModule:
    """conv-bias-relu -> [bn] -> conv-bias -> residual add -> relu -> maxpool -> hard-swish
    -> global mean -> flatten -> dense. Input ``x``: (1, 3, size, size) float32."""
    rng = np.random.default_rng(seed)
    c = channels
    const = _normal_consts(rng)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, size, size), "float32"))
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(c, 3, 3, 3), padding=1))
            y = bb.emit(relax.op.add(y, const(1, c, 1, 1, scale=0.1)))
            y = bb.emit(relax.op.nn.relu(y))
            if with_bn:
                gamma = relax.const(rng.uniform(0.5, 1.5, c).astype("float32"))
                beta = relax.const(rng.normal(0, 0.1, c).astype("float32"))
                mean = relax.const(rng.normal(0, 0.1, c).astype("float32"))
                var = relax.const(rng.uniform(0.5, 1.5, c).astype("float32"))
                z = bb.emit(relax.op.nn.conv2d(y, const(c, c, 3, 3, scale=0.2), padding=1))
                z = bb.emit(relax.op.nn.batch_norm(z, gamma, beta, mean, var, axis=1,
                                                   training=False))
                z = bb.emit(relax.TupleGetItem(z, 0))
            else:
                z = bb.emit(relax.op.nn.conv2d(y, const(c, c, 3, 3, scale=0.2), padding=1))
                z = bb.emit(relax.op.add(z, const(1, c, 1, 1, scale=0.1)))
            r = bb.emit(relax.op.add(y, z))
            r = bb.emit(relax.op.nn.relu(r))
            r = bb.emit(relax.op.nn.max_pool2d(r, pool_size=2, strides=2))
            d = bb.emit(relax.op.nn.conv2d(r, const(c, 1, 3, 3), padding=1, groups=c))
            d = bb.emit(relax.op.add(d, const(1, c, 1, 1, scale=0.1)))
            # hard-swish: d * clip(d + 3, 0, 6) / 6
            h = bb.emit(relax.op.add(d, relax.const(3.0, "float32")))
            h = bb.emit(relax.op.clip(h, 0, 6))
            h = bb.emit(relax.op.multiply(d, h))
            h = bb.emit(relax.op.divide(h, relax.const(6.0, "float32")))
            g = bb.emit(relax.op.mean(h, axis=[2, 3], keepdims=True))
            f = bb.emit(relax.op.reshape(g, (1, c)))
            o = bb.emit(relax.op.matmul(f, const(c, 4)))
            o = bb.emit(relax.op.add(o, const(4, scale=0.1)))
            out = bb.emit_output(o)
        bb.emit_func_output(out)
    return bb.get()


def binary_convnet(seed: int = 0, channels: int = 64, size: int = 12) -> tvm.IRModule:
    """A network shaped for binary and ternary layers, with 8-bit first and last layers:
    conv-bias-relu (``conv2d_0``) -> conv-bias (``conv2d_1``) -> conv-BatchNorm
    (``conv2d_2``) -> conv stride 2 no padding, bias (``conv2d_3``) -> relu -> global mean
    -> dense (``matmul_0``) -> dense (``matmul_1``) -> relu -> dense (``matmul_2``, 10
    outputs). Input ``x``: (1, 3, size, size)."""
    rng = np.random.default_rng(seed)
    c = channels
    const = _normal_consts(rng)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, size, size), "float32"))
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(c, 3, 3, 3), padding=1))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, const(1, c, 1, 1)))))
            y = bb.emit(relax.op.nn.conv2d(y, const(c, c, 3, 3, scale=0.1), padding=1))
            y = bb.emit(relax.op.add(y, const(1, c, 1, 1, scale=0.1)))
            y = bb.emit(relax.op.nn.conv2d(y, const(c, c, 3, 3, scale=0.1), padding=1))
            bn = [relax.const(rng.uniform(0.5, 1.5, c).astype("float32")),
                  relax.const(rng.normal(0, 0.3, c).astype("float32")),
                  relax.const(rng.normal(0, 0.3, c).astype("float32")),
                  relax.const(rng.uniform(0.5, 1.5, c).astype("float32"))]
            y = bb.emit(relax.TupleGetItem(bb.emit(relax.op.nn.batch_norm(
                y, *bn, axis=1, training=False)), 0))
            y = bb.emit(relax.op.nn.conv2d(y, const(c, c, 3, 3, scale=0.1), strides=2))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, const(1, c, 1, 1)))))
            y = bb.emit(relax.op.reshape(bb.emit(relax.op.mean(y, axis=[2, 3])), (1, c)))
            y = bb.emit(relax.op.matmul(y, const(c, c, scale=0.2)))
            y = bb.emit(relax.op.matmul(y, const(c, c, scale=0.2)))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit(relax.op.matmul(y, const(c, 10, scale=0.2)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def mlp(dims=(64, 128, 256, 128, 10), seed: int = 0) -> tvm.IRModule:
    """matmul -> relu -> ... -> matmul on a ``(1, dims[0])`` input ``x`` (layers ``matmul_i``)."""
    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, dims[0]), "float32"))
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            y = x
            for i, (a, b) in enumerate(itertools.pairwise(dims)):
                w = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype("float32")
                y = bb.emit(relax.op.matmul(y, relax.const(w)))
                if i < len(dims) - 2:
                    y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def random_inputs(n: int, shape=(1, 3, 12, 12), seed: int = 1, name: str = "x"):
    """``n`` calibration samples ``{name: ndarray}`` drawn from N(0, 1)."""
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(0, 1, shape).astype("float32")} for _ in range(n)]


@contextlib.contextmanager
def loopback_rpc(key: str = "local", host: str = "127.0.0.1", timeout_s: float = 60.0):
    """Start TVM's RPC tracker and one RPC server (registered as ``key``) on loopback.

    Yields the tracker address ``"host:port"``; both processes (and the server's workers)
    are stopped on exit. The same commands, run on a board and a host, give the setup that
    ``tvmquant tune --rpc-tracker HOST:PORT --rpc-key KEY`` measures through.
    """
    import tvm.rpc

    def free_port() -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def start(args: list[str]) -> subprocess.Popen:
        # own session: the server's forked workers are stopped with it (one process group)
        return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    port = free_port()
    # --port-end: otherwise a busy port silently moves the tracker to the next free one
    procs = [start(["tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                    "--port-end", str(port + 1), "--silent"])]
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the RPC tracker did not start") from None
                time.sleep(0.1)
        sport = free_port()
        procs.append(start(["tvm.exec.rpc_server", "--tracker", f"{host}:{port}", "--key",
                            key, "--host", host, "--port", str(sport), "--port-end",
                            str(sport + 1), "--silent"]))
        while True:  # until the server has registered its key
            if procs[1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the RPC server did not register with the tracker")
            summary = tvm.rpc.connect_tracker(host, port).summary()
            if summary["queue_info"].get(key, {}).get("free", 0) >= 1:
                break
            time.sleep(0.2)
        yield f"{host}:{port}"
    finally:
        for proc in reversed(procs):
            stop(proc)
