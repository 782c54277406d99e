"""File size on disk of ``--format qdq`` models against the FP32 file, with the breakdown that
explains it.

For every model and storage mode the model is compressed with ``--target fake --method prune
--bits B --quantizer symmetric --format qdq`` (no pruning, per-tensor unless the mode says
otherwise), saved, and its size on disk divided by the FP32 file's.
The breakdown splits the FP32 file into the weights of Conv/Gemm/MatMul layers (what integer
storage shrinks) and the rest (BatchNorm statistics, biases, graph structure), which stays.

Usage (from the repository root; ResNet-50-size models from ``python tools/make_resnet50.py``)::

    python tools/bench_size.py                      # shared ResNets + bench_out ResNet-50s
    python tools/bench_size.py --fold-bn            # BatchNorm folded into the convolutions
    python tools/bench_size.py MODEL.onnx ... --json sizes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx

from onnx_udfc import api

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = [ROOT.parent / "shared" / "models" / f"{n}.onnx" for n in (
    "resnet20_cifar10_bn", "resnet20_cifar10_folded", "resnet56_cifar10_bn",
    "resnet56_cifar10_nm_bn", "resnet56_cifar10_nm_folded")] + [
    ROOT / "bench_out" / "resnet50_bn.onnx", ROOT / "bench_out" / "resnet50_folded.onnx"]
MODES = {
    "int8 tensor": dict(bits=8, granularity="tensor"),
    "int8 channel": dict(bits=8, granularity="channel"),
    "int4 channel": dict(bits=4, granularity="channel"),
    "int4 block32": dict(bits=4, block_size=32),
    "int4 block128": dict(bits=4, block_size=128),
}
TARGETS = {8: 0.27, 4: 0.15}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the Conv/Gemm/MatMul weights: the part integer storage shrinks."""
    names = {n.input[1] for n in model.graph.node
             if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1}
    return sum(len(t.raw_data) for t in model.graph.initializer if t.name in names)


def measure(path: Path, fold_bn: bool, workdir: Path) -> dict:
    fp32 = path.stat().st_size
    weights = weight_bytes(onnx.load(str(path)))
    row = {"model": path.name, "fp32_bytes": fp32, "weight_share": weights / fp32, "modes": {}}
    for label, kw in MODES.items():
        model, report = api.compress(str(path), target="fake", method="prune",
                                     quantizer="symmetric", format="qdq", fold_bn=fold_bn,
                                     check=False, **kw)
        size = api.save_compressed(model, workdir / "out.onnx", check=False)
        stored = [x["quantization"]["storage"] for x in report.layers if x["quantization"]]
        row["modes"][label] = {
            "bytes": size, "ratio": size / fp32,
            "meets_target": size <= TARGETS[kw["bits"]] * fp32,
            "stored_weight_ratio": sum(s["bytes"] for s in stored) / max(
                1, sum(s["float_bytes"] for s in stored))}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--fold-bn", action="store_true", help="fold BatchNorm first")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args(argv)
    models = args.models or [p for p in DEFAULT_MODELS if p.is_file()]
    if not models:
        print("no models found (run tools/make_resnet50.py?)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in models:
            rows.append(measure(path, args.fold_bn, Path(tmp)))
    print(f"| model{' (BN folded)' if args.fold_bn else ''} | FP32 | conv/fc weights | "
          + " | ".join(MODES) + " |")
    print("|---|---:|---:|" + "---:|" * len(MODES))
    for r in rows:
        cells = [f"{m['ratio']:.3f}x" + ("" if m["meets_target"] else " *")
                 for m in r["modes"].values()]
        print(f"| {r['model']} | {r['fp32_bytes'] / 2**20:.2f} MiB | "
              f"{100 * r['weight_share']:.1f} % | " + " | ".join(cells) + " |")
    print("\n* misses the target (int8 <= 0.27x, int4 <= 0.15x of the FP32 file)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
