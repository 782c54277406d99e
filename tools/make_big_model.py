"""Write an MLP whose weights exceed protobuf's 2 GiB limit (stored as external data).

    python tools/make_big_model.py --out bench_out/big_mlp.onnx
    onnx-udfc compress bench_out/big_mlp.onnx -o bench_out/big_pruned.onnx --target fake \
        --method prune --prune 0.5
    onnx-udfc compress bench_out/big_mlp.onnx -o bench_out/big_same.onnx --target fake \
        --method prune --prune 0

Exercises the > 2 GiB paths: loading with external data, shape inference and checking without
serialising the model, and saving with external data when the result is still too large.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/big_mlp.onnx")
    p.add_argument("--width", type=int, default=17000)
    p.add_argument("--features", type=int, default=16384)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    k, h = args.features, args.width
    scale = np.float32(1.0 / np.sqrt(k))
    w1 = (rng.standard_normal((h, k), dtype=np.float32) * scale)
    w2 = (rng.standard_normal((k, h), dtype=np.float32) * scale)
    w3 = rng.standard_normal((10, k), dtype=np.float32) * scale
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1, name="fc1"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
             helper.make_node("Gemm", ["ra", "w2"], ["b"], transB=1, name="fc2"),
             helper.make_node("Relu", ["b"], ["rb"], name="relu2"),
             helper.make_node("Gemm", ["rb", "w3"], ["y"], transB=1, name="fc3")]
    graph = helper.make_graph(
        nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    size = (out.stat().st_size + out.with_name(out.name + ".data").stat().st_size) / 2**30
    print(f"wrote {out} (+ .data), {size:.2f} GiB")


if __name__ == "__main__":
    main()
