"""Graph analysis shared by the quantization passes: layer names and the quantization plan.

Every pass that needs to agree on *which* tensors are quantized (the calibration pass that
exposes them, :class:`InsertFakeQuant` that quantizes them, the report) computes the same
:class:`QuantPlan` from the same float function, so they agree by construction.

Layers are named structurally: the op's short name and its index among the bindings of the
same op in dataflow order (``conv2d_0``, ``add_7``). Names therefore do not depend on variable
names, which differ between importers.

Preconditions: the function is in ANF with its ops in (dataflow) blocks of ``VarBinding`` s,
weights are ``Constant`` s (import with ``keep_params_in_input=False`` or bind parameters).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import tvm
from tvm import relax

from .._compat import Constant, const_value, dtype_of, static_shape

# Ops whose weights are quantized and that compute in integers (anchors of a fused layer).
ANCHOR_OPS = {
    "relax.nn.conv2d": "conv2d",
    "relax.nn.conv2d_transpose": "conv2d_transpose",
    "relax.matmul": "matmul",
}
# Activation ops fused into an anchor's requantization as integer clamps.
CLAMP_OPS = {"relax.nn.relu", "relax.clip"}
# Elementwise ops that, applied to one tensor and scalar constants, form a unary function
# that integer lowering turns into a lookup table (hard-swish, sigmoid, GELU, ...).
UNARY_ELEMENTWISE_OPS = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.clip",
    "relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.exp", "relax.minimum",
    "relax.maximum", "relax.negative", "relax.sqrt", "relax.power", "relax.erf", "relax.abs",
    "relax.nn.gelu", "relax.nn.silu", "relax.nn.leakyrelu", "relax.square",
}
# Ops that only move or select values: their output reuses the input's quantization.
MOVEMENT_OPS = {
    "relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
    "relax.flatten", "relax.strided_slice", "relax.nn.max_pool2d",
}


def is_movement(call: relax.Call) -> bool:
    """Whether an op only moves or selects values (nearest resize included)."""
    name = call.op.name
    if name in MOVEMENT_OPS:
        return True
    return name == "relax.image.resize2d" and str(call.attrs.method) == "nearest_neighbor"


# Binary ops with two activation inputs that have integer rules.
BINARY_OPS = {"relax.add", "relax.multiply"}
# Reductions with integer rules.
POOL_OPS = {"relax.mean", "relax.nn.avg_pool2d"}
CONCAT_OPS = {"relax.concat"}

# Ops with an integer rule in LowerToIntegerOnly (anything else falls back to float).
INTEGER_KINDS = {"anchor", "unary", "movement", "binary", "pool", "concat", "input"}


def short_name(op_name: str) -> str:
    """``relax.nn.conv2d`` -> ``conv2d``."""
    return op_name.split(".")[-1]


def _op_name(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def is_float_tensor(expr) -> bool:
    dt = dtype_of(expr)
    return dt is not None and dt.startswith("float")


def is_scalar_const(expr) -> bool:
    return isinstance(expr, Constant) and const_value(expr).size == 1


def is_channel_const(expr, channels: int, axis: int, ndim: int) -> bool:
    """A constant that broadcasts along one channel axis only (a bias)."""
    if not isinstance(expr, Constant):
        return False
    shape = const_value(expr).shape
    if len(shape) > ndim:
        return False
    shape = (1,) * (ndim - len(shape)) + tuple(shape)
    return all(d == 1 or (i == axis % ndim and d == channels) for i, d in enumerate(shape))


@dataclass
class Layer:
    """One quantization unit: an anchor with its fused epilogue, a unary region, ..."""

    name: str
    op: str  # short op name of the defining binding
    kind: str  # anchor | unary | movement | binary | pool | concat | other
    output: relax.Var  # the value this layer produces (quantized if in plan.quantized)
    inputs: list[relax.Var] = field(default_factory=list)  # activation inputs
    members: list[relax.Var] = field(default_factory=list)  # bindings inside the layer
    weight: Constant | None = None  # the anchor's constant weight
    weight_arg: int | None = None  # which argument of the anchor is the weight
    skipped: bool = False
    reason: str = ""  # why the layer has no integer rule (kind == "other")

    @property
    def integer(self) -> bool:
        return self.kind in INTEGER_KINDS and not self.skipped


@dataclass
class QuantPlan:
    """Which tensors of a function are quantized, and the layers that produce them."""

    layers: list[Layer]
    # Boundary tensors that get a quantize/dequantize pair -> their tensor name.
    quantized: dict[relax.Var, str]
    # Movement-op outputs that reuse their input's quantization parameters.
    inherits: dict[relax.Var, relax.Var]
    # Uses that must keep the float value (skipped layers, function outputs).
    float_users: set[relax.Var]
    bindings: dict[relax.Var, relax.Expr]
    names: dict[relax.Var, str]
    # Quantized tensors read only by lookup-table (unary) activations.
    lut_only: set[relax.Var] = field(default_factory=set)
    # Each variable's readers (bindings), in order.
    users: dict[relax.Var, list[relax.Var]] = field(default_factory=dict)

    def layer_of(self, var: relax.Var) -> Layer | None:
        for layer in self.layers:
            if layer.output.same_as(var):
                return layer
        return None

    def tensor_names(self) -> list[str]:
        return list(self.quantized.values())


def emit_like(builder: relax.BlockBuilder, var: relax.Var, value: relax.Expr) -> relax.Var:
    """Emit ``value`` in place of ``var``'s binding: a dataflow var stays local to its block,
    an output var of a dataflow block stays an output."""
    if isinstance(var, relax.DataflowVar) or not builder.current_block_is_dataflow():
        return builder.emit(value, name_hint=var.name)
    return builder.emit_output(value, name_hint=var.name)


def function_bindings(func: relax.Function) -> list[relax.VarBinding]:
    """All variable bindings of a function body, in order."""
    out = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                out.append(binding)
    return out


def _output_vars(func: relax.Function) -> set[relax.Var]:
    ret = func.body.body
    items = ret.fields if isinstance(ret, relax.Tuple) else [ret]
    return {v for v in items if isinstance(v, relax.Var)}


def layer_names(func: relax.Function) -> dict[relax.Var, str]:
    """Structural names of every op binding: ``conv2d_0``, ``add_3``, ..."""
    counters: collections.Counter[str] = collections.Counter()
    names = {}
    for b in function_bindings(func):
        op = _op_name(b.value)
        if op is None:
            continue
        short = short_name(op)
        names[b.var] = f"{short}_{counters[short]}"
        counters[short] += 1
    return names


def _var_args(call: relax.Call) -> list[relax.Var]:
    return [a for a in call.args if isinstance(a, relax.Var)]


def _used_vars(call: relax.Call) -> list[relax.Var]:
    """Variables a call reads, including those inside tuple arguments (concat)."""
    out = []
    for a in call.args:
        if isinstance(a, relax.Var):
            out.append(a)
        elif isinstance(a, relax.Tuple):
            out.extend(f for f in a.fields if isinstance(f, relax.Var))
    return out


def plan_quantization(func: relax.Function, config) -> QuantPlan:
    """Compute the :class:`QuantPlan` of a float function under a ``QuantConfig``."""
    bindings = function_bindings(func)
    value_of = {b.var: b.value for b in bindings}
    names = layer_names(func)
    users: dict[relax.Var, list[relax.Var]] = collections.defaultdict(list)
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for a in _used_vars(b.value):
                users[a].append(b.var)
        elif isinstance(b.value, relax.Tuple):
            for a in b.value.fields:
                if isinstance(a, relax.Var):
                    users[a].append(b.var)
        elif isinstance(b.value, relax.TupleGetItem) and isinstance(b.value.tuple_value,
                                                                     relax.Var):
            users[b.value.tuple_value].append(b.var)
        elif isinstance(b.value, relax.Var):
            users[b.value].append(b.var)
    outputs = _output_vars(func)
    # Plain aliases of outputs (``gv = lv``) are outputs too, not users.
    for b in reversed(bindings):
        if isinstance(b.value, relax.Var) and b.var in outputs:
            outputs.add(b.value)
            if b.var in users.get(b.value, []):
                users[b.value].remove(b.var)

    def single_use(v: relax.Var) -> bool:
        return len(users[v]) == 1 and v not in outputs

    layers: list[Layer] = []
    internal: set[relax.Var] = set()  # values inside an anchor's fused chain
    root: dict[relax.Var, relax.Var] = {}
    layer_by_output: dict[relax.Var, Layer] = {}

    def op_short(v):
        return short_name(_op_name(value_of[v]))

    # 1. Anchors with their fused epilogue (bias add, then relu/clip).
    for b in bindings:
        op = _op_name(b.value)
        if op not in ANCHOR_OPS or not is_float_tensor(b.var):
            continue
        call = b.value
        weight, weight_arg = None, None
        if isinstance(call.args[1], Constant):
            weight, weight_arg = call.args[1], 1
        elif isinstance(call.args[0], Constant):
            continue  # constant left operand: leave to the generic handling
        shape = static_shape(b.var)
        members = [b.var]
        cur = b.var
        if shape is not None and weight is not None:
            ch_axis = len(shape) - 1 if op == "relax.matmul" else 1
            nxt = users[cur][0] if single_use(cur) else None
            if (nxt is not None and _op_name(value_of[nxt]) == "relax.add"
                    and len(value_of[nxt].args) == 2):
                a0, a1 = value_of[nxt].args
                other = a1 if a0.same_as(cur) else a0
                if is_channel_const(other, shape[ch_axis], ch_axis, len(shape)):
                    members.append(nxt)
                    cur = nxt
        nxt = users[cur][0] if single_use(cur) else None
        if nxt is not None and _op_name(value_of[nxt]) in CLAMP_OPS:
            members.append(nxt)
            cur = nxt
        internal.update(members[:-1])
        layer = Layer(
            name=names[b.var], op=ANCHOR_OPS[op], kind="anchor", output=cur,
            inputs=[a for a in _var_args(call)], members=members, weight=weight,
            weight_arg=weight_arg,
        )
        layers.append(layer)
        layer_by_output[cur] = layer
        root[cur] = cur

    # 2. Everything else, in order: unary regions, movement, binary, pools, fallbacks.
    region_members: dict[relax.Var, list[relax.Var]] = collections.defaultdict(list)
    for b in bindings:
        v = b.var
        if v in internal or v in layer_by_output or not is_float_tensor(v):
            continue
        op = _op_name(b.value)
        if op is None:
            continue
        call = b.value
        act_args = [a for a in _var_args(call) if is_float_tensor(a)]
        roots = {root.get(a, a) for a in act_args}
        scalar_consts_only = all(
            is_scalar_const(a) for a in call.args if isinstance(a, Constant)
        )
        if op in UNARY_ELEMENTWISE_OPS and len(roots) == 1 and scalar_consts_only:
            (r,) = roots
            root[v] = r
            region_members[r].append(v)
            continue
        root[v] = v
        if is_movement(call) and len(act_args) == 1:
            kind = "movement"
        elif op in BINARY_OPS and len(act_args) == 2 and len(call.args) == 2:
            kind = "binary"
        elif op in POOL_OPS and len(act_args) == 1:
            kind = "pool"
        elif op in CONCAT_OPS:
            kind = "concat"
        else:
            kind = "other"
        layer = Layer(name=names[v], op=short_name(op), kind=kind, output=v,
                      inputs=act_args, members=[v])
        if kind == "binary" and single_use(v) and _op_name(value_of[users[v][0]]) in CLAMP_OPS:
            # A ReLU/clip after a residual add is the add's integer clamp.
            clamp = users[v][0]
            internal.add(v)
            layer.members.append(clamp)
            layer.output = clamp
            root[clamp] = clamp
        if kind == "concat":
            tup = call.args[0]
            layer.inputs = [f for f in getattr(tup, "fields", []) if isinstance(f, relax.Var)]
            if not layer.inputs and isinstance(tup, relax.Var):
                t = value_of.get(tup)
                layer.inputs = [f for f in getattr(t, "fields", []) if isinstance(f, relax.Var)]
        if kind == "other":
            layer.reason = f"no integer rule for {short_name(op)}"
        layers.append(layer)
        layer_by_output[layer.output] = layer

    # 3. Unary regions: every member used outside its region is an exit (a LUT of the root).
    for r, members in region_members.items():
        mset = set(members)
        for m in members:
            outside = [u for u in users[m] if u not in mset] or (m in outputs)
            if outside:
                layer = Layer(name=names[m], op=op_short(m), kind="unary", output=m,
                              inputs=[r], members=[x for x in members if x is not None])
                layers.append(layer)
                layer_by_output[m] = layer

    # Skips.
    for layer in layers:
        layer.skipped = config.is_skipped(layer.name, layer.op)

    # 4. Boundary tensors: function inputs and layer outputs that an integer layer produces
    #    or consumes (a tensor between two float-only ops is left alone).
    member_layer: dict[relax.Var, Layer] = {}
    for layer in layers:
        for m in layer.members:
            member_layer.setdefault(m, layer)
    for r, members in region_members.items():  # region intermediates belong to their exits
        for m in members:
            if m not in member_layer:
                exits = [lay for lay in layers if lay.kind == "unary" and lay.inputs == [r]]
                if exits:
                    member_layer[m] = exits[0]

    def feeds_integer_layer(v: relax.Var) -> bool:
        return any(
            (lay := member_layer.get(u)) is not None and lay.integer for u in users.get(v, [])
        )

    quantized: dict[relax.Var, str] = {}
    inherits: dict[relax.Var, relax.Var] = {}
    float_users: set[relax.Var] = set()
    for p in func.params:
        if is_float_tensor(p) and feeds_integer_layer(p):
            quantized[p] = p.name
    order = {b.var: i for i, b in enumerate(bindings)}
    for layer in sorted(layers, key=lambda lay: order[lay.output]):
        v = layer.output
        if not users.get(v) or layer.skipped:
            continue
        if not feeds_integer_layer(v):
            continue  # only float ops consume it: quantizing it would only add error
        if layer.kind == "movement":
            src = layer.inputs[0]
            if src in quantized:
                inherits[v] = src
        quantized[v] = layer.name
    for layer in layers:
        if layer.skipped:
            float_users.update(layer.members)
    lut_only = {
        v for v in quantized
        if v not in inherits and users.get(v)
        and all(u in region_members.get(v, ()) for u in users[v])
    }
    return QuantPlan(layers=layers, quantized=quantized, inherits=inherits, lut_only=lut_only,
                     float_users=float_users, bindings=value_of, names=names,
                     users=dict(users))


def weight_channel_axis(op: str, weight_ndim: int) -> int:
    """The output-channel axis of an anchor's weight.

    OIHW conv2d: 0; IOHW conv2d_transpose: 1; matmul (K, N): the last axis.
    """
    return {"conv2d": 0, "conv2d_transpose": 1}.get(op, weight_ndim - 1)


def weight_reduction_axis(op: str, weight_ndim: int) -> int:
    """The reduction (input-channel) axis of an anchor's weight."""
    return {"conv2d": 1, "conv2d_transpose": 0}.get(op, weight_ndim - 2)
