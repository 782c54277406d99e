"""The value range of an image input (onnx_udfc/moments/input_range.py): read from the first
layer, given by --input-range, and applied to every data-free input (moments and guard)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.cli import main
from onnx_udfc.config import INPUT_RANGES
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.moments import proxy
from onnx_udfc.moments.comparison import guard_feeds
from onnx_udfc.moments.input_range import PHOTO_MEAN, PHOTO_STD, RANGES, resolve_input_range
from onnx_udfc.moments.sampled import synthetic_inputs
from tests.helpers import Builder, trained_for


@pytest.mark.parametrize("range_name", ["standardised", "0-1", "0-255"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_auto_reads_the_range_from_the_first_layer(range_name, batchnorm):
    found = resolve_input_range(trained_for(range_name, batchnorm), "auto")
    assert found.name == range_name
    assert found.origin.startswith("auto: 'bn0" if batchnorm else "auto: 'conv0")


def test_given_range_and_models_without_one_image_input():
    assert resolve_input_range(trained_for("0-255"), "0-1").origin == "given"
    b = Builder()
    b.output(b.gemm(b.input("x", ["N", 16]), 16, 4, name="fc"))
    found = resolve_input_range(b.build(), "auto")
    assert (found.name, found.origin) == ("standardised", "no single image input")


def test_every_range_the_option_offers_is_defined():
    assert INPUT_RANGES == ("auto", *RANGES)


def test_photo_constants_match_the_proxy_photographs():
    crops = proxy.proxy_batch(64, 3, 32, 32, np.random.default_rng(0))
    assert abs(crops.mean() - PHOTO_MEAN) < 0.1 and abs(crops.std() - PHOTO_STD) < 0.05


def test_every_data_free_input_takes_the_range():
    model = trained_for("0-255")
    mean, std = RANGES["0-255"]
    pink = synthetic_inputs(model, 0, (mean,), (std,))["x"]
    assert abs(pink.mean() - mean) < 0.05 * std and abs(pink.std() - std) < 0.1 * std
    photos = proxy.proxy_inputs(model, 0, (mean,), (std,))["x"]
    assert abs(photos.mean() - mean) < 0.05 * std
    found = resolve_input_range(model, "auto")
    for kind, feed in guard_feeds(model, {}, input_range=found):
        assert abs(feed["x"].mean() - mean) < 0.1 * std, kind
    plain = dict(guard_feeds(model, {}))["photos"]["x"]
    assert abs(plain.mean()) < 0.1


def test_report_and_summary_name_the_range(tmp_path, capsys):
    path, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(trained_for("0-255"), path)
    assert main(["compress", str(path), "-o", str(out), "--prune", "0.25", "--report",
                 str(rep)]) == 0
    assert "range   image input read as 0-255 (auto:" in capsys.readouterr().out
    assert json.loads(rep.read_text())["input_range"]["range"] == "0-255"
    _, report = api.compress(trained_for("0-255"), input_range="standardised")
    assert report.input_range == {"range": "standardised", "from": "given"}


def test_unknown_range_is_refused(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(trained_for("0-1"), path)
    with pytest.raises(SystemExit) as exited:
        main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--input-range", "0-65535"])
    assert exited.value.code == 2 and not (tmp_path / "o.onnx").exists()
    assert "invalid choice: '0-65535'" in capsys.readouterr().err
    with pytest.raises(UdfcError, match="unknown input range '0-65535'"):
        api.compress(trained_for("0-1"), input_range="0-65535")
