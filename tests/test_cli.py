"""The command line, end to end, including every bad input: one line, exit 2, no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc.cli import main
from onnx_udfc.core import io as udfc_io


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_udfc", *args], capture_output=True,
                          text=True, timeout=300)


def tiny_model(opset: int = 17, weight: np.ndarray | None = None, height="8",
               domain_node: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) if weight is None else weight
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    if domain_node:
        nodes.insert(2, helper.make_node("Foo", ["b"], ["b2"], domain="com.example", name="f"))
        nodes[3].input[0] = "b2"
    hdim = int(height) if height.isdigit() else height
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hdim, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, hdim, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def assert_refused(result: subprocess.CompletedProcess, out: Path, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-udfc: error:"), result.stderr
    assert needle in lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".udfc-") for p in out.parent.iterdir())


def test_version_and_module_entry():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("onnx-udfc ")


def test_compress_writes_model_report_and_summary(tmp_path, digits_model):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    data = digits_model.parent / "digits_test.npz"
    r = cli("compress", str(digits_model), "-o", str(out), "--prune", "0.3", "--report",
            str(rep), "--data", str(data))
    assert r.returncode == 0, r.stderr
    assert "params" in r.stdout and "accuracy" in r.stdout and "FLOPs" in r.stdout
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


def test_inspect_lists_groups_and_reasons(tmp_path, shared):
    js = tmp_path / "a.json"
    r = cli("inspect", str(shared / "models" / "resnet20_cifar10_bn.onnx"), "--json", str(js))
    assert r.returncode == 0, r.stderr
    assert "coupled" in r.stdout and "reaches graph output" in r.stdout
    info = json.loads(js.read_text())
    assert info["params"] > 200_000 and len(info["groups"]) == 11


def test_verify_subcommand(tmp_path, digits_model):
    out = tmp_path / "d.onnx"
    assert main(["compress", str(digits_model), "-o", str(out), "-q", "--no-verify"]) == 0
    r = cli("verify", str(digits_model), str(out), "--data",
            str(digits_model.parent / "digits_test.npz"), "--json", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stderr
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
def test_bad_model_inputs(tmp_path, case, needle, digits_model):
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
    elif case == "dynamic":
        _write(src, tiny_model(height="H"))
    out = tmp_path / "out.onnx"
    assert_refused(cli("compress", str(src), "-o", str(out), "--prune", "0.3"), out, needle)


@pytest.mark.parametrize("args,needle", [
    (["--prune", "1.0"], "outside [0, 1)"),
    (["--prune", "-0.1"], "outside [0, 1)"),
    (["--exclude", "("], "bad --exclude regex"),
    (["--input-shape", "x:1xAx8"], "bad --input-shape"),
])
def test_bad_options(tmp_path, digits_model, args, needle):
    out = tmp_path / "out.onnx"
    assert_refused(cli("compress", str(digits_model), "-o", str(out), *args), out, needle)


def test_output_equal_to_input_refused(tmp_path, digits_model):
    src = tmp_path / "m.onnx"
    src.write_bytes(digits_model.read_bytes())
    before = src.read_bytes()
    r = cli("compress", str(src), "-o", str(src), "--prune", "0.3")
    assert r.returncode == 2 and "output path is the input" in r.stderr
    assert src.read_bytes() == before


def test_unwritable_output_refused(tmp_path, digits_model):
    out = tmp_path / "no" / "such" / "dir" / "m.onnx"
    r = cli("compress", str(digits_model), "-o", str(out), "--prune", "0.3")
    assert r.returncode == 2 and "does not exist" in r.stderr.strip()
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_verify_data(tmp_path, digits_model):
    r = cli("verify", str(digits_model), str(digits_model), "--data", str(tmp_path / "x.npz"))
    assert r.returncode == 2 and "data file not found" in r.stderr


def test_dynamic_shape_can_be_fixed_by_user(tmp_path):
    src = _write(tmp_path / "in.onnx", tiny_model(height="H"))
    out = tmp_path / "out.onnx"
    r = cli("compress", str(src), "-o", str(out), "--prune", "0.5", "--input-shape",
            "x:1x3x8x8", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert onnx.load(str(out)).graph.initializer[0].dims[0] == 4


def test_unsupported_custom_op_left_untouched_and_reported(tmp_path):
    m = tiny_model(domain_node=True)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    from onnx_udfc import api

    pruned, report = api.compress(m, prune=0.5, check=False)
    assert report.unsupported and "Foo" in report.unsupported[0]["reason"]
    assert [tuple(t.dims) for t in pruned.graph.initializer] == \
        [tuple(t.dims) for t in m.graph.initializer]
    foo = next(n for n in pruned.graph.node if n.op_type == "Foo")
    assert list(foo.input) == ["b"] and list(foo.output) == ["b2"]


def test_external_data_roundtrip_and_auto_switch(tmp_path, monkeypatch, digits_model):
    src = tmp_path / "ext.onnx"
    m = onnx.load(str(digits_model))
    onnx.save_model(m, str(src), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    out = tmp_path / "o.onnx"
    r = cli("compress", str(src), "-o", str(out), "--prune", "0.3", "--external-data",
            "--no-verify")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    # Above the protobuf limit the save switches to external data by itself.
    monkeypatch.setattr(udfc_io, "PROTOBUF_LIMIT", 1000)
    auto = tmp_path / "auto.onnx"
    udfc_io.save_model(udfc_io.load_model(src), auto, check=True)
    assert (tmp_path / "auto.onnx.data").is_file()
    assert udfc_io.load_model(auto).graph.initializer[0].HasField("raw_data")


def test_missing_external_data_refused(tmp_path, digits_model):
    src = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(digits_model)), str(src), save_as_external_data=True,
                    location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    out = tmp_path / "out.onnx"
    assert_refused(cli("compress", str(src), "-o", str(out)), out, "external data")


def test_metadata_and_names_survive(tmp_path, digits_model):
    m = onnx.load(str(digits_model))
    m.doc_string = "my model"
    onnx.helper.set_model_props(m, {"author": "me"})
    m.graph.node[0].doc_string = "first"
    src = _write(tmp_path / "m.onnx", m)
    out = tmp_path / "o.onnx"
    assert main(["compress", str(src), "-o", str(out), "--prune", "0.3", "-q",
                 "--no-verify"]) == 0
    o = onnx.load(str(out))
    assert o.doc_string == "my model" and o.metadata_props[0].value == "me"
    assert o.graph.node[0].doc_string == "first" and o.opset_import == m.opset_import
    assert [n.name for n in o.graph.node] == [n.name for n in m.graph.node]


def test_exclude_and_round_to(shared):
    from onnx_udfc import api

    path = str(shared / "models" / "resnet56_cifar10_nm_bn.onnx")
    _, base = api.compress(path, prune=0.3)
    _, excl = api.compress(path, prune=0.3, exclude=[r"layer3"])
    untouched = [x for x in excl.layers if "layer3" in x["name"]]
    assert untouched and all(x["out_channels_after"] == x["out_channels_before"] and
                             x["in_channels_after"] == x["in_channels_before"]
                             for x in untouched)
    assert excl.params_after > base.params_after
    _, rounded = api.compress(path, prune=0.3, round_to=8)
    for g in rounded.groups:
        if g["removed"]:
            assert g["kept"] % 8 == 0


def test_cuda_provider_unavailable_is_one_line(tmp_path, digits_model):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        r = cli("verify", str(digits_model), str(digits_model), "--provider", "cuda")
        assert r.returncode == 0
        return
    r = cli("verify", str(digits_model), str(digits_model), "--provider", "cuda")
    assert r.returncode == 2 and "provider 'cuda' is not available" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bits", ["1", "9", "six"])
def test_bad_bits(tmp_path, digits_model, bits):
    out = tmp_path / "out.onnx"
    assert_refused(cli("compress", str(digits_model), "-o", str(out), "--bits", bits), out,
                   "bits must be an integer in 2..8")


def test_evaluate_digits_and_npz(tmp_path, digits_model):
    r = cli("evaluate", str(digits_model), "--dataset", "digits", "--json",
            str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "e.json").read_text())[str(digits_model)]
    meta = json.loads((digits_model.parent / "digits_cnn_bn.json").read_text())
    assert result["top1"] == pytest.approx(meta["top1_test"]) and result["samples"] == 450
    r = cli("evaluate", str(digits_model), "--data", str(digits_model.parent /
                                                         "digits_test.npz"), "--limit", "50")
    assert r.returncode == 0 and "on 50 samples" in r.stdout


def test_evaluate_missing_data_file(tmp_path, digits_model):
    r = cli("evaluate", str(digits_model), "--data", str(tmp_path / "missing.npz"))
    assert r.returncode == 2 and "data file not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_digits_split_matches_committed_test_set(digits_model):
    from onnx_udfc.report.datasets import digits_test_set

    images, labels = digits_test_set()
    npz = np.load(digits_model.parent / "digits_test.npz")
    assert np.array_equal(images, npz["images"]) and np.array_equal(labels, npz["labels"])


def test_plot_and_verbose_layer_table(tmp_path, digits_model):
    out, png = tmp_path / "o.onnx", tmp_path / "p.png"
    r = cli("compress", str(digits_model), "-o", str(out), "--prune", "0.3", "--method", "udfc",
            "--bits", "6", "--plot", str(png), "-v", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "pred.err" in r.stdout and "/block/conv1/Conv" in r.stdout


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


def test_quiet_prints_nothing_and_pipes_get_no_progress(tmp_path, digits_model):
    r = cli("compress", str(digits_model), "-o", str(tmp_path / "o.onnx"), "--prune", "0.3",
            "-q", "--no-verify")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = cli("compress", str(digits_model), "-o", str(tmp_path / "o.onnx"), "--prune", "0.3",
            "--no-verify")
    assert "[#" not in r.stderr and "params" in r.stdout


def test_progress_bar_on_a_tty(tmp_path, digits_model):
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "onnx_udfc", "compress", str(digits_model),
                             "-o", str(tmp_path / "o.onnx"), "--prune", "0.3", "--no-verify"],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    assert b"[#" in b"".join(chunks)
