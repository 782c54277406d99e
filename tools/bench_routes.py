"""Held-out top-1 of the trained DenseNet and grouped-conv nets of
``tools/make_trained_routes.py`` after pruning, per method (issue 14 item 2: compensation
after a reader's BatchNorm and within a grouped Conv, measured on trained weights).

    python tools/make_trained_routes.py
    python tools/bench_routes.py --md docs/results/routes.md

Every compression keeps float weights (``target="fake"``) so that only the pruning and its
repair show. ``udfc+`` and its sequential fit run data-free (``--moments auto``) over
``--seeds``; the oracle (``udfc+ seq calibrated``) reads 256 of the training images as
``--calibration``. Top-1 on the 2000 held-out MNIST images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_trained_routes import TRAIN, mnist  # noqa: E402

from onnx_udfc import api  # noqa: E402
from onnx_udfc.core.ort import session  # noqa: E402

MODELS = ("densenet_mnist_bn.onnx", "densenet_mnist_folded.onnx", "grouped_mnist.onnx")
CONFIGS = {
    "prune": ({"method": "prune"}, False, False),
    "udfc": ({"method": "udfc"}, False, False),
    "udfc+": ({"method": "udfc+"}, True, False),
    "udfc+ seq": ({"method": "udfc+", "sequential": True}, True, False),
    "udfc+ seq calibrated": ({"method": "udfc+", "sequential": True}, False, True),
}


def top1(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = session(model)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0]
                             for i in range(0, len(x), 500)])
    return 100.0 * float((logits.argmax(1) == y).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--models", type=Path, default=ROOT / "bench_out" / "trained")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    x, y = mnist(args.shared)
    held_x, held_y = x[TRAIN:], y[TRAIN:]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.npz"
        np.savez(calibration, input=x[:256])
        for name in MODELS:
            path = args.models / name
            base = top1(api.load(str(path)), held_x, held_y)
            rows.append({"model": name, "ratio": 0.0, "config": "original", "top1": [base]})
            for ratio in [float(r) for r in args.ratios.split(",")]:
                for config, (kwargs, seeded, calibrated) in CONFIGS.items():
                    row = {"model": name, "ratio": ratio, "config": config, "top1": [],
                           "compensated": None, "seconds": []}
                    for seed in seeds if seeded else [0]:
                        start = time.perf_counter()
                        model, report = api.compress(
                            str(path), prune=ratio, target="fake", seed=seed,
                            calibration=str(calibration) if calibrated else None, **kwargs)
                        row["seconds"].append(time.perf_counter() - start)
                        row["top1"].append(top1(model, held_x, held_y))
                        comps = [c["compensation"] for c in report.layers
                                 if c.get("compensation")]
                        row["compensated"] = f"{sum(c['compensated'] for c in comps)} / " \
                            f"{len(comps)}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    command = "python tools/bench_routes.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    if args.md:
        args.md.write_text(markdown(rows, command))
    return 0


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Compensation through reader BatchNorms and grouped Convs, trained nets", "",
             f"Command: `{command}` (models from `python tools/make_trained_routes.py`).", "",
             "Held-out top-1 (2000 MNIST images; mean ± sd over the seeds where the method "
             "draws data-free samples), pruned layers compensated, float weights.", "",
             "| model | ratio | method | top-1 | compensated |", "|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ratio']:.1f} | {r['config']} | {cell(r['top1'])} "
                     f"| {r.get('compensated') or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
