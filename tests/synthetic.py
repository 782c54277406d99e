"""Small synthetic ONNX graphs for the channel-rule tests, built with ``onnx.helper`` only.

A :class:`Builder` collects nodes and float32 weights (seeded), remembers for every layer which
of its arrays hold its output channels (so a test can zero whole channels for exactness checks)
and turns everything into a ``ModelProto``. The remaining helpers run models in onnxruntime and
inspect the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

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

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
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
    nd = node(model, node_name)
    for t in model.graph.initializer:
        if t.name == nd.input[index]:
            return numpy_helper.to_array(t)
    raise KeyError(nd.input[index])


def attribute(model: onnx.ModelProto, node_name: str, attr: str):
    for a in node(model, node_name).attribute:
        if a.name == attr:
            return helper.get_attribute_value(a)
    return None
