"""The onnx-graphsurgeon helpers: patches, probe outputs, cleanup and topological sort."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc.core.builder import Builder
from onnx_udfc.core.graph_edit import Patch, cleanup, toposort, with_outputs
from onnx_udfc.core.normalize import normalize
from onnx_udfc.core.ort import session

RNG = np.random.default_rng(0)


def _conv_chain(opset: int = 13) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> y, plus a parallel Sigmoid branch added into y."""
    w1 = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(RNG.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "s1"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feed() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 3, 5, 5)).astype(np.float32)}


def _run(model: onnx.ModelProto, feed: dict, names: list[str] | None = None) -> list[np.ndarray]:
    return session(model).run(names, feed)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# -- probe outputs ----------------------------------------------------------------------------
def test_probe_outputs_read_what_a_direct_run_computes():
    model, feed = _conv_chain(), _feed()
    y = _run(model, feed)[0]
    probe = with_outputs(_copy(model), ["r1", "y", "s1", "r1"])
    assert [o.name for o in probe.graph.output] == ["y", "r1", "s1"]
    r1, s1, y_probe = _run(probe, feed, ["r1", "s1", "y"])
    np.testing.assert_array_equal(y_probe, y)
    # the tensors themselves, as a model ending there computes them
    direct = _copy(model)
    del direct.graph.output[:]
    direct.graph.output.extend([onnx.ValueInfoProto(name="r1"), onnx.ValueInfoProto(name="s1")])
    expected_r1, expected_s1 = _run(direct, feed, ["r1", "s1"])
    np.testing.assert_array_equal(r1, expected_r1)
    np.testing.assert_array_equal(s1, expected_s1)


# -- topological sort -------------------------------------------------------------------------
def test_toposort_orders_a_shuffled_graph():
    model, feed = _conv_chain(), _feed()
    expected = _run(model, feed)[0]
    shuffled = _copy(model)
    nodes = list(shuffled.graph.node)
    order = [4, 2, 3, 1, 0]
    copies = [onnx.NodeProto() for _ in order]
    for copy, i in zip(copies, order, strict=True):
        copy.CopyFrom(nodes[i])
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(copies)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(shuffled)
    assert toposort(shuffled)
    onnx.checker.check_model(shuffled, full_check=True)
    assert sorted(n.name for n in shuffled.graph.node) == sorted(n.name for n in model.graph.node)
    np.testing.assert_array_equal(_run(shuffled, feed)[0], expected)


def test_toposort_keeps_a_sorted_graph_byte_identical():
    model = _conv_chain()
    before = model.SerializeToString()
    assert not toposort(model)
    assert model.SerializeToString() == before


def test_toposort_sees_reads_inside_subgraphs():
    # the If body reads "a" from the outer graph without listing it as an input: the producer
    # of "a" must come before the If although no edge in the node list says so
    body = helper.make_graph([helper.make_node("Neg", ["a"], ["b"])], "body", [],
                             [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body,
                              else_branch=body),
             helper.make_node("Relu", ["x"], ["a"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert toposort(model)
    assert [n.name for n in model.graph.node] == ["relu", "if"]
    onnx.checker.check_model(model, full_check=True)


def test_toposort_of_a_deep_chain_does_not_overflow_the_stack():
    depth = 3000
    nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}")
             for i in range(depth)]
    graph = helper.make_graph(
        nodes[::-1], "deep", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"t{depth}", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert toposort(model)
    assert [n.name for n in model.graph.node] == [f"n{i}" for i in range(depth)]


def test_normalize_sorts_an_unsorted_model():
    model, feed = _conv_chain(), _feed()
    expected = _run(model, feed)[0]
    nodes = list(model.graph.node)
    reversed_nodes = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(reversed_nodes, reversed(nodes), strict=True):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(reversed_nodes)
    normalize(model)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_run(model, feed)[0], expected)


# -- cleanup ----------------------------------------------------------------------------------
def test_cleanup_removes_dead_nodes_and_unread_initializers_in_order():
    model = _conv_chain()
    dead_w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "dead_w")
    model.graph.initializer.append(dead_w)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unread"))
    model.graph.node.extend([helper.make_node("Conv", ["r1", "dead_w"], ["d1"], name="dead1"),
                             helper.make_node("Relu", ["d1"], ["d2"], name="dead2")])
    # an old IR lists initializers as graph inputs too: the unread one goes with its input
    model.graph.input.append(helper.make_tensor_value_info("unread", TensorProto.FLOAT, [3]))
    assert cleanup(model) == 4
    assert [n.name for n in model.graph.node] == ["conv1", "relu1", "sig1", "conv2", "add"]
    assert [t.name for t in model.graph.initializer] == ["w1", "w2"]
    assert [i.name for i in model.graph.input] == ["x"]
    assert cleanup(model) == 0


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_cleanup_keeps_what_only_a_subgraph_reads(op):
    # "a" and the weight "k" are read only inside the body, never listed as the node's inputs
    k = numpy_helper.from_array(np.full(2, 3.0, np.float32), "k")
    body_nodes = [helper.make_node("Mul", ["a", "k"], ["b"])]
    if op == "If":
        body = helper.make_graph(body_nodes, "body", [],
                                 [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
        control = helper.make_node("If", ["cond"], ["y"], name="ctrl", then_branch=body,
                                   else_branch=body)
    else:
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
        body = helper.make_graph(
            body_nodes, "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
        control = helper.make_node("Loop", ["trip", "cond"], ["y"], name="ctrl", body=body)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Neg", ["x"], ["unused"], name="dead"), control]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    inits = [k, numpy_helper.from_array(np.ones(1, np.float32), "unread")]
    if op == "Loop":
        inits.append(numpy_helper.from_array(np.asarray(2, np.int64), "trip"))
    y_shape = [2] if op == "If" else [2, 2]  # a Loop stacks its scan output per iteration
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": np.asarray([-1.0, 2.0], np.float32), "cond": np.asarray(True)}
    expected = _run(model, feed)[0]
    assert cleanup(model) == 2
    assert [n.name for n in model.graph.node] == ["relu", "ctrl"]
    assert "k" in {t.name for t in model.graph.initializer}
    assert "unread" not in {t.name for t in model.graph.initializer}
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_run(model, feed)[0], expected)


# -- patches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [13, 18])
def test_patch_appends_nodes_that_read_host_tensors_by_name(opset):
    model, feed = _conv_chain(opset), _feed()
    patch = Patch(opset)
    # reads the host's activation "c2" and weight "w2" by name: no copy of w2 in the patch
    patch.node("Mul", ["c2", patch.constant("two", np.asarray(2.0, np.float32))], ["c2x2"])
    patch.reduce_to("ReduceMean", "c2x2", [0, 2, 3], "mean", "mean_axes")
    patch.reduce_to("ReduceSum", "w2", [1, 2, 3], "w2_sum", "sum_axes", keepdims=0)
    patch.node("Neg", ["c2"], ["not_needed"])
    nodes, constants = patch.export(["mean", "w2_sum"])
    assert [n.op_type for n in nodes] == ["Mul", "ReduceMean", "ReduceSum"]
    assert "w2" not in {t.name for t in constants}
    host = _copy(model)
    host.graph.node.extend(nodes)
    host.graph.initializer.extend(constants)
    onnx.checker.check_model(host, full_check=True)
    c2, mean, w2_sum = _run(with_outputs(host, ["c2", "mean", "w2_sum"]), feed,
                            ["c2", "mean", "w2_sum"])
    np.testing.assert_allclose(mean, (2 * c2).mean(axis=(0, 2, 3), keepdims=True), rtol=1e-5)
    w2 = numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(w2_sum, w2.sum(axis=(1, 2, 3)), rtol=1e-5)


def test_builder_names_are_fresh_and_append_to_drops_dead_branches():
    model, feed = _conv_chain(), _feed()
    b = Builder(13)
    scaled = b.op("Mul", ["y", b.const(np.asarray(0.5, np.float32))])
    b.op("Relu", [scaled], "dead")  # no output reads it
    total = b.reduce("ReduceSum", scaled, [0, 1, 2, 3], keepdims=0)
    b.op("Identity", [total], output="total")
    names = {o for n in b.graph.nodes for o in (t.name for t in n.outputs)}
    assert len(names) == 4 and "total" in names
    host = _copy(model)
    b.append_to(host.graph, ["total"])
    assert [n.op_type for n in host.graph.node][-3:] == ["Mul", "ReduceSum", "Identity"]
    assert all(n.name == "" for n in host.graph.node[-3:])
    y, got = _run(with_outputs(host, ["total"]), feed, ["y", "total"])
    np.testing.assert_allclose(got, 0.5 * y.sum(), rtol=1e-4)
