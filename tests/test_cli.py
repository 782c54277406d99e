"""The command line in-process (``main`` under ``capfd``, which also sees what native code
writes), including every bad input: one line, exit 2, no output. The few checks that need a
real process are in test_cli_smoke.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_udfc.core import io as udfc_io
from tests.helpers import assert_refused, cli, conv_pair


def tiny_model(opset: int = 17, weight: np.ndarray | None = None, height: int | str = 8,
               domain_node: bool = False) -> onnx.ModelProto:
    """Conv -> Relu [-> a com.example Foo] -> Conv, with a dynamic batch."""
    middle = [helper.make_node("Relu", ["a"], ["b"], name="r")]
    if domain_node:
        middle.append(helper.make_node("Foo", ["b"], ["b2"], domain="com.example", name="f"))
    return conv_pair(*middle, opset=opset, height=height, first_weight=weight)


def test_version(capfd):
    code, stdout, _ = cli(capfd, "--version")
    assert code == 0 and stdout.startswith("onnx-udfc ")


def test_compress_writes_model_report_and_summary(capfd, tmp_path, digits_model, digits_data):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--prune", "0.3",
                            "--report", str(rep), "--data", str(digits_data),
                                "--target", "fake", "--method", "prune")
    assert code == 0, err
    assert "params" in stdout and "accuracy" in stdout and "FLOPs" in stdout
    report = json.loads(rep.read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "layers",
                "groups", "timings", "fidelity", "size_before", "size_after"):
        assert key in report
    assert report["params_after"] < report["params_before"]
    assert report["size_after"] == out.stat().st_size
    layer = report["layers"][0]
    for key in ("out_channels_before", "out_channels_after", "params_before", "macs_after",
                "bits", "predicted_error"):
        assert key in layer
    onnx.checker.check_model(str(out), full_check=True)


def test_inspect_lists_groups_and_reasons(capfd, tmp_path, shared_model):
    js = tmp_path / "a.json"
    code, stdout, err = cli(capfd, "inspect", str(shared_model("resnet20_cifar10_bn")), "--json",
                            str(js))
    assert code == 0, err
    assert "coupled" in stdout and "reaches graph output" in stdout
    info = json.loads(js.read_text())
    assert info["params"] > 200_000 and len(info["groups"]) == 11


def test_verify_subcommand(capfd, tmp_path, digits_model, digits_data):
    out = tmp_path / "d.onnx"
    assert cli(capfd, "compress", str(digits_model), "-o", str(out), "-q", "--no-verify",
        "--target", "fake", "--method", "prune")[0] == 0
    code, _, err = cli(capfd, "verify", str(digits_model), str(out), "--data", str(digits_data),
                       "--json", str(tmp_path / "v.json"))
    assert code == 0, err
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["accuracy_before"] == v["accuracy_after"] > 0.95  # ratio 0: identical
    assert v["fidelity"][0]["max_abs"] < 1e-6


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("case,needle", [
    ("truncated", "not a valid ONNX model"),
    ("text", "not a valid ONNX model"),
    ("empty_graph", "graph is empty"),
    ("opset7", "below the supported minimum"),
    ("nan", "NaN or Inf"),
    ("undeclared_domain", "does not declare"),
    ("dynamic", "dynamic dimension"),
    ("missing", "no such file"),
])
def test_bad_model_inputs(capfd, tmp_path, case, needle, digits_model):
    src = tmp_path / "in.onnx"
    if case == "truncated":
        src.write_bytes(digits_model.read_bytes()[:5000])
    elif case == "text":
        src.write_text("this is not a model\n" * 50)
    elif case == "empty_graph":
        m = tiny_model()
        del m.graph.node[:]
        _write(src, m)
    elif case == "opset7":
        _write(src, tiny_model(opset=7))
    elif case == "nan":
        w = np.ones((8, 3, 3, 3), np.float32)
        w[0, 0, 0, 0] = np.nan
        _write(src, tiny_model(weight=w))
    elif case == "undeclared_domain":
        _write(src, tiny_model(domain_node=True))
    elif case == "dynamic":  # a dynamic channel axis: no size can be guessed
        m = tiny_model()
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
        _write(src, m)
    assert_refused(capfd, tmp_path / "out.onnx", needle, "compress", str(src), "--prune", "0.3",
        "--target", "fake", "--method", "prune")


@pytest.mark.parametrize("args,needle", [
    (["--prune", "1.0"], "outside [0, 1)"),
    (["--prune", "-0.1"], "outside [0, 1)"),
    (["--exclude", "("], "bad --exclude regex"),
    (["--input-shape", "x:1xAx8"], "bad --input-shape"),
])
def test_bad_options(capfd, tmp_path, digits_model, args, needle):
    assert_refused(capfd, tmp_path / "out.onnx", needle, "compress", str(digits_model), *args,
        "--target", "fake", "--method", "prune")


def test_output_equal_to_input_refused(capfd, tmp_path, digits_model):
    src = tmp_path / "m.onnx"
    src.write_bytes(digits_model.read_bytes())
    before = src.read_bytes()
    code, _, err = cli(capfd, "compress", str(src), "-o", str(src), "--prune", "0.3",
        "--target", "fake", "--method", "prune")
    assert code == 2 and "output path is the input" in err
    assert src.read_bytes() == before


def test_unwritable_output_refused(capfd, tmp_path, digits_model):
    out = tmp_path / "no" / "such" / "dir" / "m.onnx"
    code, _, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--prune", "0.3",
        "--target", "fake", "--method", "prune")
    assert code == 2 and "does not exist" in err.strip()
    assert len(err.strip().splitlines()) == 1


def test_missing_verify_data(capfd, tmp_path, digits_model):
    code, _, err = cli(capfd, "verify", str(digits_model), str(digits_model), "--data",
                       str(tmp_path / "x.npz"))
    assert code == 2 and "data file not found" in err


def test_dynamic_shape_can_be_fixed_by_user(capfd, tmp_path):
    src = _write(tmp_path / "in.onnx", tiny_model(height="H"))
    out = tmp_path / "out.onnx"
    code, _, err = cli(capfd, "compress", str(src), "-o", str(out), "--prune", "0.5",
                       "--input-shape", "x:1x3x8x8", "--no-verify",
                           "--target", "fake", "--method", "prune")
    assert code == 0, err
    assert onnx.load(str(out)).graph.initializer[0].dims[0] == 4


def test_unsupported_custom_op_left_untouched_and_reported(tmp_path):
    m = tiny_model(domain_node=True)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    from onnx_udfc import api

    pruned, report = api.compress(m, prune=0.5, check=False, target="fake", method="prune")
    assert report.unsupported and "Foo" in report.unsupported[0]["reason"]
    assert [tuple(t.dims) for t in pruned.graph.initializer] == \
        [tuple(t.dims) for t in m.graph.initializer]
    foo = next(n for n in pruned.graph.node if n.op_type == "Foo")
    assert list(foo.input) == ["b"] and list(foo.output) == ["b2"]


def test_external_data_roundtrip_and_auto_switch(capfd, tmp_path, monkeypatch, digits_model):
    src = tmp_path / "ext.onnx"
    m = onnx.load(str(digits_model))
    onnx.save_model(m, str(src), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    out = tmp_path / "o.onnx"
    code, _, err = cli(capfd, "compress", str(src), "-o", str(out), "--prune", "0.3",
                       "--external-data", "--no-verify", "--target", "fake", "--method", "prune")
    assert code == 0, err
    assert (tmp_path / "o.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    # Above the protobuf limit the save switches to external data by itself.
    monkeypatch.setattr(udfc_io, "PROTOBUF_LIMIT", 1000)
    auto = tmp_path / "auto.onnx"
    udfc_io.save_model(udfc_io.load_model(src), auto, check=True)
    assert (tmp_path / "auto.onnx.data").is_file()
    assert udfc_io.load_model(auto).graph.initializer[0].HasField("raw_data")


def test_missing_external_data_refused(capfd, tmp_path, digits_model):
    src = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(digits_model)), str(src), save_as_external_data=True,
                    location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert_refused(capfd, tmp_path / "out.onnx", "external data", "compress", str(src),
        "--target", "fake", "--method", "prune")


def test_metadata_and_names_survive(capfd, tmp_path, digits_model):
    m = onnx.load(str(digits_model))
    m.doc_string = "my model"
    onnx.helper.set_model_props(m, {"author": "me"})
    m.graph.node[0].doc_string = "first"
    src = _write(tmp_path / "m.onnx", m)
    out = tmp_path / "o.onnx"
    assert cli(capfd, "compress", str(src), "-o", str(out), "--prune", "0.3", "-q",
               "--no-verify", "--target", "fake", "--method", "prune")[0] == 0
    o = onnx.load(str(out))
    assert o.doc_string == "my model" and o.metadata_props[0].value == "me"
    assert o.graph.node[0].doc_string == "first" and o.opset_import == m.opset_import
    assert [n.name for n in o.graph.node] == [n.name for n in m.graph.node]


def test_exclude_and_round_to(shared_model):
    from onnx_udfc import api

    path = str(shared_model("resnet56_cifar10_nm_bn"))
    _, base = api.compress(path, prune=0.3, target="fake", method="prune")
    _, excl = api.compress(path, prune=0.3, exclude=[r"layer3"], target="fake", method="prune")
    untouched = [x for x in excl.layers if "layer3" in x["name"]]
    assert untouched and all(x["out_channels_after"] == x["out_channels_before"] and
                             x["in_channels_after"] == x["in_channels_before"]
                             for x in untouched)
    assert excl.params_after > base.params_after
    _, rounded = api.compress(path, prune=0.3, round_to=8, target="fake", method="prune")
    for g in rounded.groups:
        if g["removed"]:
            assert g["kept"] % 8 == 0


def test_cuda_provider_unavailable_is_one_line(capfd, digits_model):
    import onnxruntime as ort

    code, _, err = cli(capfd, "verify", str(digits_model), str(digits_model), "--provider",
                       "cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert code == 0
        return
    assert code == 2 and "provider 'cuda' is not available" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bits", ["1", "9", "six"])
def test_bad_bits(capfd, tmp_path, digits_model, bits):
    assert_refused(capfd, tmp_path / "out.onnx", "bits must be an integer in 2..8", "compress",
                   str(digits_model), "--bits", bits, "--target", "fake", "--method", "prune")


def test_evaluate_digits_and_npz(capfd, tmp_path, digits_model, digits_data):
    code, _, err = cli(capfd, "evaluate", str(digits_model), "--dataset", "digits", "--json",
                       str(tmp_path / "e.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())[str(digits_model)]
    meta = json.loads((digits_model.parent / "digits_cnn_bn.json").read_text())
    assert result["top1"] == pytest.approx(meta["top1_test"]) and result["samples"] == 450
    code, stdout, _ = cli(capfd, "evaluate", str(digits_model), "--data", str(digits_data),
                          "--limit", "50")
    assert code == 0 and "on 50 samples" in stdout


def test_evaluate_missing_data_file(capfd, tmp_path, digits_model):
    code, _, err = cli(capfd, "evaluate", str(digits_model), "--data",
                       str(tmp_path / "missing.npz"))
    assert code == 2 and "data file not found" in err
    assert len(err.strip().splitlines()) == 1


def test_digits_split_matches_committed_test_set(digits_data):
    from onnx_udfc.report.datasets import digits_test_set

    images, labels = digits_test_set()
    npz = np.load(digits_data)
    assert np.array_equal(images, npz["images"]) and np.array_equal(labels, npz["labels"])


def test_plot_and_verbose_layer_table(capfd, tmp_path, digits_model):
    out, png = tmp_path / "o.onnx", tmp_path / "p.png"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--prune", "0.3",
                            "--method", "udfc", "--bits", "6", "--plot", str(png), "-v",
                            "--no-verify", "--target", "fake")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "pred.err" in stdout and "/block/conv1/Conv" in stdout


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    import builtins

    from onnx_udfc import UdfcError
    from onnx_udfc.report.plot import plot_report

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(UdfcError, match="needs matplotlib"):
        plot_report({"layers": [{}]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_quiet_prints_nothing_and_pipes_get_no_progress(capfd, tmp_path, digits_model):
    args = ("compress", str(digits_model), "-o", str(tmp_path / "o.onnx"), "--prune", "0.3",
            "--no-verify")
    code, stdout, err = cli(capfd, *args, "-q")
    assert code == 0 and stdout == "" and err == ""
    _, stdout, err = cli(capfd, *args)
    assert "[#" not in err and "params" in stdout


def test_models_over_the_protobuf_limit_run_in_onnx_runtime_from_a_file(
        capfd, tmp_path, monkeypatch, digits_model, digits_data):
    # Every in-memory session (the float share's sensitivity, the method selection, the
    # moments) of a model protobuf cannot serialise goes through a file with external data.
    from onnx_udfc.core import ort as udfc_ort

    monkeypatch.setattr(udfc_io, "PROTOBUF_LIMIT", 1000)
    saved = []
    real_save = udfc_io.save_model

    def spy(model, path, **kwargs):
        saved.append(kwargs.get("external_data"))
        return real_save(model, path, **kwargs)
    monkeypatch.setattr(udfc_io, "save_model", spy)
    out = tmp_path / "o.onnx"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--preset",
                            "best", "--prune", "0.2", "--data", str(digits_data))
    assert code == 0, err
    assert "select  kept" in stdout and "share   " in stdout and "guard   ok" in stdout
    assert saved.count(True) >= 3  # sessions from files, and the output itself
    assert udfc_ort.session(onnx.load(str(digits_model))) is not None
