"""The one configuration: presets, targets, explicit overrides, validation, and the CLI built
from it; all-or-nothing outputs."""

from __future__ import annotations

import json

import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.cli import main
from onnx_udfc.config import PRESETS, TARGETS, CompressConfig
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.methods import REGISTRY
from onnx_udfc.pipeline import STAGES, stage_names
from tests.helpers import assert_refused, cli


def test_defaults_are_balanced_udfc_plus_into_int8_qdq():
    c = CompressConfig.resolve()
    assert (c.preset, c.target, c.method.name) == ("balanced", "int8", "udfc+")
    assert (c.quant.bits, c.quant.quantizer, c.quant.granularity, c.storage.format) == \
        (8, "symmetric", "channel", "qdq")


def test_precedence_defaults_preset_target_explicit():
    c = CompressConfig.resolve("paper")
    assert (c.method.name, c.target, c.quant.quantizer, c.quant.bits) == \
        ("udfc", "fake", "paper", None)
    c = CompressConfig.resolve("best", "int4", bits=6, seed=3)
    assert (c.method.name, c.method.sequential, c.quant.bits, c.method.seed) == \
        ("udfc+", True, 6, 3)
    assert c.explicit == ["method.seed", "quant.bits"]
    c = CompressConfig.resolve("best", "int4", bits=6, method="udfc")
    assert c.to_dict()["explicit"] == ["method.name", "quant.bits"]
    assert (c.method.name, c.method.sequential) == ("udfc", False)


def test_a_method_named_with_a_udfc_plus_preset_drops_its_udfc_plus_settings():
    c = CompressConfig.resolve("max", method="udfc")
    assert (c.method.name, c.method.sequential, c.method.moments) == ("udfc", False, "auto")
    c.validate()
    with pytest.raises(UdfcError, match="--sequential"):
        CompressConfig.resolve("max", method="udfc", sequential=True).validate()


def test_every_preset_and_target_validates():
    for preset in PRESETS:
        for target in TARGETS:
            if preset == "paper" and target != "fake":
                continue
            CompressConfig.resolve(preset, target).validate()


def test_methods_registry_matches_the_choices():
    from onnx_udfc.config import METHODS
    assert tuple(REGISTRY) == METHODS or set(REGISTRY) == set(METHODS)


@pytest.mark.parametrize("overrides, needle", [
    ({"prune": 1.0}, "outside [0, 1)"), ({"bits": 9}, "bits must be"),
    ({"method": "x"}, "unknown method"), ({"seed": -1}, "seed"),
    ({"nonsense": 1}, "unknown option"), ({"preset_": 1}, "unknown option")])
def test_bad_values_are_refused_in_one_line(overrides, needle):
    with pytest.raises(UdfcError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        api.compress("models/digits_cnn_bn.onnx", **overrides)


def test_report_config_is_the_effective_config(digits_model):
    _, report = api.compress(str(digits_model), prune=0.2, bits=6, method="udfc",
                             target="fake")
    config = report.to_dict()["config"]
    assert config["method"]["name"] == "udfc" and config["quant"]["bits"] == 6
    assert config["preset"] == "balanced" and config["target"] == "fake"
    assert set(config) >= {"graph", "prune", "method", "quant", "storage", "check", "output"}


def test_stage_list_is_one_source(digits_model):
    names = stage_names(CompressConfig.resolve("paper", "fake"))
    assert names == [s.name for s in STAGES if s.name not in ("moments", "quantize", "store")]
    _, report = api.compress(str(digits_model), preset="paper", prune=0.2)
    assert list(report.timings) == names


def test_no_option_writes_a_small_accurate_qdq_model(capfd, tmp_path, digits_model,
                                                     digits_data):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    code, _, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--data",
                       str(digits_data), "--report", str(rep))
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["size_after"] <= 0.3 * report["size_before"]
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.005
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset" in text and "(default: balanced)" in text and "(default: udfc+)" in text


@pytest.mark.parametrize("args, needle", [
    (["--report", "/nonexistent-dir/r.json"], "does not exist"),
    (["--plot", "/nonexistent-dir/p.png"], "does not exist"),
    (["--provider", "cuda"], "not available"),
    (["--data", "models/digits_cnn_bn.json"], "npz"),
])
def test_bad_outputs_and_inputs_leave_no_file(capfd, tmp_path, digits_model, args, needle):
    assert_refused(capfd, tmp_path / "out.onnx", needle, "compress", str(digits_model), *args)


def test_a_failing_late_stage_leaves_no_model(capfd, tmp_path, digits_model, monkeypatch):
    import onnx_udfc.report.plot as plot

    def broken(*_a, **_k):
        raise UdfcError("plot failed")
    monkeypatch.setattr(plot, "plot_report", broken)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--report",
                       str(rep), "--plot", str(tmp_path / "p.png"), "--no-verify")
    assert code == 2 and "plot failed" in err
    assert not out.exists() and not rep.exists()
    assert not any(p.name.startswith(".udfc-") for p in tmp_path.iterdir())
