"""BatchNorm folded into integer weights' dequantization scales: exact, and smaller files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc import UdfcError, api
from onnx_udfc.core.io import save_model
from onnx_udfc.core.ort import make_inputs, run, session


@pytest.mark.parametrize("name", ["resnet56_cifar10_nm_bn", "resnet20_cifar10_bn"])
@pytest.mark.parametrize("bits,target", [(8, 0.27), (4, 0.15)])
def test_fold_bn_scales_is_exact_and_meets_size_targets(shared_model, tmp_path, name, bits,
                                                         target):
    path = shared_model(name)
    # Every layer integer (no --float-share), so the size targets are the integer ones.
    options = dict(bits=bits, quantizer="symmetric", granularity="channel", format="qdq",
                   float_share=0.0)
    plain, _ = api.compress(str(path), **options)
    folded, report = api.compress(str(path), fold_bn_scales=True, **options)
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    storage = report.to_dict()["storage"]
    assert storage["bn_folded_into_scales"] > 0 and storage["bn_not_folded"] == []
    feed, _ = make_inputs(onnx.load(str(path)), batch=8)
    a, b = run(session(plain), feed)[0], run(session(folded), feed)[0]
    assert np.abs(a - b).max() < 1e-4 * max(1.0, float(np.abs(a).max()))
    assert (a.argmax(1) == b.argmax(1)).all()
    out = tmp_path / "m.onnx"
    save_model(folded, out)
    assert out.stat().st_size <= target * path.stat().st_size


def test_fold_bn_scales_needs_qdq(shared_model):
    with pytest.raises(UdfcError, match="needs --format qdq"):
        api.compress(str(shared_model("resnet20_cifar10_bn")), bits=8,
                     fold_bn_scales=True, target="fake", method="prune")
