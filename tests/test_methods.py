"""UDFC / Neuron Merging / quantization wired into real graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc import UdfcError, api
from onnx_udfc.core.io import tensor_array
from onnx_udfc.core.ort import make_inputs, run, session
from onnx_udfc.report.verify import compare
from tests.helpers import bn_chain, compensations


def _fidelity(a: onnx.ModelProto, b: onnx.ModelProto):
    feed, _ = make_inputs(a, batch=2)
    return compare(run(session(a), feed), run(session(b), feed), ["y"])[0]


@pytest.mark.parametrize("with_bn", [True, False])
def test_udfc_exact_when_pruned_channel_is_a_multiple(with_bn):
    model = bn_chain(with_bn=with_bn)
    # 1 of 6 channels of conv1 (the group of 4 conv2 channels keeps all 4 at 10%).
    pruned, report = api.compress(model, prune=0.1, method="udfc", target="fake")
    layer = next(x for x in report.layers if x["name"] == "conv1")
    assert layer["out_channels_after"] == 5
    assert layer["compensation"]["compensated"] is True
    assert layer["predicted_error"] < 1e-6
    assert _fidelity(model, pruned).max_abs < 1e-4
    plain, _ = api.compress(model, prune=0.1, method="prune", target="fake")
    assert _fidelity(model, plain).max_abs > 1e-2  # the channel mattered


def test_neuron_merging_compensates_and_reports():
    model = bn_chain()
    pruned, report = api.compress(model, prune=0.1, method="nm", target="fake")
    comp = next(x for x in report.layers if x["name"] == "conv1")["compensation"]
    assert comp["compensated"] is True and comp["merged"] == 1
    assert _fidelity(model, pruned).max_abs < _fidelity(model, api.compress(
        model, prune=0.1, target="fake", method="prune")[0]).max_abs


def test_fold_bn_keeps_the_paper_exact(shared_model):
    """With --fold-bn the saved (sigma/gamma)^2 loss weights give the paper's Eq. 20
    coefficients on the folded filters, identical to the BN-kept graph."""
    from onnx_udfc.channels.analysis import analyse
    from onnx_udfc.channels.stats import layer_stats, weight_layer
    from onnx_udfc.core.io import infer_shapes
    from onnx_udfc.methods.equations import eq20_pruning_coefficients

    path = shared_model("resnet56_cifar10_nm_bn")
    coefficients = []
    for fold in (False, True):
        model = api.load(path)
        api.normalize(model)
        saved = api.fold_batchnorm(model) if fold else {}
        ctx = analyse(model, infer_shapes(model))
        node = next(n for n in model.graph.node if n.name.endswith("layer1.0/conv1/Conv"))
        layer = weight_layer(node, ctx.inits)
        stats, source = layer_stats(layer, ctx.inits, ctx.consumers, set(), saved)
        assert source == ("saved" if fold else "batchnorm")
        sol = eq20_pruning_coefficients(layer.filters(ctx.inits), stats, np.arange(8),
                                        np.arange(8, 16), 0.01)
        coefficients.append(sol.coefficients)
    assert np.allclose(coefficients[0], coefficients[1], rtol=1e-4, atol=1e-6)
    _, report = api.compress(str(path), prune=0.5, method="udfc", fold_bn=True, target="fake")
    assert len(report.folded_batchnorm) == 57
    assert any(x["compensation"] and x["compensation"].get("stats") == "saved"
               for x in report.layers)


@pytest.mark.parametrize("quantizer,levels,zero", [("paper", 16, False), ("symmetric", 15, True),
                                                   ("asymmetric", 16, True)])
def test_quantized_weights_on_grid(quantizer, levels, zero):
    model, report = api.compress(bn_chain(), bits=4, quantizer=quantizer, method="udfc",
        target="fake")
    inits = {t.name: tensor_array(t) for t in model.graph.initializer}
    for name in ("w1", "w2", "w3"):
        values = np.unique(inits[name])
        assert len(values) <= levels
        assert (0.0 in values) == zero or quantizer != "paper"
    assert all(x["bits"] == 4 for x in report.layers)


def test_per_channel_granularity_has_lower_error():
    _, tensor = api.compress(bn_chain(), bits=3, quantizer="symmetric",
        target="fake", method="prune")
    _, channel = api.compress(bn_chain(), bits=3, quantizer="symmetric", granularity="channel",
        target="fake", method="prune")
    err = [sum(x["quantization"]["quant_error"] for x in r.layers) for r in (tensor, channel)]
    assert err[1] < err[0]


def test_explicit_not_compensated_entries(shared_model):
    """Residual-coupled producers cannot be reconstructed per layer: said so per layer."""
    path = str(shared_model("resnet56_cifar10_nm_bn"))
    _, report = api.compress(path, prune=0.3, method="udfc", prune_coupled=True, bits=4,
        target="fake")
    comps = list(compensations(report).values())
    assert any(c["compensated"] for c in comps)
    coupled = [c for c in comps if not c["compensated"]]
    assert coupled and all("coupled" in c["reason"] for c in coupled)
    quants = {x["name"]: x["quantization"] for x in report.layers}
    block = [q for n, q in quants.items() if n.endswith("conv1") or "conv_a" in n]
    assert all(q["scale_compensated"] for q in block) or any(
        q["scale_compensated"] for q in quants.values())
    feeds_add = [q for q in quants.values() if not q["scale_compensated"]]
    assert feeds_add and all("reason" in q for q in feeds_add)


def test_udfc_beats_prune_on_real_model(shared, shared_model):
    """A sanity check on the paper's checkpoint: at 30 % l1, udfc output is closer to the
    original than plain pruning (accuracy figures live in the benchmark, not here)."""
    path = str(shared_model("resnet56_cifar10_nm_bn"))
    original = onnx.load(path)
    data = np.load(shared / "data" / "cifar10_test_first1017.npz")
    x = data["images"][:128].astype(np.float32) / 255
    x = ((x - np.array([0.4914, 0.4822, 0.4465], np.float32))
         / np.array([0.2023, 0.1994, 0.201], np.float32)).transpose(0, 3, 1, 2).copy()
    ref = run(session(original), {"input": x})[0]
    errs = {}
    for method in ("prune", "nm", "udfc"):
        model, _ = api.compress(path, prune=0.3, method=method, target="fake")
        errs[method] = compare([ref], run(session(model), {"input": x}), ["y"])[0].cosine
    assert errs["udfc"] > errs["prune"] and errs["nm"] > errs["prune"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"bits": "six"}, "bits"),
    ({"alpha1": -0.1}, "alpha1"), ({"alpha2": float("nan")}, "alpha2"),
    ({"method": "magic"}, "unknown method"), ({"quantizer": "fp4"}, "unknown quantizer"),
])
def test_bad_method_options(kwargs, needle):
    with pytest.raises(UdfcError, match=needle):
        api.compress(bn_chain(), prune=0.3, **kwargs)
