"""udfc+ past a reader's BatchNorm and into a grouped Conv (issue 14 item 2).

DenseNet normalises a Concat of every earlier layer's channels with one BatchNorm per reader:
a pruned channel is rebuilt after each reader's BN and activation, from the same producer's
kept channels there, and folded into that reader's Conv. A grouped Conv (AlexNet) reads each
group on its own: a pruned channel is rebuilt from the kept channels of its own group."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.channels.absorbers import ColumnView, absorbers, channel_partition
from onnx_udfc.core.io import tensor_array
from tests.helpers import (
    analysed,
    attribute,
    compensations,
    dense_block,
    grouped_block,
    node,
    output_errors,
    toy_calibration,
)


def _repaired(model: onnx.ModelProto, sequential: bool) -> tuple[onnx.ModelProto, dict]:
    """``udfc+`` at 50 % on measured moments: a valid model whose output error is under half
    plain pruning's; returns it and its compensation entries."""
    compressed, report = api.compress(model, target="fake", prune=0.5, method="udfc+",
                                      sequential=sequential, calibration=toy_calibration())
    onnx.checker.check_model(compressed, full_check=True)
    plain, _ = api.compress(model, target="fake", prune=0.5, method="prune")
    assert output_errors(model, compressed)[0] < 0.5 * output_errors(model, plain)[0]
    return compressed, compensations(report)


@pytest.mark.parametrize("sequential", [False, True])
def test_channels_normalised_with_others_are_rebuilt_after_each_readers_batchnorm(sequential):
    _, entries = _repaired(dense_block(), sequential)
    assert entries["a"]["compensated"] and sorted(entries["a"]["through"]) == ["n1", "n2"]
    assert sorted(entries["a"]["absorbers"]) == ["r1", "y"]
    assert entries["r1"]["compensated"] and entries["r1"]["through"] == ["n2"]


def test_the_paper_method_still_stops_at_the_readers_batchnorm():
    _, report = api.compress(dense_block(), target="fake", prune=0.5, method="udfc")
    entry = compensations(report)["a"]
    assert not entry["compensated"] and "BatchNormalization" in entry["reason"]


def test_a_reader_batchnorm_fed_its_parameters_at_run_time_is_not_crossed():
    model = dense_block()
    scale = node(model, "n1").input[1]
    value = next(t for t in model.graph.initializer if t.name == scale)
    model.graph.initializer.remove(value)
    model.graph.input.append(onnx.helper.make_tensor_value_info(
        scale, onnx.TensorProto.FLOAT, list(value.dims)))
    ctx = analysed(model).channels
    found, reason = absorbers(node(ctx.model, "a"), ctx, True, through_channel_separate=True)
    assert not found and "parameters computed at run time" in reason


@pytest.mark.parametrize("sequential", [False, True])
def test_a_grouped_conv_takes_a_reconstruction_from_each_group(sequential):
    compressed, entries = _repaired(grouped_block(), sequential)
    assert entries["p"]["compensated"] and entries["p"]["absorbers"] == ["g"], entries
    assert attribute(compressed, "g", "group") == 2


def test_the_channels_of_a_grouped_conv_are_partitioned_by_group():
    ctx = analysed(grouped_block()).channels
    found, reason = absorbers(node(ctx.model, "p"), ctx, True, through_channel_separate=True)
    assert reason is None and [a.layer.node.name for a in found] == ["g"]
    classes = ctx.roots()[ctx.tensors[found[0].tensor].slots]
    labels = channel_partition(ctx, found, classes)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_grouped_conv_viewed_dense_writes_back_its_own_blocks():
    model = grouped_block()
    ctx = analysed(model).channels
    found, _ = absorbers(node(ctx.model, "p"), ctx, True, through_channel_separate=True)
    before = tensor_array(ctx.inits["g.weight"]).copy()
    view = ColumnView(ctx, found[0])
    out = view.by_output
    assert out.shape == (8, 6, 9)
    assert not out[:4, 3:].any() and not out[4:, :3].any()  # zero between the groups
    view.write()
    assert np.array_equal(tensor_array(ctx.inits["g.weight"]), before)
