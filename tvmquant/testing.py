"""Small models for tests and examples (built with Relax's BlockBuilder)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def small_convnet(seed: int = 0, channels: int = 8, size: int = 12,
                  with_bn: bool = False) -> tvm.IRModule:
    """conv-bias-relu -> [bn] -> conv-bias -> residual add -> relu -> maxpool -> hard-swish
    -> global mean -> flatten -> dense. Input ``x``: (1, 3, size, size) float32."""
    rng = np.random.default_rng(seed)
    c = channels

    def const(*shape, scale=0.3):
        return relax.const(rng.normal(0, scale, shape).astype("float32"))

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


def random_inputs(n: int, shape=(1, 3, 12, 12), seed: int = 1, name: str = "x"):
    """``n`` calibration samples ``{name: ndarray}`` drawn from N(0, 1)."""
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(0, 1, shape).astype("float32")} for _ in range(n)]
