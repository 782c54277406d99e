"""How many pruned layers ``udfc+`` compensates, per model (issue 14: at least 90 % on every
third-party model and every zoo model), and why the others are not.

    python tools/bench_coverage.py --extra DIR/common.onnx \
        --md docs/results/coverage_udfc_plus.md
    python tools/bench_coverage.py --fidelity --only densenet,alexnet \
        --md docs/results/coverage_fidelity.md

Each model is compressed with ``api.compress(path, prune=R, method="udfc+", target="fake")``
(default R 0.2). Zoo fixtures are unpacked to a temporary folder first, with seeded weights in
place of their placeholders (``zoo_light.materialise``, as the tests load them): the
placeholders are one constant, under which every channel is every other's copy, and the ops
that compute them would stand between a layer and its affine.

``--fidelity`` (zoo fixtures only: random weights, so no task metric exists) measures instead
how far each compression moves the outputs: the RMS output error over the RMS output, on 16
standard-normal inputs, for plain pruning and for ``udfc+`` one-shot and sequential, each
data-free and with 128 other standard-normal inputs as ``--calibration`` (the inputs' own
distribution: the random BatchNorm statistics describe nothing, so only measured inputs tell
whether the repair itself is right).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_zoo  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from zoo_light import materialise  # noqa: E402

from onnx_udfc import api  # noqa: E402
from onnx_udfc.core.errors import UdfcError  # noqa: E402

TARGET = 0.9


def measure(path: Path, ratio: float) -> dict:
    start = time.perf_counter()
    try:
        _, report = api.compress(str(path), prune=ratio, method="udfc+", target="fake")
    except UdfcError as exc:
        return {"model": path.name, "error": str(exc)}
    comps = [x["compensation"] for x in report.layers if x.get("compensation")]
    reasons = collections.Counter(_generic(c.get("reason", "")) for c in comps
                                  if not c["compensated"])
    return {"model": path.name, "pruned": len(comps),
            "compensated": sum(1 for c in comps if c["compensated"]),
            "reasons": dict(reasons), "seconds": time.perf_counter() - start}


FIDELITY_RUNS = {"prune": {"method": "prune"}, "udfc+": {"method": "udfc+"},
                 "udfc+ seq": {"method": "udfc+", "sequential": True}}


def fidelity(path: Path, ratio: float, folder: Path) -> dict:
    """Output errors of each of :data:`FIDELITY_RUNS`, data-free and calibrated (module doc)."""
    from onnx_udfc.core.ort import session
    from onnx_udfc.moments.feeds import fixed_inputs

    model = onnx.load(str(path))
    fixed = fixed_inputs(model)
    inits = {t.name for t in model.graph.initializer}
    [inp] = [i for i in model.graph.input if i.name not in inits and i.name not in fixed]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    sample = [d or 32 for d in dims[1:]]
    rng = np.random.default_rng(0)
    test = rng.standard_normal([16, *sample]).astype(np.float32)
    calibration = folder / f"{path.stem}_calibration.npz"
    np.savez(calibration, **{inp.name: rng.standard_normal([128, *sample]).astype(np.float32)})

    def outputs(m: onnx.ModelProto) -> np.ndarray:
        sess = session(m)
        step = 1 if dims[0] == 1 else len(test)  # a batch baked into the graph: one at a time
        return np.concatenate([np.concatenate([o.reshape(len(test[i:i + step]), -1) for o in
                                               sess.run(None, {inp.name: test[i:i + step]})],
                                              axis=1) for i in range(0, len(test), step)])

    reference = outputs(model)
    scale = float(np.sqrt(np.mean(reference ** 2)))
    row: dict = {"model": path.name, "errors": {}}
    for name, kwargs in FIDELITY_RUNS.items():
        for data, given in (("data-free", None), ("calibrated", str(calibration))):
            if name == "prune" and given:
                continue
            compressed, _ = api.compress(str(path), prune=ratio, target="fake",
                                         calibration=given, **kwargs)
            err = float(np.sqrt(np.mean((outputs(compressed) - reference) ** 2))) / scale
            row["errors"][f"{name} {data}" if name != "prune" else name] = err
    return row


def fidelity_markdown(rows: list[dict], command: str) -> str:
    keys = list(rows[0]["errors"]) if rows else []
    lines = ["# Output error after pruning, random-weight zoo fixtures", "",
             f"Command: `{command}`.", "",
             "RMS output error over the RMS output on 16 standard-normal inputs (0: unchanged). "
             "`calibrated`: `--calibration` with 128 other inputs of the same distribution.",
             "", "| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['errors'][k]:.3f}" for k in keys)
                     + " |")
    return "\n".join(lines) + "\n"


def _generic(reason: str) -> str:
    """The reason without node names, so that rows group."""
    import re

    return re.sub(r"'[^']*'", "'...'", reason)


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# udfc+ compensation coverage", "", f"Command: `{command}`.", "",
             "| model | compensated / pruned layers | share | >= 90 % | not compensated, why |",
             "|---|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | refused: {r['error']} | | | |")
            continue
        share = r["compensated"] / r["pruned"] if r["pruned"] else 1.0
        why = "; ".join(f"{n}x {k}" for k, n in r["reasons"].items())
        lines.append(f"| {r['model']} | {r['compensated']} / {r['pruned']} | {100 * share:.0f} % "
                     f"| {'yes' if share >= TARGET else '**no**'} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--zoo", type=Path, default=ROOT / "tests" / "fixtures" / "zoo")
    parser.add_argument("--extra", type=Path, nargs="*", default=[])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--fidelity", action="store_true",
                        help="output errors of the zoo fixtures instead (module doc)")
    parser.add_argument("--only", default="",
                        help="comma-separated parts of file names to keep, e.g. densenet")
    args = parser.parse_args()
    keep = [p for p in args.only.split(",") if p]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [] if args.fidelity else \
            sorted((args.shared / "models" / "thirdparty").glob("*.onnx")) + list(args.extra)
        for gz in sorted(args.zoo.glob("*.onnx.gz")):
            plain = Path(tmp) / gz.name[:-3]
            model = bench_zoo.load(gz)
            if any(n.op_type == "ConstantOfShape" for n in model.graph.node):
                model = materialise(model, seed=0)
            onnx.save(model, str(plain))
            paths.append(plain)
        for path in paths:
            if keep and not any(k in path.name for k in keep):
                continue
            rows.append(fidelity(path, args.ratio, Path(tmp)) if args.fidelity
                        else measure(path, args.ratio))
            print(rows[-1], flush=True)
    if args.md:
        command = "python tools/bench_coverage.py " + " ".join(sys.argv[1:])
        args.md.write_text(fidelity_markdown(rows, command) if args.fidelity
                           else markdown(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
