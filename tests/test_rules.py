"""End-to-end tests of every channel rule on small synthetic graphs (onnx.helper only, no torch).

Each family of rules has a model factory ``f(zero=False)``. With ``zero=True`` the factory makes
some channels exactly zero (filters, biases, BN shifts) so that an l1 pruning at ratio 0.25
removes exactly those channels; the pruned model must then give the same outputs as the
original. That *exactness* check is the strongest test of the index maps. The factories are run
through three generic checks (ratio 0 is the identity, ratio 0.5 gives a valid and smaller model,
exactness) and each family has a test of its group structure and rewritten shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.channels.plan import COUPLED_REASON
from tests.helpers import (
    BATCH,
    Builder,
    analysed,
    attribute,
    image,
    init_value,
    input_shape,
    max_diff,
    node,
    random_feeds,
    removed_channels,
    run,
)

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)
EXACT_RATIO = 0.25


# -- helpers -----------------------------------------------------------------------------------
def group_of(a: api.Analysis, tensor: str):
    found = [g for g in a.groups if tensor in g.tensors]
    assert len(found) == 1, f"'{tensor}' is in {len(found)} groups"
    return found[0]


def compress(model: onnx.ModelProto, ratio: float, **kw):
    m, rep = api.compress(model, prune=ratio, **kw)
    onnx.checker.check_model(m, full_check=True)
    return m, rep


def zero_if(b: Builder, zero: bool, channels: dict[str, list[int]]) -> None:
    if zero:
        for layer, idx in channels.items():
            b.zero(layer, idx)


# -- 1. Conv -> BN -> Relu -> Conv ----------------------------------------------------------------
def chain(zero=False):
    b = Builder(seed=1)
    h = b.relu(b.bn(b.conv(image(b), 3, 8, name="conv1", bias=False), 8, "bn1"), "relu1")
    h = b.relu(b.bn(b.conv(h, 8, 8, name="conv2"), 8, "bn2"), "relu2")
    b.output(b.conv(h, 8, 4, name="conv3"))
    zero_if(b, zero, {"conv1": [1, 5], "bn1": [1, 5], "conv2": [0, 6], "bn2": [0, 6]})
    return b.build()


def test_chain_groups_and_shapes():
    a = analysed(chain())
    assert [(g.size, g.prunable, g.coupled) for g in a.groups] == \
        [(8, 8, False), (8, 8, False), (4, 0, False)]
    g1 = group_of(a, "conv1")
    assert g1.producers == ["conv1"] and {"bn1", "relu1"} <= set(g1.tensors)
    assert group_of(a, "conv3").reasons() == ["4x reaches graph output 'conv3'"]
    m, rep = compress(chain(), 0.5, target="fake", method="prune")
    assert [(g["removed"], g["kept"]) for g in rep.groups] == [(4, 4), (4, 4), (0, 4)]
    assert input_shape(m, "conv1") == (4, 3, 3, 3)
    assert len(node(m, "conv1").input) == 2  # no bias appeared
    for i in range(1, 5):
        assert input_shape(m, "bn1", i) == (4,)
    assert input_shape(m, "conv2") == (4, 4, 3, 3)
    assert input_shape(m, "conv2", 2) == (4,)
    assert input_shape(m, "conv3") == (4, 4, 3, 3)
    assert input_shape(m, "conv3", 2) == (4,)
    assert rep.params_after < rep.params_before and rep.macs_after < rep.macs_before


# -- 2. residual Add ---------------------------------------------------------------------------
def residual(zero=False):
    b = Builder(seed=2)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    left = b.bn(b.conv(r0, 8, 8, name="conva"), 8, "bna")
    right = b.conv(r0, 8, 8, k=1, name="convb")
    s = b.relu(b.op("Add", [left, right], "add"), "radd")
    b.output(b.conv(s, 8, 4, name="convc"))
    zero_if(b, zero, {"conv0": [2, 7], "conva": [3, 6], "bna": [3, 6], "convb": [3, 6]})
    return b.build()


def test_residual_coupling():
    a = analysed(residual())
    g = group_of(a, "add")
    assert (g.size, g.prunable, g.coupled) == (8, 8, True)
    assert sorted(g.producers) == ["conva", "convb"]
    assert {"bna", "convb", "radd"} <= set(g.tensors)
    assert group_of(a, "r0").coupled is False
    # Default policy: the coupled group is fixed with the coupling reason.
    m, rep = compress(residual(), 0.5, target="fake", method="prune")
    rg = rep.groups[g.id]
    assert rg["channels"] == 8 and rg["removed"] == 0 and rg["prunable"] == 0
    assert rg["fixed_reasons"] == [f"8x {COUPLED_REASON}"]
    assert rep.groups[group_of(a, "r0").id]["removed"] == 4
    assert input_shape(m, "conva") == (8, 4, 3, 3)
    assert input_shape(m, "convb") == (8, 4, 1, 1)
    # prune_coupled: both producers lose the same channels.
    m, rep = compress(residual(), 0.5, prune_coupled=True, target="fake", method="prune")
    assert rep.groups[g.id]["removed"] == 4
    assert input_shape(m, "conva") == (4, 4, 3, 3)
    assert input_shape(m, "convb") == (4, 4, 1, 1)
    assert input_shape(m, "bna", 3) == (4,)
    assert input_shape(m, "convc") == (4, 4, 3, 3)


# -- 3. n-ary Sum (opset 9) ------------------------------------------------------------------
def sum_residual(zero=False):
    b = Builder(opset=9, seed=3)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    pa = b.conv(r0, 8, 8, name="conva")
    pb = b.bn(b.conv(r0, 8, 8, k=1, name="convb"), 8, "bnb")
    pc = b.conv(r0, 8, 8, name="convc")
    s = b.relu(b.op("Sum", [pa, pb, pc], "sum"), "rsum")
    b.output(b.conv(s, 8, 4, name="convd"))
    zero_if(b, zero, {"conv0": [0, 4], "conva": [1, 5], "convb": [1, 5], "bnb": [1, 5],
                      "convc": [1, 5]})
    return b.build()


def test_sum_residual_opset9():
    a = analysed(sum_residual())
    g = group_of(a, "sum")
    assert (g.size, g.prunable, g.coupled) == (8, 8, True)
    assert sorted(g.producers) == ["conva", "convb", "convc"]
    m, rep = compress(sum_residual(), 0.5, target="fake", method="prune")
    assert rep.groups[g.id]["removed"] == 0
    m, rep = compress(sum_residual(), 0.5, prune_coupled=True, target="fake", method="prune")
    assert rep.groups[g.id]["removed"] == 4
    for name in ("conva", "convc"):
        assert input_shape(m, name) == (4, 4, 3, 3)
    assert input_shape(m, "convb") == (4, 4, 1, 1)
    assert input_shape(m, "convd") == (4, 4, 3, 3)


# -- 4. Concat on the channel axis -----------------------------------------------------------
def concat(zero=False):
    b = Builder(seed=4)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    pa = b.relu(b.conv(r0, 8, 6, name="conva"), "ra")
    pb = b.relu(b.conv(r0, 8, 10, k=1, name="convb"), "rb")
    cat = b.op("Concat", [pa, pb], "cat", axis=1)
    h = b.relu(b.bn(cat, 16, "bncat"), "rcat")
    b.output(b.conv(h, 16, 4, name="convc"))
    # conva channel 1 and convb channels 2, 7, 9 sit at 1, 8, 13, 15 of the concat.
    zero_if(b, zero, {"conv0": [3, 5], "conva": [1], "convb": [2, 7, 9],
                      "bncat": [1, 8, 13, 15]})
    return b.build()


def densenet(zero=False):
    b = Builder(seed=5)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    c1 = b.relu(b.conv(r0, 8, 4, name="conv1"), "r1")
    cat1 = b.op("Concat", [r0, c1], "cat1", axis=1)
    c2 = b.relu(b.conv(b.relu(b.bn(cat1, 12, "bn1"), "rb1"), 12, 4, name="conv2"), "r2")
    cat2 = b.op("Concat", [cat1, c2], "cat2", axis=-3)
    h = b.relu(b.bn(cat2, 16, "bn2"), "rb2")
    b.output(b.conv(h, 16, 4, name="conv3"))
    zero_if(b, zero, {"conv0": [0, 1], "conv1": [2], "conv2": [3], "bn1": [0, 1, 10],
                      "bn2": [0, 1, 10, 15]})
    return b.build()


def test_concat_offsets():
    a = analysed(concat())
    g = group_of(a, "cat")
    assert (g.size, g.prunable, g.coupled) == (16, 16, False)
    assert sorted(g.producers) == ["conva", "convb"]
    assert {"ra", "rb", "bncat", "rcat"} <= set(g.tensors)
    m, _ = compress(concat(zero=True), EXACT_RATIO, target="fake", method="prune")
    assert input_shape(m, "conva") == (5, 6, 3, 3)
    assert input_shape(m, "convb") == (7, 6, 1, 1)
    assert input_shape(m, "bncat", 1) == (12,)
    assert input_shape(m, "convc") == (4, 12, 3, 3)
    # The surviving BN statistics are the ones of the surviving concat positions.
    keep = [i for i in range(16) if i not in (1, 8, 13, 15)]
    np.testing.assert_array_equal(init_value(m, "bncat", 4),
                                  init_value(concat(zero=True), "bncat", 4)[keep])


def test_densenet_concat_chain():
    a = analysed(densenet())
    g = group_of(a, "cat2")
    assert (g.size, g.prunable, g.coupled) == (16, 16, False)
    assert sorted(g.producers) == ["conv0", "conv1", "conv2"]
    assert {"r0", "cat1", "bn1", "r1", "r2"} <= set(g.tensors)
    m, rep = compress(densenet(zero=True), EXACT_RATIO, target="fake", method="prune")
    assert removed_channels(rep) == 4
    assert input_shape(m, "conv0") == (6, 3, 3, 3)
    assert input_shape(m, "conv1") == (3, 6, 3, 3)
    assert input_shape(m, "conv2") == (3, 9, 3, 3)
    assert input_shape(m, "conv3") == (4, 12, 3, 3)


def test_concat_inputs_each_give_their_share():
    """Uniform pruning takes the ratio from every layer of a Concat. Ranking the l1 norms of
    two layers against each other would empty the one with the smaller filters (a folded BN
    scales each layer differently): ddddocr's detector lost every box that way."""
    b = Builder(seed=4)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    pa = b.relu(b.conv(r0, 8, 12, name="conva"), "ra")
    pb = b.relu(b.conv(r0, 8, 20, k=1, name="convb"), "rb")
    b.output(b.conv(b.op("Concat", [pa, pb], "cat", axis=1), 32, 4, name="convc"))
    model = b.build()
    small = next(t for t in model.graph.initializer if t.name == "conva.weight")
    scaled = onnx.numpy_helper.to_array(small) * 1e-3
    small.CopyFrom(onnx.numpy_helper.from_array(scaled, small.name))
    assert group_of(analysed(model), "cat").parts is not None
    m, _ = compress(model, 0.25, target="fake", method="prune")
    assert input_shape(m, "conva")[0] == 9   # 12 - 3
    assert input_shape(m, "convb")[0] == 15  # 20 - 5
    assert input_shape(m, "convc")[1] == 24


def concat_spatial(zero=False):
    """Concat along H of two conv outputs: their channels are tied like a residual Add."""
    b = Builder(seed=6)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    pa = b.conv(r0, 8, 8, name="conva")
    pb = b.conv(r0, 8, 8, name="convb")
    cat = b.relu(b.op("Concat", [pa, pb], "cat", axis=2), "rcat")
    b.output(b.conv(cat, 8, 4, name="convc"))
    zero_if(b, zero, {"conv0": [2, 3], "conva": [0, 5], "convb": [0, 5]})
    return b.build()


def test_concat_on_other_axis_couples():
    a = analysed(concat_spatial())
    g = group_of(a, "cat")
    assert (g.size, g.coupled) == (8, True)
    assert sorted(g.producers) == ["conva", "convb"]
    m, _ = compress(concat_spatial(), 0.5, prune_coupled=True, target="fake", method="prune")
    assert input_shape(m, "conva") == (4, 4, 3, 3) and input_shape(m, "convb") == (4, 4, 3, 3)


def concat_twice(zero=False):
    """Concat of a tensor with itself: every channel appears twice downstream."""
    b = Builder(seed=26)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    b.output(b.conv(b.op("Concat", [r0, r0], "cat", axis=1), 16, 4, name="conv1"))
    zero_if(b, zero, {"conv0": [1, 4]})
    return b.build()


def test_concat_of_a_tensor_with_itself():
    a = analysed(concat_twice())
    g = group_of(a, "cat")
    assert (g.size, g.prunable) == (8, 8)
    m, _ = compress(concat_twice(zero=True), EXACT_RATIO, target="fake", method="prune")
    assert input_shape(m, "conv1") == (4, 12, 3, 3)
    kept = [i for i in range(16) if i % 8 not in (1, 4)]
    np.testing.assert_array_equal(init_value(m, "conv1"),
                                  init_value(concat_twice(zero=True), "conv1")[:, kept])


# -- 5. Split on the channel axis --------------------------------------------------------------
SPLITS = {  # mode: (opset, channels, sizes before, zeroed channels, sizes after)
    "input": (17, 16, [6, 10], [1, 2, 3, 9], [3, 9]),
    "equal": (17, 16, [8, 8], [1, 2, 3, 9], [5, 7]),
    "num_outputs": (18, 10, [4, 4, 2], [0, 5, 9], [3, 3, 1]),
    "attr9": (9, 16, [6, 10], [1, 2, 3, 9], [3, 9]),
    "attr11": (11, 16, [6, 10], [1, 2, 3, 9], [3, 9]),
}


def split(mode, zero=False):
    opset, c, sizes, zeroed, _ = SPLITS[mode]
    b = Builder(opset=opset, seed=7)
    r0 = b.relu(b.conv(image(b), 3, c, name="conv0"), "r0")
    n = len(sizes)
    if mode == "input":
        parts = b.op("Split", [r0, b.ints(sizes, "split_sizes")], "split", outputs=n, axis=1)
    elif mode == "equal":
        parts = b.op("Split", [r0], "split", outputs=n, axis=1)
    elif mode == "num_outputs":
        parts = b.op("Split", [r0], "split", outputs=n, axis=1, num_outputs=n)
    else:
        parts = b.op("Split", [r0], "split", outputs=n, axis=1, split=sizes)
    convs = [b.conv(p, s, 4, name=f"conv_{i}") for i, (p, s) in enumerate(zip(parts, sizes,
                                                                                 strict=True))]
    b.output(b.op("Sum", convs, "sum"))
    zero_if(b, zero, {"conv0": zeroed})
    return b.build()


def split_sizes(m: onnx.ModelProto) -> list[int]:
    sp = node(m, "split")
    if len(sp.input) > 1 and sp.input[1]:
        return init_value(m, "split").tolist()
    value = attribute(m, "split", "split")
    assert value is not None, "pruned Split has neither a split input nor attribute"
    return list(value)


@pytest.mark.parametrize("mode", sorted(SPLITS))
def test_split(mode):
    _, c, sizes, _, after = SPLITS[mode]
    a = analysed(split(mode))
    g = group_of(a, "r0")
    assert (g.size, g.prunable, g.coupled) == (c, c, False)
    outs = list(node(a.model, "split").output)
    assert set(outs) <= set(g.tensors)
    assert [len(a.channels.tensors[o].slots) for o in outs] == sizes
    m, rep = compress(split(mode, zero=True), EXACT_RATIO, target="fake", method="prune")
    assert split_sizes(m) == after
    for i, s in enumerate(after):
        assert input_shape(m, f"conv_{i}") == (4, s, 3, 3)
    assert max_diff(split(mode, zero=True), m) < 1e-5


# -- 6. channel Pad ('option A' shortcut) ------------------------------------------------------
PADS = (9, 11, 17, 18)


def pad_shortcut(opset, zero=False):
    b = Builder(opset=opset, seed=8)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    b1 = b.bn(b.conv(r0, 8, 16, name="conv1", stride=2), 16, "bn1")
    if opset < 10:  # no Slice steps: subsample with a 1x1 pool
        sub = b.op("MaxPool", [r0], "sub", kernel_shape=[1, 1], strides=[2, 2])
    else:
        sub = b.op("Slice", [r0, b.ints([0, 0]), b.ints([INT64_MAX, INT64_MAX]),
                             b.ints([2, 3]), b.ints([2, 2])], "sub")
    pads = [0, 4, 0, 0, 0, 4, 0, 0]
    if opset < 11:
        padded = b.op("Pad", [sub], "pad", pads=pads, mode="constant", value=0.0)
    elif opset == 11:
        padded = b.op("Pad", [sub, b.ints(pads, "pads"), b.const(np.float32(0.0))], "pad")
    elif opset == 17:  # pads from a Constant node, as exporters write them
        cnode = b.op("Constant", [], "pads_const",
                     value=onnx.numpy_helper.from_array(np.asarray(pads, np.int64)))
        padded = b.op("Pad", [sub, cnode], "pad", mode="constant")
    else:  # opset 18: pads for the listed axes only
        padded = b.op("Pad", [sub, b.ints([4, 4], "pads"), "", b.ints([1], "pad_axes")], "pad")
    s = b.relu(b.op("Add", [b1, padded], "add"), "radd")
    b.output(b.conv(s, 16, 4, name="conv2"))
    # Padded channels 0 and 2; conv1 channels 5 and 9 are tied to conv0 channels 1 and 5.
    zero_if(b, zero, {"conv1": [0, 2, 5, 9], "bn1": [0, 2, 5, 9], "conv0": [1, 5]})
    return b.build()


def pad_amounts(m: onnx.ModelProto) -> list[int]:
    pad = node(m, "pad")
    if len(pad.input) > 1 and pad.input[1]:
        return init_value(m, "pad").tolist()
    return list(attribute(m, "pad", "pads"))


@pytest.mark.parametrize("opset", PADS)
def test_pad_shortcut(opset):
    a = analysed(pad_shortcut(opset))
    g = group_of(a, "add")
    assert (g.size, g.prunable, g.coupled) == (16, 16, True)
    assert {"r0", "sub", "pad", "bn1"} <= set(g.tensors)
    assert sorted(g.producers) == ["conv0", "conv1"]
    _, rep = compress(pad_shortcut(opset), 0.5, target="fake", method="prune")
    assert removed_channels(rep) == 0
    m, rep = compress(pad_shortcut(opset, zero=True), EXACT_RATIO, prune_coupled=True,
        target="fake", method="prune")
    assert removed_channels(rep) == 4
    expected = [2, 4] if opset == 18 else [0, 2, 0, 0, 0, 4, 0, 0]
    assert pad_amounts(m) == expected
    assert input_shape(m, "conv0") == (6, 3, 3, 3)
    assert input_shape(m, "conv1") == (12, 6, 3, 3)
    assert input_shape(m, "conv2") == (4, 12, 3, 3)


# -- 7. Slice on the channel axis ----------------------------------------------------------
SLICES = {  # mode: (opset, sliced channel count, Gather indices after pruning)
    "step": (17, 4, [2, 4, 6]),
    "negative": (17, 4, [2, 4, 6]),
    "reverse": (17, 12, [8, 7, 6, 5, 4, 3, 2, 1, 0]),
    "multi_axis": (17, 4, [2, 4, 6]),
    "attr9": (9, 8, [2, 3, 4, 5, 6, 7]),
    "gather": (17, 5, [0, 5, 5, 8]),  # Gather [4, 0, -5, 7, 10]: negative and repeated indices
}


def channel_slice(mode, zero=False):
    opset, cs, _ = SLICES[mode]
    b = Builder(opset=opset, seed=9)
    r0 = b.relu(b.conv(image(b), 3, 12, name="conv0"), "r0")
    if mode == "attr9":
        sl = b.op("Slice", [r0], "slice", starts=[2], ends=[10], axes=[1])
    elif mode == "gather":
        sl = b.op("Gather", [r0, b.ints([4, 0, -5, 7, 10])], "slice", axis=1)
    else:
        starts, ends, axes, steps = {
            "step": ([2], [10], [1], [2]),
            "negative": ([-10], [-2], [-3], [2]),
            "reverse": ([-1], [INT64_MIN], [1], [-1]),
            "multi_axis": ([2, 0], [10, 8], [1, 2], [2, 2]),
        }[mode]
        sl = b.op("Slice", [r0, b.ints(starts), b.ints(ends), b.ints(axes), b.ints(steps)],
                  "slice")
    b.output(b.conv(sl, cs, 4, name="conv1"), b.conv(r0, 12, 4, name="conv2"))
    zero_if(b, zero, {"conv0": [4, 5, 11]})
    return b.build()


@pytest.mark.parametrize("mode", sorted(SLICES))
def test_channel_slice_becomes_gather(mode):
    _, cs, indices = SLICES[mode]
    a = analysed(channel_slice(mode))
    g = group_of(a, "r0")
    assert (g.size, g.prunable) == (12, 12) and "slice" in g.tensors
    assert len(a.channels.tensors["slice"].slots) == cs
    m, rep = compress(channel_slice(mode, zero=True), EXACT_RATIO, target="fake", method="prune")
    assert removed_channels(rep) == 3
    gathers = [n for n in m.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 1
    gather = gathers[0]
    idx = [t for t in m.graph.initializer if t.name == gather.input[1]][0]
    assert onnx.numpy_helper.to_array(idx).tolist() == indices
    assert attribute(m, gather.name, "axis") == 1
    assert gather.output[0] == "slice"  # consumers still read the same name
    if mode == "multi_axis":
        assert node(m, "slice").op_type == "Slice"  # the spatial part stays a Slice
    else:
        assert gather.name == "slice"
    assert input_shape(m, "conv1") == (4, len(indices), 3, 3)
    assert max_diff(channel_slice(mode, zero=True), m) < 1e-5


# -- 8. depthwise Conv ------------------------------------------------------------------------
def depthwise(mult, zero=False):
    b = Builder(seed=10)
    h = b.relu(b.bn(b.conv(image(b), 3, 8, k=1, name="pw1"), 8, "bn1"), "r1")
    d = b.relu(b.bn(b.conv(h, 8, 8 * mult, name="dw", group=8), 8 * mult, "bn2"), "r2")
    b.output(b.conv(d, 8 * mult, 4, k=1, name="pw2"))
    dz = [c * mult + j for c in (2, 6) for j in range(mult)]
    zero_if(b, zero, {"pw1": [2, 6], "bn1": [2, 6], "dw": dz, "bn2": dz})
    return b.build()


@pytest.mark.parametrize("mult", (1, 2))
def test_depthwise(mult):
    a = analysed(depthwise(mult))
    g = group_of(a, "dw")
    assert (g.size, g.prunable, g.coupled) == (8, 8, False)
    assert g.producers == ["pw1"] and {"r1", "bn2", "r2"} <= set(g.tensors)
    m, _ = compress(depthwise(mult), 0.5, target="fake", method="prune")
    assert input_shape(m, "dw") == (4 * mult, 1, 3, 3)
    assert input_shape(m, "dw", 2) == (4 * mult,)
    assert attribute(m, "dw", "group") == 4
    assert input_shape(m, "bn2", 1) == (4 * mult,)
    assert input_shape(m, "pw2") == (4, 4 * mult, 1, 1)


# -- 9. grouped Conv --------------------------------------------------------------------------
def grouped(zero=False, zeroed=(1, 6, 8, 15)):
    b = Builder(seed=11)
    r0 = b.relu(b.conv(image(b), 3, 16, name="conv0"), "r0")
    h = b.relu(b.conv(r0, 16, 16, name="gconv", group=4), "rg")
    b.output(b.conv(h, 16, 4, name="conv2"))
    zero_if(b, zero, {"conv0": list(zeroed), "gconv": [1, 6, 10, 12]})
    return b.build()


def test_grouped_conv_balanced():
    a = analysed(grouped())
    for tensor in ("r0", "gconv"):
        g = group_of(a, tensor)
        assert (g.size, g.prunable) == (16, 16)
        assert g.blocks is not None and np.bincount(g.blocks).tolist() == [4, 4, 4, 4]
    # All the zero channels in block 0: the plan still removes one per block.
    a = analysed(grouped(zero=True, zeroed=(0, 1, 2, 3)))
    p = api.plan(a, EXACT_RATIO)
    for gp in p.groups:
        if gp.group.blocks is not None:
            block = dict(zip(gp.group.classes.tolist(), gp.group.blocks.tolist(), strict=True))
            assert sorted(block[c] for c in gp.removed.tolist()) == [0, 1, 2, 3]
    m, rep = compress(grouped(), 0.5, target="fake", method="prune")
    assert [g["removed"] for g in rep.groups] == [8, 8, 0]
    assert input_shape(m, "gconv") == (8, 2, 3, 3)
    assert attribute(m, "gconv", "group") == 4
    assert input_shape(m, "conv2") == (4, 8, 3, 3)
    m, _ = compress(grouped(zero=True, zeroed=(0, 1, 2, 3)), EXACT_RATIO,
        target="fake", method="prune")
    assert input_shape(m, "gconv") == (12, 3, 3, 3)
    run(m, random_feeds(m))


def test_grouped_conv_conflicting_partitions_fixed():
    b = Builder(seed=12)
    r0 = b.relu(b.conv(image(b), 3, 16, name="conv0"), "r0")
    b.output(b.conv(r0, 16, 16, name="g4", group=4), b.conv(r0, 16, 8, name="g2", group=2))
    model = b.build()
    g = group_of(analysed(model), "r0")
    assert g.prunable == 0 and g.reasons() == ["16x conflicting grouped-Conv partitions"]
    m, rep = compress(model, 0.5, target="fake", method="prune")
    assert rep.params_after == rep.params_before
    assert max_diff(model, m) == 0.0


# -- 10. Flatten / Reshape / GAP into Gemm ---------------------------------------------------
FLATTENS = ("flatten", "flatten_transb", "reshape_0", "reshape_neg", "reshape_fixed", "gap",
            "reducemean", "nhwc")


def flatten_gemm(mode, zero=False):
    b = Builder(seed=13)
    x = image(b, hw=6, batch=2 if mode == "reshape_fixed" else BATCH)
    c = b.relu(b.conv(x, 3, 8, name="conv0", stride=2), "r0")  # [N, 8, 3, 3]
    k = 72
    if mode.startswith("flatten"):
        f = b.op("Flatten", [c], "flat", axis=1)
    elif mode == "nhwc":  # features are (h, w, c): the channels interleave
        f = b.op("Flatten", [b.op("Transpose", [c], "nhwc", perm=[0, 2, 3, 1])], "flat", axis=1)
    elif mode == "gap":
        f = b.op("Reshape", [b.op("GlobalAveragePool", [c], "gap"), b.ints([0, -1], "shape")],
                 "flat")
        k = 8
    elif mode == "reducemean":
        f = b.op("ReduceMean", [c], "flat", axes=[-1, -2], keepdims=0)
        k = 8
    else:
        shape = {"reshape_0": [0, -1], "reshape_neg": [-1, 72], "reshape_fixed": [2, -1]}[mode]
        f = b.op("Reshape", [c, b.ints(shape, "shape")], "flat")
    h = b.relu(b.gemm(f, k, 10, "gemm1", trans_b=int(mode == "flatten_transb")), "rg")
    b.output(b.gemm(h, 10, 5, "gemm2"))
    zero_if(b, zero, {"conv0": [1, 4], "gemm1": [3, 4, 8]})
    return b.build()


@pytest.mark.parametrize("mode", FLATTENS)
def test_flatten_into_gemm(mode):
    a = analysed(flatten_gemm(mode))
    g = group_of(a, "r0")
    assert (g.size, g.prunable) == (8, 8) and "flat" in g.tensors
    block = 1 if mode in ("gap", "reducemean") else 9
    roots = a.channels.roots()
    cls = roots[a.channels.tensors["r0"].slots]
    flat = roots[a.channels.tensors["flat"].slots]
    # Each channel is a contiguous block of `block` features, or every 8th one after NHWC.
    expected = np.tile(cls, 9) if mode == "nhwc" else np.repeat(cls, block)
    np.testing.assert_array_equal(flat, expected)
    assert group_of(a, "gemm1").size == 10
    m, rep = compress(flatten_gemm(mode, zero=True), EXACT_RATIO, target="fake", method="prune")
    assert removed_channels(rep) == 5
    k = 6 * block
    assert input_shape(m, "gemm1") == ((7, k) if mode == "flatten_transb" else (k, 7))
    assert input_shape(m, "gemm1", 2) == (7,)
    assert input_shape(m, "gemm2") == (7, 5)
    if mode == "reshape_neg":
        assert init_value(m, "flat").tolist() == [-1, 54]
    assert max_diff(flatten_gemm(mode, zero=True), m) < 1e-5


def tokens(zero=False):
    """Patch embedding: conv -> Reshape [0, C, -1] -> Transpose -> MatMul on the last axis."""
    b = Builder(seed=27)
    c = b.relu(b.conv(image(b, hw=6), 3, 8, name="conv0", stride=2), "r0")  # [N, 8, 3, 3]
    t = b.op("Transpose", [b.op("Reshape", [c, b.ints([0, 8, -1])], "seq")], "tok",
             perm=[0, 2, 1])  # [N, 9, 8]
    h = b.op("Add", [b.matmul(t, 8, 10, "fc1"), b.const(0.1 * b.rng.standard_normal(10),
                                                         "fc1.bias")], "fc1_add")
    b.track("fc1", ("fc1.bias", 0))
    b.output(b.matmul(b.relu(h, "act"), 10, 5, "fc2"))
    zero_if(b, zero, {"conv0": [1, 4], "fc1": [3, 4, 8]})
    return b.build()


def test_tokens_reshape_transpose_matmul():
    a = analysed(tokens())
    g = group_of(a, "tok")
    assert (g.size, g.prunable, g.producers) == (8, 8, ["conv0"])
    assert a.channels.tensors["seq"].axis == 1 and a.channels.tensors["tok"].axis == 2
    assert group_of(a, "act").size == 10
    m, rep = compress(tokens(zero=True), EXACT_RATIO, target="fake", method="prune")
    assert removed_channels(rep) == 5
    assert init_value(m, "seq").tolist() == [0, 6, -1]
    assert input_shape(m, "fc1") == (6, 7) and input_shape(m, "fc1_add") == (7,)
    assert input_shape(m, "fc2") == (7, 5)


# -- 11. Gemm chains and transformer MLPs ------------------------------------------------------
def gemm_chain(zero=False):
    b = Builder(seed=14)
    x = b.input("x", [BATCH, 16])
    h = b.relu(b.gemm(x, 16, 12, "gemm1", trans_b=0), "r1")
    h = b.relu(b.gemm(h, 12, 8, "gemm2", trans_b=1, bias_shape=[1, 8]), "r2")
    b.output(b.gemm(h, 8, 4, "gemm3", bias=False))
    zero_if(b, zero, {"gemm1": [0, 5, 11], "gemm2": [2, 7]})
    return b.build()


def test_gemm_chain():
    a = analysed(gemm_chain())
    assert [(g.size, g.prunable) for g in a.groups] == [(12, 12), (8, 8), (4, 0)]
    m, _ = compress(gemm_chain(), 0.5, target="fake", method="prune")
    assert input_shape(m, "gemm1") == (16, 6) and input_shape(m, "gemm1", 2) == (6,)
    assert input_shape(m, "gemm2") == (4, 6) and input_shape(m, "gemm2", 2) == (1, 4)
    assert input_shape(m, "gemm3") == (4, 4)


MLPS = ("erf", "gelu", "transposed")


def mlp(mode, zero=False):
    b = Builder(opset=20 if mode == "gelu" else 17, seed=15)
    x = b.input("x", [BATCH, 5, 8])
    ln = b.op("LayerNormalization", [x, b.weight("ln.scale", [8], low=0.5),
                                     b.const(np.zeros(8, np.float32), "ln.bias")], "ln", axis=-1)
    h = b.op("Add", [b.matmul(ln, 8, 16, "fc1"), b.const(0.1 * b.rng.standard_normal(16),
                                                          "fc1.bias")], "fc1_add")
    b.track("fc1", ("fc1.bias", 0))
    if mode == "gelu":
        h = b.op("Gelu", [h], "gelu")
    else:  # x * 0.5 * (1 + erf(x / sqrt(2)))
        e = b.op("Erf", [b.op("Div", [h, b.const(np.float32(np.sqrt(2.0)))], "div")], "erf")
        h = b.op("Mul", [b.op("Mul", [h, b.op("Add", [e, b.const(np.float32(1.0))], "erf1")],
                              "gelu_mul"), b.const(np.float32(0.5))], "gelu")
    if mode == "transposed":  # weight = Transpose(constant); normalisation folds it
        wt = b.weight("fc2.weight_t", [8, 16], fan_in=16)
        y = b.op("MatMul", [h, b.op("Transpose", [wt], "fc2_wT", perm=[1, 0])], "fc2")
    else:
        y = b.matmul(h, 16, 8, "fc2")
    y = b.op("Add", [y, b.const(0.1 * b.rng.standard_normal(8), "fc2.bias")], "fc2_add")
    b.output(b.op("Add", [x, y], "residual"))
    zero_if(b, zero, {"fc1": [1, 2, 9, 14]})
    return b.build()


@pytest.mark.parametrize("mode", MLPS)
def test_matmul_mlp(mode):
    a = analysed(mlp(mode))
    g = group_of(a, "gelu")
    assert (g.size, g.prunable, g.coupled) == (16, 16, False)
    assert g.producers == ["fc1"] and a.channels.tensors["gelu"].axis == 2
    out = group_of(a, "residual")
    assert out.prunable == 0 and out.reasons() == ["8x graph input 'x'"]
    m, rep = compress(mlp(mode), 0.5, target="fake", method="prune")
    assert [g["removed"] for g in rep.groups if g["removed"]] == [8]
    assert input_shape(m, "fc1") == (8, 8)
    assert input_shape(m, "fc1_add") == (8,)
    assert input_shape(m, "fc2") == (8, 8)


# -- 12. per-channel followers ---------------------------------------------------------------
def followers(zero=False):
    b = Builder(seed=16)
    c = b.conv(image(b), 3, 8, name="conv0")
    h = b.op("PRelu", [c, b.weight("slope", [8, 1, 1], low=0.1)], "prelu")
    h = b.op("Mul", [h, b.weight("mul_c", [1, 8, 1, 1], low=0.5)], "mul")
    add_c = b.const(0.1 * b.rng.standard_normal((1, 8, 1, 1)), "add_c")
    h = b.op("Add", [h, add_c], "add")
    h = b.op("Div", [h, b.weight("div_c", [1, 8, 1, 1], low=0.5)], "div")
    inb = b.const(0.1 * b.rng.standard_normal(8), "in.bias")
    h = b.op("InstanceNormalization", [h, b.weight("in.scale", [8], low=0.5), inb], "inorm")
    b.track("conv0", (add_c, 1), (inb, 0))
    b.output(b.conv(b.relu(h, "relu"), 8, 4, name="conv1"))
    zero_if(b, zero, {"conv0": [3, 6]})
    return b.build()


def test_per_channel_followers():
    a = analysed(followers())
    g = group_of(a, "conv0")
    assert (g.size, g.prunable) == (8, 8) and g.producers == ["conv0"]
    assert {"prelu", "mul", "add", "div", "inorm", "relu"} <= set(g.tensors)
    m, _ = compress(followers(), 0.5, target="fake", method="prune")
    assert input_shape(m, "prelu") == (4, 1, 1)
    for name in ("mul", "add", "div"):
        assert input_shape(m, name) == (1, 4, 1, 1)
    assert input_shape(m, "inorm", 1) == (4,) and input_shape(m, "inorm", 2) == (4,)
    assert input_shape(m, "conv1") == (4, 4, 3, 3)


# -- 13. pass-through ops ---------------------------------------------------------------------
def _resize_sizes(b, h):
    return b.op("Resize", [h, "", "", b.ints([2, 8, 16, 16], "sizes")], "op", mode="nearest")


PASS_OPS: dict[str, tuple[int, Callable[[Builder, str], str]]] = {
    "Clip": (17, lambda b, h: b.op("Clip", [h, b.const(np.float32(0)), b.const(np.float32(6))],
                                   "op")),
    "LeakyRelu": (17, lambda b, h: b.op("LeakyRelu", [h], "op", alpha=0.1)),
    "Sigmoid": (17, lambda b, h: b.op("Sub", [b.op("Sigmoid", [h], "sig"),
                                              b.const(np.float32(0.5))], "op")),
    "HardSwish": (17, lambda b, h: b.op("HardSwish", [h], "op")),
    "MaxPool": (17, lambda b, h: b.op("MaxPool", [h], "op", kernel_shape=[2, 2],
                                      strides=[2, 2])),
    "AveragePool": (17, lambda b, h: b.op("AveragePool", [h], "op", kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1])),
    "Resize": (17, lambda b, h: b.op("Resize", [h, "", b.const([1.0, 1.0, 2.0, 2.0])], "op",
                                     mode="nearest")),
    "Upsample_opset9": (9, lambda b, h: b.op("Upsample", [h, b.const([1.0, 1.0, 2.0, 2.0])],
                                             "op", mode="nearest")),
    "Resize_sizes": (17, _resize_sizes),
    "Resize_axes": (18, lambda b, h: b.op("Resize", [h, "", b.const([2.0, 2.0], "scales")], "op",
                                          mode="nearest", axes=[2, 3])),
    "Resize_sizes_axes": (18, lambda b, h: b.op("Resize", [h, "", "", b.ints([16, 16], "sizes")],
                                                "op", mode="nearest", axes=[2, 3])),
    "Transpose": (17, lambda b, h: b.op("Transpose", [b.op(
        "Mul", [b.op("Transpose", [h], "nhwc", perm=[0, 2, 3, 1]),
                b.weight("mul_c", [8], low=0.5)], "mul"), ], "op", perm=[0, 3, 1, 2])),
    "ReduceMean": (17, lambda b, h: b.op("ReduceMean", [h], "op", axes=[2, 3], keepdims=1)),
    "ReduceMean_opset18": (18, lambda b, h: b.op("ReduceMean", [h, b.ints([2, 3])], "op")),
    "Clip_opset9": (9, lambda b, h: b.op("Clip", [h], "op", min=0.0, max=6.0)),
    "SqueezeUnsqueeze_opset11": (11, lambda b, h: b.op("Unsqueeze", [b.op(
        "Squeeze", [b.op("GlobalAveragePool", [h], "gap")], "sq", axes=[3, 2])], "op",
        axes=[2, 3])),
    "SqueezeUnsqueeze": (17, lambda b, h: b.op("Unsqueeze", [b.op(
        "Squeeze", [b.op("GlobalMaxPool", [h], "gmp"), b.ints([2, 3])], "sq"), b.ints([-1, -2])],
        "op")),
}


def passthrough(op, zero=False):
    opset, make = PASS_OPS[op]
    b = Builder(opset=opset, seed=17)
    h = b.relu(b.conv(image(b, batch=2 if op == "Resize_sizes" else BATCH), 3, 8,
                      name="conv0"), "r0")
    b.output(b.conv(make(b, h), 8, 4, name="conv1"))
    zero_if(b, zero, {"conv0": [1, 4]})
    return b.build()


@pytest.mark.parametrize("op", sorted(PASS_OPS))
def test_passthrough(op):
    a = analysed(passthrough(op))
    g = group_of(a, "r0")
    assert (g.size, g.prunable, g.coupled) == (8, 8, False), g.reasons()
    assert "op" in g.tensors and a.channels.unsupported == []
    m, rep = compress(passthrough(op), 0.5, target="fake", method="prune")
    assert removed_channels(rep) == 4
    assert input_shape(m, "conv1") == (4, 4, 3, 3)
    if op == "Transpose":
        assert input_shape(m, "mul") == (4,)
    if op.startswith("Resize_sizes"):
        expected = [2, 4, 16, 16] if op == "Resize_sizes" else [16, 16]
        assert init_value(m, "op", 3).tolist() == expected
    run(m, random_feeds(m))


# -- 14. squeeze-excite ----------------------------------------------------------------------
def squeeze_excite(mode, zero=False):
    b = Builder(seed=18)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    s_in = b.relu(b.conv(r0, 8, 8, name="conv1"), "r1")
    s = b.op("GlobalAveragePool", [s_in], "gap")
    if mode == "conv":
        s = b.relu(b.conv(s, 8, 4, k=1, name="se1"), "se_relu")
        s = b.op("Sigmoid", [b.conv(s, 4, 8, k=1, name="se2")], "se_gate")
    else:  # Flatten -> Gemm -> Relu -> Gemm -> Sigmoid -> Reshape [0, 8, 1, 1]
        s = b.relu(b.gemm(b.op("Flatten", [s], "se_flat"), 8, 4, "se1"), "se_relu")
        s = b.op("Sigmoid", [b.gemm(s, 4, 8, "se2")], "se_sig")
        s = b.op("Reshape", [s, b.ints([0, 8, 1, 1])], "se_gate")
    y = b.op("Mul", [s_in, s], "scale")
    b.output(b.conv(y, 8, 4, name="conv2"))
    zero_if(b, zero, {"conv0": [0, 6], "conv1": [2, 6], "se2": [2, 6], "se1": [1]})
    return b.build()


@pytest.mark.parametrize("mode", ("conv", "gemm"))
def test_squeeze_excite(mode):
    def se_shapes(m):
        return input_shape(m, "se1"), input_shape(m, "se2")

    def expected(c, r):
        return ((r, c, 1, 1), (c, r, 1, 1)) if mode == "conv" else ((c, r), (r, c))

    a = analysed(squeeze_excite(mode))
    inner = group_of(a, "se1")
    assert (inner.size, inner.prunable, inner.coupled) == (4, 4, False)
    main = group_of(a, "scale")
    assert (main.size, main.coupled) == (8, True)
    assert sorted(main.producers) == ["conv1", "se2"]
    assert {"r1", "gap", "se_gate"} <= set(main.tensors)
    m, rep = compress(squeeze_excite(mode), 0.5, target="fake", method="prune")
    assert rep.groups[main.id]["removed"] == 0 and rep.groups[inner.id]["removed"] == 2
    assert se_shapes(m) == expected(8, 2)
    m, rep = compress(squeeze_excite(mode), 0.5, prune_coupled=True, target="fake", method="prune")
    assert rep.groups[main.id]["removed"] == 4
    assert se_shapes(m) == expected(4, 2)
    assert input_shape(m, "conv1") == (4, 4, 3, 3) and input_shape(m, "conv2") == (4, 4, 3, 3)
    if mode == "gemm":
        assert init_value(m, "se_gate").tolist() == [0, 4, 1, 1]


# -- 15. ConvTranspose ------------------------------------------------------------------------
def conv_transpose(mode, zero=False):
    b = Builder(seed=19)
    r0 = b.relu(b.conv(image(b, hw=4), 3, 8, name="conv0"), "r0")
    if mode == "plain":
        h = b.relu(b.conv_t(r0, 8, 6, name="convt"), "rt")
        b.output(b.conv(h, 6, 4, name="conv2"))
        zero_if(b, zero, {"conv0": [2, 6], "convt": [1, 3]})
    else:  # depthwise: weight [C, 1, k, k], group C
        w = b.weight("convt.weight", [8, 1, 2, 2], fan_in=4)
        bias = b.const(np.zeros(8, np.float32), "convt.bias")
        h = b.relu(b.op("ConvTranspose", [r0, w, bias], "convt", kernel_shape=[2, 2],
                        strides=[2, 2], group=8), "rt")
        b.output(b.conv(h, 8, 4, name="conv2"))
        zero_if(b, zero, {"conv0": [2, 6]})
    return b.build()


@pytest.mark.parametrize("mode", ("plain", "depthwise"))
def test_conv_transpose(mode):
    a = analysed(conv_transpose(mode))
    g = group_of(a, "convt")
    if mode == "plain":
        assert (g.size, g.prunable, g.producers) == (6, 6, ["convt"])
        assert group_of(a, "r0").size == 8
    else:
        assert (g.size, g.prunable, g.producers) == (8, 8, ["conv0"]) and "r0" in g.tensors
    m, _ = compress(conv_transpose(mode), 0.5, target="fake", method="prune")
    if mode == "plain":
        assert input_shape(m, "convt") == (4, 3, 2, 2) and input_shape(m, "convt", 2) == (3,)
        assert input_shape(m, "conv2") == (4, 3, 3, 3)
    else:
        assert input_shape(m, "convt") == (4, 1, 2, 2) and attribute(m, "convt", "group") == 4
        assert input_shape(m, "conv2") == (4, 4, 3, 3)


# -- 16. unsupported ops ----------------------------------------------------------------------
def lrn(zero=False):
    b = Builder(seed=20)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    h = b.op("LRN", [r0], "lrn", size=3, alpha=1e-3)
    h = b.relu(b.conv(h, 8, 8, name="conv1"), "r1")
    b.output(b.conv(h, 8, 4, name="conv2"))
    zero_if(b, zero, {"conv1": [2, 6]})
    return b.build()


def custom_domain(zero=False):
    b = Builder(seed=21, extra_opsets={"com.microsoft": 1})
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    h = b.conv(r0, 8, 8, name="conv1")
    h = b.op("Gelu", [h], "custom", domain="com.microsoft")
    b.output(b.conv(h, 8, 4, name="conv2"), shape=[BATCH, 4, 8, 8])
    zero_if(b, zero, {"conv0": [0, 3]})
    return b.build()


@pytest.mark.parametrize(("factory", "op", "fixed_tensor", "free_tensor"),
                         [(lrn, "LRN", "r0", "r1"), (custom_domain, "Gelu", "conv1", "r0")])
def test_unsupported_op(factory, op, fixed_tensor, free_tensor):
    bad = "lrn" if op == "LRN" else "custom"
    a = analysed(factory())
    g = group_of(a, fixed_tensor)
    assert g.prunable == 0
    assert g.reasons() == [f"8x unsupported op {op} at '{bad}'"]
    assert (bad, f"unsupported op {op}") in a.channels.unsupported
    assert group_of(a, free_tensor).prunable == 8
    model = factory()
    m, rep = compress(model, 0.5, target="fake", method="prune")
    assert {"node": bad, "reason": f"unsupported op {op}"} in rep.unsupported
    assert removed_channels(rep) == 4 and rep.params_after < rep.params_before
    assert node(m, bad).SerializeToString() == node(model, bad).SerializeToString()


def subgraph_read(zero=False):
    """An If whose branches read a Conv output implicitly (not through the node's inputs)."""
    b = Builder(seed=29)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    r1 = b.relu(b.conv(r0, 8, 8, name="conv1"), "r1")
    branches = {}
    for branch in ("then", "else"):
        w = onnx.numpy_helper.from_array(b.rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
                                         f"{branch}_w")
        branches[f"{branch}_branch"] = onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", [r1, w.name], [f"{branch}_y"], name=f"{branch}_conv")],
            branch, [], [onnx.helper.make_tensor_value_info(f"{branch}_y", onnx.TensorProto.FLOAT,
                                                            None)], [w])
    out = b.op("If", [b.const(np.array(True), "cond")], "if", **branches)
    b.output(out, shape=[BATCH, 4, 8, 8])
    zero_if(b, zero, {"conv0": [0, 3]})
    return b.build()


def test_subgraph_reads_are_fixed():
    a = analysed(subgraph_read())
    assert group_of(a, "r1").reasons() == ["8x unsupported op If at 'if'"]
    assert group_of(a, "r0").prunable == 8
    model = subgraph_read()
    m, rep = compress(model, 0.5, target="fake", method="prune")
    assert removed_channels(rep) == 4 and input_shape(m, "conv1") == (8, 4, 3, 3)
    assert node(m, "if").SerializeToString() == node(model, "if").SerializeToString()


# -- 17. graph outputs ------------------------------------------------------------------------
def graph_output(zero=False):
    b = Builder(seed=22)
    r0 = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    b.output(r0, b.conv(r0, 8, 4, name="conv1"))
    return b.build()


def test_graph_output_fixed():
    a = analysed(graph_output())
    g = group_of(a, "r0")
    assert g.prunable == 0 and g.reasons() == ["8x reaches graph output 'r0'"]
    m, rep = compress(graph_output(), 0.5, target="fake", method="prune")
    assert removed_channels(rep) == 0 and rep.params_after == rep.params_before


# -- 18. Shape reads ------------------------------------------------------------------------
SHAPE_READS = {"batch": (0, {}), "channel": (1, {}), "spatial_start": (0, {"start": 2}),
               "channel_dynamic": (1, {})}
DYNAMIC_IMAGE = {"x": [2, 3, 8, 8]}  # --input-shape for the model with symbolic H and W


def shape_read(mode, zero=False):
    index, attrs = SHAPE_READS[mode]
    b = Builder(seed=23)
    x = image(b) if mode != "channel_dynamic" else b.input("x", [BATCH, 3, "H", "W"])
    r0 = b.relu(b.conv(x, 3, 8, name="conv0"), "r0")
    dim = b.op("Gather", [b.op("Shape", [r0], "shape", **attrs), b.ints([index])], "dim", axis=0)
    target = b.op("Concat", [dim, b.ints([-1])], "target", axis=0)
    b.output(b.conv(r0, 8, 4, name="conv1"), b.op("Reshape", [x, target], "reshaped"))
    zero_if(b, zero, {"conv0": [2, 6]})
    return b.build()


@pytest.mark.parametrize("mode", sorted(SHAPE_READS))
def test_shape_read(mode):
    # A read of a static channel count is folded into a constant by normalize (the original
    # value is kept, so the channels stay prunable); with dynamic spatial dims nothing folds
    # and the read fixes the channels.
    reads_channels = mode == "channel_dynamic"
    shapes = DYNAMIC_IMAGE if reads_channels else None
    m = shape_read(mode)
    api.normalize(m)
    a = api.analyse(m, shapes)
    g = group_of(a, "r0")
    if reads_channels:
        assert g.prunable == 0
        assert g.reasons() == ["8x channel count of 'r0' is read at run time by 'shape'"]
    else:
        assert g.prunable == 8 and not g.fixed
    m, rep = compress(shape_read(mode), 0.5, input_shapes=shapes, target="fake", method="prune")
    assert removed_channels(rep) == (0 if reads_channels else 4)
    assert input_shape(m, "conv1") == ((4, 8, 3, 3) if reads_channels else (4, 4, 3, 3))


# -- ops that cannot follow the channels -----------------------------------------------------
NOT_FOLLOWED: dict[str, tuple[int, Callable[[Builder, str], str], str]] = {
    "ReduceMean_channels": (17, lambda b, h: b.op("ReduceMean", [h], "op", axes=[1]),
                            "ReduceMean reduces over the channel axis"),
    "Softmax_channels": (17, lambda b, h: b.op("Softmax", [h], "op", axis=1),
                         "Softmax mixes values across the channel axis"),
    "Resize_channels": (17, lambda b, h: b.op("Resize", [h, "", "", b.ints([2, 16, 8, 8])], "op",
                                              mode="nearest"),
                        "Resize rescales the channel axis"),
    "Pad_reflect": (17, lambda b, h: b.op("Pad", [h, b.ints([0, 2, 0, 0, 0, 2, 0, 0])], "op",
                                          mode="reflect"),
                    "Pad crops or reflects the channel axis"),
    "Reshape_split": (17, lambda b, h: b.op("Reshape", [h, b.ints([0, 2, 4, 64])], "op"),
                      "Reshape splits or scatters the channel axis"),
    "Gather_scalar": (17, lambda b, h: b.op("Gather", [h, b.ints(3)], "op", axis=1),
                      "Gather of single channels"),
    "ConvTranspose_grouped": (17, lambda b, h: b.op(
        "ConvTranspose", [h, b.weight("ct.weight", [8, 2, 2, 2])], "op", group=2,
        kernel_shape=[2, 2], strides=[2, 2]), "grouped ConvTranspose (group=2)"),
}


@pytest.mark.parametrize("case", sorted(NOT_FOLLOWED))
def test_channels_not_followed_are_fixed(case):
    opset, make, reason = NOT_FOLLOWED[case]
    b = Builder(opset=opset, seed=24)
    r0 = b.relu(b.conv(image(b, batch=2), 3, 8, name="conv0"), "r0")
    h = b.relu(b.conv(r0, 8, 8, name="conv1"), "r1")
    b.output(make(b, r0), b.conv(h, 8, 4, name="conv2"))
    model = b.build()
    a = analysed(model)
    assert group_of(a, "r0").reasons() == [f"8x {reason} at 'op'"]
    assert ("op", reason) in a.channels.unsupported
    assert group_of(a, "r1").prunable == 8
    m, rep = compress(model, 0.5, target="fake", method="prune")
    assert input_shape(m, "conv0") == (8, 3, 3, 3) and input_shape(m, "conv1") == (4, 8, 3, 3)
    assert node(m, "op").SerializeToString() == node(model, "op").SerializeToString()
    run(m, random_feeds(m))


def test_reshape_merging_a_symbolic_batch_is_not_followed():
    b = Builder(seed=28)
    r0 = b.relu(b.conv(image(b, hw=6), 3, 8, name="conv0", stride=2), "r0")
    h = b.relu(b.conv(r0, 8, 8, name="conv1"), "r1")
    b.output(b.op("Reshape", [r0, b.ints([-1])], "op"), b.conv(h, 8, 4, name="conv2"))
    model = b.build()
    a = analysed(model)
    assert group_of(a, "r0").reasons() == [
        "8x Reshape merges the batch axis into the channel axis at 'op'"]
    assert len(a.channels.roots()) < 1000  # no slot per (placeholder) batch position
    m, _ = compress(model, 0.5, target="fake", method="prune")
    assert input_shape(m, "conv0") == (8, 3, 3, 3) and input_shape(m, "conv2") == (4, 4, 3, 3)
    assert max_diff(model, m, batch=3) > 0  # runs at another batch; pruning conv1 shows


# -- shared constants are copied before slicing ------------------------------------------------
def shared_const(zero=False):
    b = Builder(seed=25)
    r0 = b.conv(image(b), 3, 8, name="conv0")
    scale = b.weight("shared_scale", [1, 8, 1, 1], low=0.5)
    ya = b.relu(b.op("Mul", [b.relu(b.conv(r0, 8, 8, name="conva"), "ra"), scale], "mula"), "ya")
    yb = b.relu(b.op("Mul", [b.relu(b.conv(r0, 8, 8, name="convb"), "rb"), scale], "mulb"), "yb")
    b.output(b.conv(ya, 8, 4, name="outa"), b.conv(yb, 8, 4, name="outb"))
    zero_if(b, zero, {"conv0": [0, 3], "conva": [1, 2], "convb": [5, 6]})
    return b.build()


def test_shared_constant_copied():
    a = analysed(shared_const())
    assert group_of(a, "ya").id != group_of(a, "yb").id
    assert group_of(a, "conv0").prunable == 8
    model = shared_const(zero=True)
    m, rep = compress(model, EXACT_RATIO, target="fake", method="prune")
    assert removed_channels(rep) == 6
    ma, mb = node(m, "mula"), node(m, "mulb")
    assert ma.input[1] != mb.input[1]
    full = init_value(model, "mula").reshape(-1)
    np.testing.assert_array_equal(init_value(m, "mula").reshape(-1), np.delete(full, [1, 2]))
    np.testing.assert_array_equal(init_value(m, "mulb").reshape(-1), np.delete(full, [5, 6]))


# -- generic checks over every factory ------------------------------------------------------
def _case(f, *args):
    return lambda zero=False: f(*args, zero=zero)


# id: (factory, prune_coupled for the exactness run, channels the exactness run removes)
CASES: dict[str, tuple[Callable[..., onnx.ModelProto], bool, int]] = {
    "chain": (chain, False, 4),
    "residual": (residual, True, 4),
    "sum_opset9": (sum_residual, True, 4),
    "concat": (concat, False, 6),
    "densenet": (densenet, False, 4),
    "concat_spatial": (concat_spatial, True, 4),
    "concat_twice": (concat_twice, False, 2),
    "tokens": (tokens, False, 5),
    **{f"split_{m}": (_case(split, m), False, len(SPLITS[m][3])) for m in SPLITS},
    **{f"pad_opset{o}": (_case(pad_shortcut, o), True, 4) for o in PADS},
    **{f"slice_{m}": (_case(channel_slice, m), False, 3) for m in SLICES},
    **{f"depthwise_x{k}": (_case(depthwise, k), False, 2) for k in (1, 2)},
    "grouped": (grouped, False, 8),
    **{f"flatten_{m}": (_case(flatten_gemm, m), False, 5) for m in FLATTENS},
    "gemm_chain": (gemm_chain, False, 5),
    **{f"mlp_{m}": (_case(mlp, m), False, 4) for m in MLPS},
    "followers": (followers, False, 2),
    **{f"pass_{op}": (_case(passthrough, op), False, 2) for op in PASS_OPS},
    **{f"squeeze_excite_{m}": (_case(squeeze_excite, m), True, 5) for m in ("conv", "gemm")},
    "convt_plain": (_case(conv_transpose, "plain"), False, 4),
    "convt_depthwise": (_case(conv_transpose, "depthwise"), False, 2),
    "lrn": (lrn, False, 2),
    "custom_domain": (custom_domain, False, 2),
    "subgraph_read": (subgraph_read, False, 2),
    "graph_output": (graph_output, False, 0),
    **{f"shape_{m}": (_case(shape_read, m), False, 2)
       for m in SHAPE_READS if m != "channel_dynamic"},  # that one needs --input-shape
    "shared_const": (shared_const, False, 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ratio_zero_is_identity(case):
    factory, _, _ = CASES[case]
    model = factory()
    m, rep = compress(model, 0.0, prune_coupled=True, target="fake", method="prune")
    assert removed_channels(rep) == 0 and rep.params_after == rep.params_before
    assert max_diff(model, m) < 1e-6


@pytest.mark.parametrize("value_info", (False, True), ids=("plain", "value_info"))
@pytest.mark.parametrize("case", sorted(CASES))
def test_half_pruning_is_valid(case, value_info):
    factory, _, expect = CASES[case]
    model = factory()
    if value_info:  # exporters declare every intermediate shape: the stale ones must go
        model = onnx.shape_inference.infer_shapes(model)
        assert len(model.graph.value_info) > 0
    m, rep = compress(model, 0.5, prune_coupled=True, target="fake", method="prune")
    feeds = random_feeds(model)
    before, after = run(model, feeds), run(m, feeds)
    assert [o.shape for o in after] == [o.shape for o in before]
    assert all(np.isfinite(o).all() for o in after)
    if expect:
        assert removed_channels(rep) > 0
        assert rep.params_after < rep.params_before and rep.macs_after < rep.macs_before
    else:
        assert rep.params_after == rep.params_before


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_removal_of_zero_channels(case):
    factory, coupled, expect = CASES[case]
    model = factory(zero=True)
    m, rep = compress(model, EXACT_RATIO, prune_coupled=coupled, criterion="l1",
        target="fake", method="prune")
    assert removed_channels(rep) == expect
    if expect:
        assert rep.params_after < rep.params_before
    assert max_diff(model, m) < 1e-5
