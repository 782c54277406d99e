"""The coverage zoo: every common exported architecture compresses, stays valid, and is unchanged
at ratio 0 (torch-free; the fixtures are written by ``tools/make_zoo.py --fixtures``).

Each fixture is a reduced-width ResNet-18/50, MobileNetV2, MobileNetV3-Small, EfficientNet-B0,
DenseNet-121, VGG-16-BN, ShuffleNetV2, U-Net or transformer encoder exported by the legacy and
the dynamo exporter (BN kept and folded; the transformer with the Erf pattern and the Gelu op),
or one of the ONNX package's own opset-9 backend models, stored weight-free and given seeded
random weights on load (``tools/zoo_light.py``). For every fixture: ``inspect``-style analysis,
ratio 0 (outputs identical), 30 % and 50 % pruning, and 30 % + 6-bit ``udfc``: valid under the
full checker (inside ``api.compress``), runs in ONNX Runtime with the original output shapes,
fewer FLOPs where channels are prunable. Per architecture, the structure we know is asserted.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections import Counter

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from tests.helpers import ROOT, analysed, compensations, random_feeds, run, tool_module

ZOO = ROOT / "tests" / "fixtures" / "zoo"
materialise = tool_module("zoo_light").materialise

MANIFEST = json.loads((ZOO / "manifest.json").read_text())
ENTRIES = {e["file"]: e for e in MANIFEST}
ARCHS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
         "densenet121", "vgg16_bn", "shufflenet_v2", "unet", "transformer")
RESHAPE_SPLIT = "Reshape splits or scatters the channel axis"


@functools.cache
def skeleton(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(gzip.decompress((ZOO / name).read_bytes()))


def fixture(name: str) -> onnx.ModelProto:
    return materialise(skeleton(name), seed=0)


@functools.cache
def analysis(name: str) -> api.Analysis:
    return analysed(fixture(name))


def names(arch: str) -> list[str]:
    return [e["file"] for e in MANIFEST if e["arch"] == arch]


def test_manifest_covers_the_zoo():
    variants = Counter(e["arch"] for e in MANIFEST)
    assert all(variants[a] == 4 for a in ARCHS), variants
    assert sum(a.startswith("light_") for a in variants) == 9
    for a in ARCHS:
        exporters = {e["exporter"] for e in MANIFEST if e["arch"] == a}
        assert exporters == {"legacy", "dynamo"}
    # BN kept where asked, folded where asked (DenseNet keeps the BNs after its Concats).
    for e in MANIFEST:
        if e["variant"] in ("legacy_bn", "dynamo_bn"):
            assert e["batchnorm"] > 0, e["file"]
        if e["variant"].endswith("folded"):
            kept = ENTRIES[e["file"].replace("folded", "bn")]["batchnorm"]
            assert e["batchnorm"] < kept and (e["batchnorm"] == 0) == (e["arch"] != "densenet121")
    total = sum((ZOO / e["file"]).stat().st_size for e in MANIFEST)
    assert total < 2_000_000


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_zoo_model(name):
    model = fixture(name)
    a = analysis(name)
    assert a.groups and all(g.size > 0 for g in a.groups)
    assert all(r for g in a.groups for r in g.reasons())  # every fixed channel says why
    prunable = sum(g.prunable for g in a.groups if not g.coupled)

    feeds = random_feeds(model, batch=2)
    ref = run(model, feeds)
    m0, r0 = api.compress(model, prune=0.0, target="fake", method="prune")
    assert r0.params_after == r0.params_before and r0.flops_after == r0.flops_before
    for x, y in zip(ref, run(m0, feeds), strict=True):
        assert x.shape == y.shape and float(np.abs(x - y).max()) <= 1e-5

    for kwargs in ({"prune": 0.3}, {"prune": 0.5},
                   {"prune": 0.3, "method": "udfc", "bits": 6}):
        m, rep = api.compress(model, **kwargs)  # check=True: the full onnx.checker
        outs = run(m, feeds)
        assert [o.shape for o in outs] == [o.shape for o in ref]
        assert all(np.isfinite(o).all() for o in outs)
        if prunable:
            assert rep.flops_after < rep.flops_before and rep.params_after < rep.params_before
        if "bits" in kwargs:
            assert all(x["quantization"]["bits"] == 6 for x in rep.layers
                       if x.get("quantization"))


# -- what we know about each architecture ----------------------------------------------------
def compressed(name: str, **kwargs):
    """Written for float output and plain pruning unless the test names a method."""
    kwargs.setdefault("method", "prune")
    return api.compress(fixture(name), target="fake", **kwargs)


@pytest.mark.parametrize("name", names("resnet18") + names("resnet50") + names("vgg16_bn"))
def test_plain_cnns_compensate_every_pruned_layer(name):
    a = analysis(name)
    if name.startswith("resnet"):  # residual stages: coupled, left alone by default
        assert any(g.coupled and g.prunable for g in a.groups)
    _, rep = compressed(name, prune=0.3, method="udfc", bits=6)
    comp = compensations(rep)
    assert comp and all(c["compensated"] for c in comp.values()), comp
    assert not any(c.get("activations") for c in comp.values())  # ReLU only: exact form


@pytest.mark.parametrize("name", names("vgg16_bn"))
def test_vgg_flatten_into_gemm_over_7x7(name):
    model = fixture(name)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    w = {t.name: t for t in model.graph.initializer}[gemm.input[1]]
    cin = [int(d) for d in w.dims][1]  # transB=1: [out, in]
    assert cin % 49 == 0
    m, rep = compressed(name, prune=0.5)
    gemm2 = next(n for n in m.graph.node if n.op_type == "Gemm")
    w2 = {t.name: t for t in m.graph.initializer}[gemm2.input[1]]
    assert int(w2.dims[1]) == cin // 2  # half of the channels, 49 positions each


@pytest.mark.parametrize("name", names("shufflenet_v2"))
def test_shufflenet_shuffles_stay_fixed(name):
    a = analysis(name)
    reasons = Counter(r for _, r in a.channels.unsupported)
    assert reasons[RESHAPE_SPLIT] == 16  # one channel shuffle per block
    shuffled = [g for g in a.groups if any(RESHAPE_SPLIT in r for r in g.fixed.values())]
    assert shuffled and all(g.prunable == 0 for g in shuffled)
    # the branch convolutions between the shuffles stay prunable
    assert sum(g.prunable for g in a.groups) >= 13 * 7


@pytest.mark.parametrize("name", names("transformer"))
def test_transformer_ffn_is_pruned_with_compensation(name):
    a = analysis(name)
    ffn = [g for g in a.groups if g.size == 128]
    assert len(ffn) == 2 and all(g.prunable == 128 and not g.coupled for g in ffn)
    heads = [g for g in a.groups if g.size == 32 and not g.coupled]
    assert len(heads) == 6 and all(g.prunable == 0 for g in heads)  # q, k, v: heads split
    m, rep = compressed(name, prune=0.5, method="udfc")
    comp = compensations(rep)
    assert len(comp) == 2 and all(c["compensated"] for c in comp.values()), comp
    gelu = "Gelu" if "legacy_erf" not in name else "Erf"
    assert all(gelu in c["activations"] for c in comp.values())
    assert all(c["stats"] == "identity" for c in comp.values())
    inits = {t.name: t for t in m.graph.initializer}
    shapes = Counter(tuple(int(d) for d in inits[n.input[1]].dims) for n in m.graph.node
                     if n.op_type == "MatMul" and n.input[1] in inits)
    assert shapes[(32, 64)] == 2 and shapes[(64, 32)] == 2  # fc1 and fc2 of both blocks


@pytest.mark.parametrize("name", names("efficientnet_b0") + names("mobilenet_v3_small"))
def test_squeeze_excite(name):
    a = analysis(name)
    model = a.model
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    by_name = {n.name: n for n in model.graph.node}
    pooled = {n.output[0] for n in model.graph.node
              if n.op_type in ("GlobalAveragePool", "ReduceMean")}
    fc1 = {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in pooled}
    gates = {n.name for n in model.graph.node if n.op_type == "Conv" and
             set(readers.get(n.output[0], [])) & {"Sigmoid", "HardSigmoid"}}
    assert fc1 and gates and all(name in by_name for name in fc1)
    # The expanded channels are tied to the SE gate's channels by the Mul: a coupled group
    # whose producers include the SE's second conv (the gate).
    assert any(g.coupled and set(g.producers) & gates for g in a.groups)
    m, rep = compressed(name, prune=0.3, method="udfc", prune_coupled=True)
    assert rep.flops_after < rep.flops_before
    comp = compensations(rep)
    fc1 = {k: c for k, c in comp.items() if k in fc1}
    assert fc1 and all(c["compensated"] for c in fc1.values())
    if name.startswith("efficientnet"):  # SiLU = x * sigmoid(x), recognised as one activation
        assert all(c["activations"] == ["Mul", "Sigmoid"] for c in fc1.values())


@pytest.mark.parametrize("name", names("mobilenet_v2"))
def test_mobilenet_v2_depthwise(name):
    _, rep = compressed(name, prune=0.3, method="udfc", bits=6)
    comp = compensations(rep)
    through_dw = [c for c in comp.values() if not c["compensated"]]
    assert through_dw and all("depthwise" in c["reason"] for c in through_dw)
    quant = [x["quantization"] for x in rep.layers if x.get("quantization")]
    if "_bn" in name:  # ReLU6 is not homogeneous: the scale goes into the BN before it
        assert any(q.get("scale_into") == "batchnorm" for q in quant)
    else:  # no BN to take it: through the Clip as an approximation, reported
        assert any(q.get("activations") == ["Clip"] for q in quant)
    assert not any(q.get("activations") for q in quant if q.get("scale_into"))


@pytest.mark.parametrize("name", names("unet"))
def test_unet(name):
    model = fixture(name)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ConvTranspose"] == 2 and ops["Resize"] == 1 and ops["Concat"] >= 3
    a = analysis(name)
    assert sum(g.prunable for g in a.groups) == sum(g.size for g in a.groups) - 2  # the map
    m, rep = compressed(name, prune=0.5)
    assert rep.flops_after < 0.4 * rep.flops_before


@pytest.mark.parametrize("name", names("densenet121"))
def test_densenet_bn_after_concat(name):
    model = fixture(name)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    bn_after_concat = [n for n in model.graph.node if n.op_type == "BatchNormalization"
                       and producers.get(n.input[0]) == "Concat"]
    assert len(bn_after_concat) >= 58
    m, rep = compressed(name, prune=0.5)
    assert rep.flops_after < 0.5 * rep.flops_before
    # udfc+ rebuilds each pruned channel after every reader's BN (issue 14 item 2)
    _, rep = compressed(name, prune=0.2, method="udfc+")
    comp = compensations(rep)
    assert len(comp) >= 116 and all(c["compensated"] for c in comp.values())
    assert sum(bool(c.get("through")) for c in comp.values()) >= 58


@pytest.mark.parametrize("name", ["light_bvlc_alexnet.onnx.gz", "light_densenet121.onnx.gz"])
def test_udfc_plus_compensates_grouped_convs_and_caffe_batchnorm_scales(name):
    """AlexNet's grouped Convs take a reconstruction per group; the Caffe2 DenseNet's BN ->
    Mul -> Add after a Concat folds into one BN, which udfc+ crosses."""
    _, rep = compressed(name, prune=0.2, method="udfc+")
    comp = compensations(rep)
    assert comp and all(c["compensated"] for c in comp.values()), comp


def test_light_models_opset9():
    for name in [e["file"] for e in MANIFEST if e["arch"].startswith("light_")]:
        model = fixture(name)
        assert model.opset_import[0].version == 9 and model.ir_version == 3
    a = analysis("light_resnet50.onnx.gz")
    assert any(g.coupled for g in a.groups)  # Sum residuals
    a = analysis("light_shufflenet.onnx.gz")
    assert sum(g.prunable for g in a.groups) == 0  # grouped convs + shuffles: all fixed
