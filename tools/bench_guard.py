"""How well the fidelity guard's per-channel error predicts the top-1 drop.

For each model and plan: top-1 on the shared CIFAR-10 images, the worst-channel error
(:mod:`onnx_udfc.report.fidelity`) on those real images and on the guard's data-free
inputs (crops of the built-in photographs for these image models), and the top-1 agreement
on the latter. The guard's limits (``BROKEN_ERROR``, ``BROKEN_AGREEMENT``) were set from this
table.

    python tools/bench_guard.py --md docs/results/guard.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_udfc  # noqa: E402

from onnx_udfc import api  # noqa: E402
from onnx_udfc.core.input_shapes import shape_lists, working_input_shapes  # noqa: E402
from onnx_udfc.core.ort import run, session  # noqa: E402
from onnx_udfc.moments.comparison import guard_feeds  # noqa: E402
from onnx_udfc.moments.input_range import resolve_input_range  # noqa: E402
from onnx_udfc.report.fidelity import BROKEN_AGREEMENT, BROKEN_ERROR, drift  # noqa: E402

MODELS = ["resnet56_cifar10_nm_bn.onnx", "resnet20_cifar10_folded.onnx"]
PLANS = [dict(prune=0.0), dict(bits=3, method="udfc+", target="int4"),
         dict(prune=0.3, method="udfc+"), dict(prune=0.3, bits=4, method="udfc+", target="int4"),
         dict(prune=0.5, method="udfc+"), dict(prune=0.7, method="udfc+"),
         dict(prune=0.3, method="prune"), dict(prune=0.5, method="prune"),
         dict(prune=0.2, method="udfc", bits=4, preset="paper")]


def measure(shared: Path) -> list[dict]:
    manifest = bench_udfc.load_manifest(shared)
    rows = []
    for name in MODELS:
        path = str(shared / "models" / name)
        x, labels, _ = bench_udfc.load_data(shared, bench_udfc.manifest_entry(manifest, name))
        original = api.load(path)
        inp = bench_udfc.input_name(original)
        shapes = shape_lists(working_input_shapes(original))
        feeds = dict(guard_feeds(original, shapes, input_range=resolve_input_range(
            original, "auto", shapes)))
        ref = session(original)
        ref_real = run(ref, {inp: x})[0]
        refs = {kind: run(ref, feed)[0] for kind, feed in feeds.items()}
        base = 100 * float((ref_real.argmax(1) == labels).mean())
        for plan in PLANS:
            options = dict(plan)
            options.setdefault("target", "fake")
            preset = options.pop("preset", None)
            model, _ = api.compress(path, preset=preset, **options)
            sess = session(model)
            real = run(sess, {inp: x})[0]
            row = {"model": name, "plan": plan, "top1_before": base,
                   "top1_after": 100 * float((real.argmax(1) == labels).mean()),
                   "error_real": drift(ref_real, real).error}
            for kind, feed in feeds.items():
                out = run(sess, feed)[0]
                row[f"error_{kind}"] = drift(refs[kind], out).error
                row[f"agreement_{kind}"] = float((out.argmax(1) == refs[kind].argmax(1)).mean())
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    kinds = [k[len("error_"):] for k in rows[0] if k.startswith("error_") and k != "error_real"]
    lines = ["# Fidelity guard: per-channel error against top-1", "",
             "Command: `python tools/bench_guard.py --md docs/results/guard.md`. Top-1 on the "
             "1017 shared CIFAR-10 images; errors are the worst output channel's RMS error over "
             "its spread (`onnx_udfc/report/fidelity.py`), on those real images and on the "
             "guard's 32 data-free images of each kind (pink noise: synthetic; crops of the "
             "built-in photographs: photos). Limits in force: error "
             + ", ".join(f"{BROKEN_ERROR[k]} ({k})" for k in ["data", *kinds]) + "; agreement "
             + ", ".join(f"{BROKEN_AGREEMENT[k]} ({k})" for k in ["data", *kinds]) + ".", "",
             "| model | plan | top-1 | error (real) | "
             + " | ".join(f"error / agreement ({k})" for k in kinds)
             + " | flagged (real / data-free) |",
             "|---|---|---:|---:|" + "---:|" * len(kinds) + "---|"]
    for r in rows:
        real = r["error_real"] > BROKEN_ERROR["data"]
        free = any(r[f"error_{k}"] > BROKEN_ERROR[k] or r[f"agreement_{k}"] < BROKEN_AGREEMENT[k]
                   for k in kinds)
        plan = ", ".join(f"{k} {v}" for k, v in r["plan"].items())
        lines.append(f"| {r['model'].split('_cifar')[0]} {r['model'].split('_')[-1][:-5]} | "
                     f"{plan} | {r['top1_before']:.2f} -> {r['top1_after']:.2f} | "
                     f"{r['error_real']:.3f} | "
                     + " | ".join(f"{r[f'error_{k}']:.3f} / {r[f'agreement_{k}']:.2f}"
                                  for k in kinds)
                     + f" | {'yes' if real else 'no'} / {'yes' if free else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--md", type=Path, help="write the table as markdown")
    args = parser.parse_args()
    rows = measure(args.shared)
    text = markdown(rows)
    if args.md:
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
