"""What test files share (they never import from one another): small ONNX graphs, running and
inspecting them, and the command line in-process.

A :class:`Builder` collects nodes and seeded float32 weights, remembers which arrays hold each
layer's output channels (so a test can zero whole channels for exactness checks) and builds a
``ModelProto``. A few fixed models whose tests pin exact weights or names are written node by
node (``bn_chain``, ``conv_pair``, ``conv_node``/``bn_node``, ``weight_layer_model`` for
malformed layers); models for corner cases (``float_corner_layers``, ``shared_weight_convs``,
``weight_input_gemm``) are built with it; ``ort_quantized`` quantizes a model with
onnxruntime.quantization.

Longer than 400 lines on purpose: it is the one module test files share code through
(tests/test_test_hygiene.py)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.cli import main
from onnx_udfc.moments.input_range import RANGES

ROOT = Path(__file__).resolve().parents[1]
BATCH = "N"


class Builder:
    """Collects a graph; ``build()`` makes the model. Names are given or generated."""

    def __init__(self, opset: int = 17, seed: int = 0,
                 extra_opsets: dict[str, int] | None = None) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.extra_opsets = dict(extra_opsets or {})
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.output_shapes: dict[str, Sequence[int | str] | None] = {}
        # layer name -> [(array name, axis holding that layer's output channels)]
        self.channel_arrays: dict[str, list[tuple[str, int]]] = {}
        self._count = 0

    # -- basics --------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def input(self, name: str, shape: Sequence[int | str],
              elem_type: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, *names: str, shape: Sequence[int | str] | None = None) -> None:
        """Mark graph outputs; their types are inferred unless ``shape`` is given."""
        self.outputs.extend(names)
        for n in names:
            self.output_shapes[n] = shape

    def const(self, value, name: str | None = None, dtype=None) -> str:
        name = name or self.fresh("const")
        arr = np.asarray(value, dtype=dtype)
        if dtype is None and arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.arrays[name] = arr
        return name

    def ints(self, values, name: str | None = None) -> str:
        return self.const(np.asarray(values, dtype=np.int64), name)

    def weight(self, name: str, shape: Sequence[int], fan_in: int | None = None,
               low: float | None = None) -> str:
        """Random weights ~ N(0, 1/fan_in); ``low`` gives uniform(low, 1) values instead."""
        if low is not None:
            arr = self.rng.uniform(low, 1.0, size=shape)
        else:
            fan = fan_in or int(np.prod(shape[1:])) or 1
            arr = self.rng.standard_normal(shape) / np.sqrt(fan)
        return self.const(arr.astype(np.float32), name)

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None,
           outputs: int | Sequence[str] = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (or the list of names for several outputs)."""
        name = name or self.fresh(op_type.lower())
        if isinstance(outputs, int):
            outs = [name] if outputs == 1 else [f"{name}_out{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name,
                                           domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def track(self, layer: str, *arrays: tuple[str, int]) -> None:
        self.channel_arrays.setdefault(layer, []).extend(arrays)

    # -- layers --------------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int = 3, name: str | None = None,
             stride: int = 1, group: int = 1, bias: bool = True, pad: int | None = None) -> str:
        name = name or self.fresh("conv")
        w = self.weight(f"{name}.weight", [cout, cin // group, k, k])
        ins = [x, w]
        self.track(name, (w, 0))
        if bias:
            b = self.const(0.1 * self.rng.standard_normal(cout), f"{name}.bias")
            ins.append(b)
            self.track(name, (b, 0))
        p = k // 2 if pad is None else pad
        return self.op("Conv", ins, name, kernel_shape=[k, k], pads=[p] * 4,
                       strides=[stride, stride], group=group)

    def conv_t(self, x: str, cin: int, cout: int, k: int = 2, stride: int = 2,
               name: str | None = None) -> str:
        name = name or self.fresh("convt")
        w = self.weight(f"{name}.weight", [cin, cout, k, k], fan_in=cin * k * k)
        b = self.const(0.1 * self.rng.standard_normal(cout), f"{name}.bias")
        self.track(name, (w, 1), (b, 0))
        return self.op("ConvTranspose", [x, w, b], name, kernel_shape=[k, k],
                       strides=[stride, stride])

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        name = name or self.fresh("bn")
        scale = self.weight(f"{name}.scale", [c], low=0.5)
        beta = self.const(0.1 * self.rng.standard_normal(c), f"{name}.beta")
        mean = self.const(0.1 * self.rng.standard_normal(c), f"{name}.mean")
        var = self.weight(f"{name}.var", [c], low=0.5)
        # A zeroed channel stays zero through the BN when its mean and beta are zero.
        self.track(name, (beta, 0), (mean, 0))
        return self.op("BatchNormalization", [x, scale, beta, mean, var], name, epsilon=1e-5)

    def relu(self, x: str, name: str | None = None) -> str:
        return self.op("Relu", [x], name)

    def gemm(self, x: str, k: int, n: int, name: str | None = None, trans_b: int = 0,
             bias: bool = True, bias_shape: Sequence[int] | None = None) -> str:
        name = name or self.fresh("gemm")
        shape = [n, k] if trans_b else [k, n]
        w = self.weight(f"{name}.weight", shape, fan_in=k)
        ins = [x, w]
        self.track(name, (w, 0 if trans_b else 1))
        if bias:
            bshape = list(bias_shape or [n])
            b = self.const(0.1 * self.rng.standard_normal(bshape), f"{name}.bias")
            ins.append(b)
            self.track(name, (b, len(bshape) - 1))
        return self.op("Gemm", ins, name, transB=trans_b)

    def matmul(self, x: str, k: int, n: int, name: str | None = None) -> str:
        name = name or self.fresh("matmul")
        w = self.weight(f"{name}.weight", [k, n], fan_in=k)
        self.track(name, (w, 1))
        return self.op("MatMul", [x, w], name)

    def branches(self, cond: str, then_nodes: Sequence[onnx.NodeProto], then_out: str,
                 else_nodes: Sequence[onnx.NodeProto], else_out: str, name: str = "if",
                 then_weights: dict[str, np.ndarray] | None = None) -> str:
        """An If on ``cond`` whose branches read outer tensors; ``then_weights`` become
        initializers of the then-branch."""
        inits = [numpy_helper.from_array(a, n) for n, a in (then_weights or {}).items()]

        def branch(label: str, nodes: Sequence[onnx.NodeProto], out: str,
                   weights: list[onnx.TensorProto]) -> onnx.GraphProto:
            return helper.make_graph(list(nodes), f"{name}_{label}", [],
                                     [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                    None)], weights)
        return self.op("If", [cond], name, then_branch=branch("then", then_nodes, then_out, inits),
                       else_branch=branch("else", else_nodes, else_out, []))

    def zero(self, layer: str, channels: Sequence[int]) -> None:
        """Make the given output channels of a layer exactly zero (filters, bias, BN shift)."""
        idx = list(channels)
        for name, axis in self.channel_arrays[layer]:
            arr = self.arrays[name].copy()
            sl = [slice(None)] * arr.ndim
            sl[axis] = idx
            arr[tuple(sl)] = 0.0
            self.arrays[name] = arr

    # -- model -----------------------------------------------------------------------------------
    def build(self, name: str = "synthetic") -> onnx.ModelProto:
        inits = [numpy_helper.from_array(a, n) for n, a in self.arrays.items()]
        outs = [helper.make_empty_tensor_value_info(o) for o in self.outputs]
        graph = helper.make_graph(self.nodes, name, self.inputs, outs, inits)
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in self.extra_opsets.items()]
        ir = 7 if self.opset <= 12 else 8
        model = helper.make_model(graph, opset_imports=opsets, ir_version=ir,
                                  producer_name="udfc-tests")
        # Graph outputs get their inferred types; intermediate value_info is not kept.
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, typed in zip(model.graph.output, inferred.graph.output, strict=True):
            given = self.output_shapes.get(out.name)
            if given is not None:
                out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT,
                                                           list(given)))
                continue
            assert typed.type.HasField("tensor_type"), f"no type inferred for '{out.name}'"
            out.type.CopyFrom(typed.type)
        onnx.checker.check_model(model, full_check=True)
        return model


def image(b: Builder, c: int = 3, hw: int = 8, batch: int | str = BATCH) -> str:
    """The graph input ``x``: a batch of ``c``-channel ``hw`` x ``hw`` images."""
    return b.input("x", [batch, c, hw, hw])


def trained_for(range_name: str, batchnorm: bool = False) -> onnx.ModelProto:
    """Conv -> (BN) -> Relu -> Conv whose first layer writes spreads near 1 on photographs in
    ``range_name``, as a layer trained under BatchNorm does on its own inputs."""
    b = Builder(seed=3)
    x = image(b, hw=16)
    h = b.conv(x, 3, 8, name="conv0")
    if batchnorm:
        h = b.bn(h, 8, "bn0")
    b.output(b.conv(b.relu(h, "r0"), 8, 4, name="conv1"))
    model = b.build()
    weight = next(t for t in model.graph.initializer if t.name == "conv0.weight")
    w = onnx.numpy_helper.to_array(weight) / RANGES[range_name][1]
    weight.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), weight.name))
    return model

def bn_relu_convs(b: Builder, x: str, widths: Sequence[int]) -> str:
    """Conv (3x3) -> BN -> Relu per width, named ``c1``, ``bn1``, ...; returns the output."""
    cin = int(b.inputs[0].type.tensor_type.shape.dim[1].dim_value)
    for i, cout in enumerate(widths, 1):
        x = b.relu(b.bn(b.conv(x, cin, cout, name=f"c{i}"), cout, name=f"bn{i}"))
        cin = cout
    return x


def float_corner_layers() -> onnx.ModelProto:
    """Weight layers that cannot be quantized: ``x`` -> c1, c2 (Conv + BN + Relu) -> an If on
    the bool input ``flag`` whose then-branch holds the Conv ``branch_conv`` -> Conv ``c3`` ->
    Reshape -> MatMul ``mm`` with its constant weight as the first operand -> ``y``; beside it
    ``v [8, N]`` -> Gemm ``fc_t`` with transA=1 -> ``z``."""
    b = Builder()
    h = bn_relu_convs(b, image(b), [8, 8])
    flag = b.input("flag", [], TensorProto.BOOL)
    w = b.weight("branch_conv.weight", [8, 8, 1, 1])
    branch_w = b.arrays.pop(w)
    y = b.branches(flag, [helper.make_node("Conv", [h, w], ["t_out"], name="branch_conv")],
                   "t_out", [helper.make_node("Identity", [h], ["e_out"], name="branch_id")],
                   "e_out", name="if1", then_weights={w: branch_w})
    y = b.conv(y, 8, 4, name="c3")
    flat = b.op("Reshape", [y, b.ints([0, 4, 64])], "rs")
    b.output(b.op("MatMul", [b.weight("mm.weight", [6, 4], fan_in=4), flat], "mm"))
    v = b.input("v", [8, BATCH])
    b.output(b.op("Gemm", [v, b.weight("fc_t.weight", [8, 5], fan_in=8)], "fc_t", transA=1))
    return b.build()


def shared_weight_convs(add: bool) -> onnx.ModelProto:
    """``x [N, 3, 8, 8]`` -> Conv ``c1`` (3->4) -> Relu -> ``a`` read by the Convs ``left`` and
    ``right`` through one initializer ``shared.weight`` [8, 4, 3, 3]; their outputs are added
    (``add``: one channel group, both keep the same channels) or concatenated (two groups)
    -> Conv ``head`` -> ``y``."""
    b = Builder()
    a = b.relu(b.conv(image(b), 3, 4, name="c1"))
    w = b.weight("shared.weight", [8, 4, 3, 3])
    left = b.op("Conv", [a, w], "left", kernel_shape=[3, 3], pads=[1] * 4)
    right = b.op("Conv", [a, w], "right", kernel_shape=[3, 3], pads=[1] * 4)
    if add:
        joined, width = b.op("Add", [left, right], "sum"), 8
    else:
        joined, width = b.op("Concat", [left, right], "cat", axis=1), 16
    b.output(b.conv(b.relu(joined), width, 2, k=1, name="head"))
    return b.build()


def weight_input_gemm() -> onnx.ModelProto:
    """c1, c2 (Conv + BN + Relu) -> GlobalAveragePool -> Flatten -> Gemm ``fc`` whose B is
    the graph input ``fc.weight [8, 4]`` (a weight fed at run time) -> ``y``."""
    b = Builder()
    h = bn_relu_convs(b, image(b), [8, 8])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flat")
    b.output(b.op("Gemm", [flat, b.input("fc.weight", [8, 4])], "fc"))
    return b.build()


# -- models written node by node --------------------------------------------------------------
def bn_chain(scale: float = 0.3, with_bn: bool = True) -> onnx.ModelProto:
    """Conv(3->6) [-> BN] -> Relu -> Conv(6->4) -> GAP -> Flatten -> Gemm. Channel 5 is an
    exact positive multiple of channel 0 after BN (filter and folded bias)."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 2
    w1[5] = scale * w1[0]
    gamma = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    beta = rng.standard_normal(6).astype(np.float32)
    mean = rng.standard_normal(6).astype(np.float32) * 0.1
    var = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    gamma[5], var[5] = gamma[0], var[0]
    beta[5], mean[5] = scale * beta[0], scale * mean[0]
    b1 = beta.copy()
    b1[5] = scale * b1[0]
    w2 = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    w3 = rng.standard_normal((10, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(w3, "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1"] + ([] if with_bn else ["b1"]), ["c1"],
                              pads=[1, 1, 1, 1], name="conv1")]
    if with_bn:
        inits += [numpy_helper.from_array(a, n) for a, n in
                  [(gamma, "g"), (beta, "b"), (mean, "m"), (var, "v")]]
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"],
                                      name="bn1"))
    else:
        inits.append(numpy_helper.from_array(b1, "b1"))
        nodes.append(helper.make_node("Identity", ["c1"], ["n1"], name="id"))
    nodes += [helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
              helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def conv_pair(*middle: onnx.NodeProto, opset: int = 17, batch: int | str = "N",
              height: int | str = 8, first_weight: np.ndarray | None = None,
              extra_inits: Sequence[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """``x [batch, 3, height, 8]`` -> Conv ``c1`` (3->8, 3x3, pad 1) -> ``a`` -> the middle
    nodes (default: Relu ``r`` to ``b``) -> Conv ``c2`` (8->4, 1x1) on the last middle output
    -> ``y``. Weights are seeded; ``first_weight`` replaces c1's."""
    middle = middle or (helper.make_node("Relu", ["a"], ["b"], name="r"),)
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) if first_weight is None \
        else first_weight
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             *middle, helper.make_node("Conv", [middle[-1].output[0], "w2"], ["y"], name="c2")]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, height, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, height, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), *extra_inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def bn_node(prefix: str, x: str, c: int, rng: np.random.Generator,
            inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    """A BatchNormalization ``prefix`` writing ``{prefix}_y``; random statistics into ``inits``."""
    names = [f"{prefix}_{k}" for k in ("g", "b", "m", "v")]
    values = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.5, c),
              rng.uniform(0.5, 2.0, c)]
    inits += [numpy_helper.from_array(v.astype(np.float32), n)
              for n, v in zip(names, values, strict=True)]
    return helper.make_node("BatchNormalization", [x, *names], [f"{prefix}_y"], name=prefix)


def conv_node(prefix: str, x: str, cin: int, cout: int, rng: np.random.Generator,
              inits: list[onnx.TensorProto], stride: int = 1, k: int = 3) -> onnx.NodeProto:
    """A bias-free, same-padded Conv ``prefix`` writing ``{prefix}_y``; weight into ``inits``."""
    w = rng.normal(0, 1 / np.sqrt(cin * k * k), (cout, cin, k, k)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"{prefix}_w"))
    return helper.make_node("Conv", [x, f"{prefix}_w"], [f"{prefix}_y"], name=prefix,
                            kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])


# -- running and inspecting ---------------------------------------------------------------------
def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def max_diff(a: onnx.ModelProto, b: onnx.ModelProto, batch: int = 2, seed: int = 1) -> float:
    """Largest absolute output difference of two models on the same random input."""
    feeds = random_feeds(a, batch, seed)
    outs_a, outs_b = run(a, feeds), run(b, feeds)
    assert len(outs_a) == len(outs_b)
    worst = 0.0
    for x, y in zip(outs_a, outs_b, strict=True):
        assert x.shape == y.shape, (x.shape, y.shape)
        worst = max(worst, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
    return worst


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    found = [n for n in model.graph.node if n.name == name]
    assert len(found) == 1, f"node '{name}' not found exactly once"
    return found[0]


def init_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    for t in model.graph.initializer:
        if t.name == name:
            return tuple(int(d) for d in t.dims)
    raise KeyError(name)


def input_shape(model: onnx.ModelProto, node_name: str, index: int = 1) -> tuple[int, ...]:
    """Dims of the initializer feeding input ``index`` of a node (e.g. a Conv's weight)."""
    return init_shape(model, node(model, node_name).input[index])


def init_value(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    return initializers(model)[node(model, node_name).input[index]]


def attribute(model: onnx.ModelProto, node_name: str, attr: str):
    for a in node(model, node_name).attribute:
        if a.name == attr:
            return helper.get_attribute_value(a)
    return None


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# -- analysis and reports ----------------------------------------------------------------------
def analysed(model: onnx.ModelProto) -> api.Analysis:
    """The channel analysis of a normalised copy of ``model`` (``.model`` is that copy)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    api.normalize(m)
    return api.analyse(m)


def compensations(report) -> dict[str, dict]:
    """Layer name -> its ``compensation`` entry, for the layers that have one."""
    return {x["name"]: x["compensation"] for x in report.layers if x.get("compensation")}


def quantizations(report) -> dict[str, dict]:
    """Layer name -> its ``quantization`` entry, for the layers that have one."""
    return {x["name"]: x["quantization"] for x in report.layers if x.get("quantization")}


def removed_channels(report) -> int:
    return sum(g["removed"] for g in report.groups)


# -- command line and tools --------------------------------------------------------------------
def cli(capture: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``onnx-udfc ARGS`` in-process: exit status (argparse's SystemExit too), stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capture.readouterr()
    return code, captured.out, captured.err


def assert_refused(capture: pytest.CaptureFixture[str], out: Path, needle: str,
                   *args: str) -> None:
    """``onnx-udfc ARGS -o OUT`` exits with status 2 and one error line naming the problem, and
    writes neither the output nor a temporary folder."""
    code, _, err = cli(capture, *args, "-o", str(out))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnx-udfc: error:"), err
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".udfc-") for p in out.parent.iterdir())


def tool_module(name: str) -> ModuleType:
    """``tools/NAME.py`` imported by path (``tools`` is not a package); registered in
    ``sys.modules`` first, as dataclasses need."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def conv_bn_relu_model(opset: int) -> onnx.ModelProto:
    """Conv 3->5 (3x3, pad 1), BatchNorm with running mean 0 / var 1, ReLU on 16x16."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    beta = rng.normal(size=5).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w, "w"), (gamma, "g"), (beta, "b"), (np.zeros(5, np.float32), "m"),
        (np.ones(5, np.float32), "v")]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"],
                              name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16, 16])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def weight_layer_model(op: str, weight: np.ndarray, bias: np.ndarray | None = None,
                       x_shape: Sequence[int] = (1, 8, 8, 8), **attrs) -> onnx.ModelProto:
    """``x`` -> ``op`` node ``layer`` with exactly the given weight and bias -> Relu -> ``y``.
    Not checked: a malformed layer may still pass the checker (a short bias, a group that
    does not divide the channels, a weight whose rank shape inference cannot see)."""
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node(op, inputs, ["a"], name="layer", **attrs),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    rank = 2 if op == "Gemm" else len(x_shape)
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])],
        inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def classifier() -> onnx.ModelProto:
    """A float Conv(3->8) -> Relu -> GlobalAveragePool -> Flatten -> MatMul(8->6) -> Relu ->
    Gemm(6->4) on a static 1x3x8x8 image: one layer of each kind a quantizer rewrites."""
    b = Builder(seed=5)
    h = b.relu(b.conv(image(b, 3, 8, batch=1), 3, 8, name="conv"))
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flat")
    h = b.relu(b.matmul(h, 8, 6, name="matmul"))
    b.output(b.gemm(h, 6, 4, name="fc", trans_b=1))
    return b.build()


def ort_quantized(model: onnx.ModelProto, folder: Path, kind: str) -> onnx.ModelProto:
    """``model`` quantized by onnxruntime.quantization: ``dynamic`` (ConvInteger and
    MatMulInteger behind DynamicQuantizeLinear), ``qdq`` (DequantizeLinear weights) or
    ``qoperator`` (QLinearConv, QLinearMatMul, QGemm), calibrated on random inputs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class RandomInputs(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([random_feeds(model, 1, seed) for seed in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    source, target = folder / "float.onnx", folder / f"{kind}.onnx"
    onnx.save(model, str(source))
    if kind == "dynamic":
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    else:
        fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
        quantize_static(str(source), str(target), RandomInputs(), quant_format=fmt)
    return onnx.load(str(target))


def float16_conv_bn(batch: int | str = BATCH) -> onnx.ModelProto:
    """A float16 model, weights and input alike: Conv(3->8, 3x3) -> BatchNorm -> Relu ->
    Conv(8->4, 3x3) on ``x [batch, 3, 8, 8]``."""
    rng = np.random.default_rng(3)

    def half(value, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float16), name)

    inits = [half(rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27), "w1"),
             half(0.1 * rng.standard_normal(8), "b1"), half(rng.uniform(0.5, 1.5, 8), "g"),
             half(0.1 * rng.standard_normal(8), "beta"), half(0.1 * rng.standard_normal(8), "m"),
             half(rng.uniform(0.5, 1.5, 8), "v"),
             half(rng.standard_normal((4, 8, 3, 3)) / np.sqrt(72), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "m", "v"], ["n1"],
                              name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1] * 4, name="conv2")]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [batch, 4, 8, 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def long_named_chain(layers: int = 30, name_length: int = 5000) -> onnx.ModelProto:
    """``layers`` 1x1 Convs in a row whose names are ``name_length`` characters long: a model
    whose ``inspect`` listing is far larger than a pipe's buffer."""
    b = Builder()
    x = image(b, c=4)
    for i in range(layers):
        x = b.conv(x, 4, 4, k=1, name=f"conv{i}_" + "n" * name_length)
    b.output(x)
    return b.build()


def exported_hardswish(b: Builder, x: str, name: str) -> str:
    """HardSwish as Paddle exports it: ``x * clip(x + 3, 0, 6) / 6``, then PP-LCNet's learnable
    ``a * h + b`` (scalars); ``name`` is the last op's output."""
    gate = b.op("Clip", [b.op("Add", [x, b.const(np.float32(3.0))]), b.const(np.float32(0.0)),
                         b.const(np.float32(6.0))])
    h = b.op("Div", [b.op("Mul", [x, gate]), b.const(np.float32(6.0))])
    return b.op("Add", [b.op("Mul", [b.const(np.float32(0.8)), h]), b.const(np.float32(-0.05))],
                name)


def depthwise_block(shared_weight: bool = False, activation: str = "relu",
                    side: bool = False) -> onnx.ModelProto:
    """The MobileNet block: ``x [N, 3, 12, 12]`` -> Conv ``p`` (3->8) -> BN -> Relu ->
    depthwise Conv ``dw`` (8 channels, 3x3) -> BN -> Relu -> Conv ``c`` (8->6, 1x1) -> ``y``.
    ``p``'s filters mix 4 shared ones and ``dw``'s kernels are scaled copies of one, so the
    depthwise outputs are redundant, as in a trained network. ``shared_weight``: a second
    branch (Conv ``p2`` -> Relu -> depthwise ``dw2`` -> ``y2``) reads ``dw``'s weight too.
    ``activation="hardswish"``: both activations are :func:`exported_hardswish` (outputs
    ``p_act``, ``dw_act``). ``side``: a 1x1 Conv ``s`` (8->5) also reads ``p``'s activation
    (an FPN lateral), output ``y_side``."""
    b = Builder(seed=3)

    def act(t: str, name: str) -> str:
        return exported_hardswish(b, t, name) if activation == "hardswish" else b.relu(t)

    x = image(b, hw=12)
    a = act(b.bn(b.conv(x, 3, 8, name="p"), 8), "p_act")
    h = act(b.bn(b.conv(a, 8, 8, group=8, name="dw"), 8), "dw_act")
    basis = b.arrays["p.weight"][:4].reshape(4, -1)
    mixed = b.rng.uniform(0, 1, (8, 4)) @ basis / 2
    b.arrays["p.weight"] = mixed.reshape(8, 3, 3, 3).astype(np.float32)
    scales = b.rng.uniform(0.5, 1.5, (8, 1, 1, 1))
    b.arrays["dw.weight"] = (b.arrays["dw.weight"][:1] * scales).astype(np.float32)
    b.output(b.conv(h, 8, 6, k=1, name="c"))
    if side:
        b.output(b.conv(a, 8, 5, k=1, name="y_side"))
    if shared_weight:
        h2 = b.relu(b.conv(x, 3, 8, name="p2"))
        b.output(b.op("Conv", [h2, "dw.weight"], "dw2", kernel_shape=[3, 3], pads=[1] * 4,
                      group=8))
    return b.build("depthwise_block")


def _redundant(b: Builder, name: str, basis: int) -> None:
    """Make Conv ``name``'s filters positive mixtures of ``basis`` of them: its outputs are
    redundant, as a trained network's are."""
    w = b.arrays[f"{name}.weight"]
    flat = w[:basis].reshape(basis, -1)
    mixed = b.rng.uniform(0, 1, (w.shape[0], basis)) @ flat / 2
    b.arrays[f"{name}.weight"] = mixed.reshape(w.shape).astype(np.float32)


def dense_block() -> onnx.ModelProto:
    """DenseNet's pattern: ``x [N, 3, 12, 12]`` -> Conv ``a`` (3->8) -> Concat [x, a] -> BN
    ``n1`` -> Relu -> Conv ``r1`` (11->6, 1x1); Concat [x, a, r1] -> BN ``n2`` -> Relu -> Conv
    ``y`` (17->5, 1x1) -> ``y``. ``a``'s and ``r1``'s channels reach their next layers only
    through BatchNorms that normalise them with other layers' channels; both have redundant
    filters."""
    b = Builder(seed=4)
    x = image(b, hw=12)
    a = b.conv(x, 3, 8, name="a")
    h1 = b.relu(b.bn(b.op("Concat", [x, a], axis=1), 11, name="n1"))
    r1 = b.conv(h1, 11, 6, k=1, name="r1")
    h2 = b.relu(b.bn(b.op("Concat", [x, a, r1], axis=1), 17, name="n2"))
    b.output(b.conv(h2, 17, 5, k=1, name="y"))
    _redundant(b, "a", 4)
    _redundant(b, "r1", 3)
    return b.build("dense_block")


def grouped_block() -> onnx.ModelProto:
    """AlexNet's pattern: ``x [N, 3, 12, 12]`` -> Conv ``p`` (3->8) -> Relu -> Conv ``g`` (8->6,
    3x3, 2 groups) -> ``y``; ``p``'s filters are redundant."""
    b = Builder(seed=5)
    x = image(b, hw=12)
    h = b.relu(b.conv(x, 3, 8, name="p"))
    b.output(b.conv(h, 8, 6, group=2, name="g"))
    _redundant(b, "p", 3)
    return b.build("grouped_block")


def output_errors(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[float]:
    """RMS error of each output of ``compressed`` against ``original`` on 16 random inputs."""
    feeds = random_feeds(original, batch=16, seed=5)
    return [float(np.sqrt(np.mean((a - b) ** 2)))
            for a, b in zip(run(original, feeds), run(compressed, feeds), strict=True)]


def toy_calibration() -> np.ndarray:
    """Inputs from the toys' test distribution (``x [64, 3, 12, 12]``): their BatchNorm
    statistics are random, so only measured moments describe what their layers see."""
    return np.random.default_rng(9).standard_normal((64, 3, 12, 12)).astype(np.float32)
