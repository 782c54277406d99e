"""What each preset and target gives: top-1 before/after, file size and wall time.

For every model, preset (``fast``, ``balanced``, ``best``, ``max``, ``paper``), target
(``int8``, ``int4``; ``fake`` for ``paper``, whose grid has no integer codes) and pruning ratio
(``--ratios``, default 0 and 0.3) the model is compressed in-process with
``api.compress(path, preset=..., target=..., prune=...)`` and nothing else set, so every row
is what a user gets from ``onnx-udfc compress MODEL -o OUT --preset P --target T --prune R``.
Per row: top-1 of the original and of the result in ONNX Runtime (CPU), the saved file's size
over the original file's, and the wall time of ``api.compress`` (median of ``--runs``; ``max``
runs once, its model inversion taking minutes, with the inversion cache cleared so that every
``max`` row pays for its own inversion).

Then the first-run command of the README, all defaults, as a user runs it::

    onnx-udfc compress models/digits_cnn_bn.onnx -o d.onnx --data models/digits_test.npz

(``python -m onnx_udfc`` in a subprocess; accuracy from its ``--report``, size from the files).

Models: ``digits`` (the embedded ``models/digits_cnn_bn.onnx`` on ``models/digits_test.npz``)
and ``resnet56`` (the shared NM ResNet-56 with BN, on the 1017 shared CIFAR-10 images,
preprocessed as ``shared/models/manifest.json`` says, by ``bench_udfc.load_data``). Usage::

    python tools/bench_presets.py                       # both models; max on digits only
    python tools/bench_presets.py --max-on digits,resnet56
    python tools/bench_presets.py --models digits --md docs/results/presets.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_udfc import (  # noqa: E402  (one data loader for every benchmark)
    DEFAULT_SHARED,
    evaluate,
    input_name,
    load_data,
    load_manifest,
    manifest_entry,
    versions,
)

from onnx_udfc import api  # noqa: E402
from onnx_udfc.config import PRESETS  # noqa: E402
from onnx_udfc.moments import inverted  # noqa: E402

DIGITS_MODEL = ROOT / "models" / "digits_cnn_bn.onnx"
DIGITS_DATA = ROOT / "models" / "digits_test.npz"
RESNET56 = "resnet56_cifar10_nm_bn.onnx"
SLOW_PRESETS = ("max",)


def targets_of(preset: str) -> tuple[str, ...]:
    """The paper's grid has no zero level, so ``paper`` is measured in its own ``fake``."""
    return ("fake",) if PRESETS[preset].get("target") == "fake" else ("int8", "int4")


def load_model_data(name: str, shared: Path) -> tuple[Path, np.ndarray, np.ndarray, str]:
    if name == "digits":
        with np.load(DIGITS_DATA) as npz:
            return DIGITS_MODEL, npz["images"], npz["labels"].astype(np.int64), DIGITS_DATA.name
    entry = manifest_entry(load_manifest(shared), RESNET56)
    x, y, data_name = load_data(shared, entry)
    return shared / "models" / entry["file"], x, y, data_name


def compress_timed(path: Path, runs: int, **options: Any) -> tuple[onnx.ModelProto, Any, list]:
    times, model, report = [], None, None
    for _ in range(runs):
        if options["preset"] in SLOW_PRESETS:
            inverted._CACHE.clear()  # every timed run pays for its own inversion
        start = time.perf_counter()
        model, report = api.compress(str(path), check=False, **options)
        times.append(time.perf_counter() - start)
    return model, report, times


def bench_model(name: str, args: argparse.Namespace, workdir: Path, log) -> dict[str, Any]:
    path, x, y, data_name = load_model_data(name, args.shared)
    original = onnx.load(str(path))
    feed = input_name(original)
    top1_before, _ = evaluate(original, feed, x, y)
    size_before = path.stat().st_size
    log(f"[{name}] {path.name}: top-1 {top1_before:.2f}% on {len(y)} images of {data_name}")
    rows = []
    for preset in args.presets:
        if preset in SLOW_PRESETS and name not in args.max_on:
            continue
        runs = 1 if preset in SLOW_PRESETS else args.runs
        for target in targets_of(preset):
            for ratio in args.ratios:
                model, report, times = compress_timed(path, runs, preset=preset, target=target,
                                                      prune=ratio)
                size = api.save_compressed(model, workdir / "out.onnx", check=False)
                top1_after, _ = evaluate(model, feed, x, y)
                row = {"preset": preset, "target": target, "prune": ratio,
                       "top1_before": top1_before, "top1_after": top1_after,
                       "size_ratio": size / size_before, "size_bytes": size,
                       "wall_s": statistics.median(times), "wall_runs_s": times, "runs": runs,
                       "flops_ratio": report.flops_after / report.flops_before}
                rows.append(row)
                log(f"  {preset:8s} {target:4s} prune {ratio:.1f}: top-1 {top1_after:6.2f}%  "
                    f"size {row['size_ratio']:.3f}x  {row['wall_s']:.2f}s ({runs} run(s))")
    return {"name": name, "file": path.name, "data": data_name, "images": len(y),
            "size_before": size_before, "top1_before": top1_before, "rows": rows}


def first_run(workdir: Path, log) -> dict[str, Any]:
    """The README's first command, all defaults, in a fresh interpreter."""
    out, report_path = workdir / "d.onnx", workdir / "d_report.json"
    command = [sys.executable, "-m", "onnx_udfc", "compress", str(DIGITS_MODEL.relative_to(ROOT)),
               "-o", str(out), "--data", str(DIGITS_DATA.relative_to(ROOT)),
               "--report", str(report_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = json.loads(report_path.read_text())
    result = {
        "command": "onnx-udfc compress models/digits_cnn_bn.onnx -o d.onnx "
                   "--data models/digits_test.npz",
        "preset": report["config"]["preset"], "target": report["config"]["target"],
        "size_before": DIGITS_MODEL.stat().st_size, "size_after": out.stat().st_size,
        "top1_before": 100 * report["accuracy_before"],
        "top1_after": 100 * report["accuracy_after"], "wall_s": wall}
    result["size_ratio"] = result["size_after"] / result["size_before"]
    log(f"[first run] {result['preset']}/{result['target']}: size {result['size_ratio']:.3f}x, "
        f"top-1 {result['top1_before']:.2f}% -> {result['top1_after']:.2f}% ({wall:.1f}s)")
    return result


def markdown(result: dict[str, Any]) -> str:
    first = result.get("first_run")
    lines = ["# Presets and targets", "",
             f"Command: `{result['command']}` (onnx-udfc {result['versions']['onnx_udfc']}, "
             f"onnxruntime {result['versions']['onnxruntime']}, "
             f"{result['versions']['cpu_count']} CPU cores).", "",
             "Wall time: `api.compress` in-process, median of "
             f"{result['runs']} runs (`max`: 1 run, its model inversion included). The machine "
             "was shared with other jobs during these runs, so times are upper bounds and "
             "only their ratios carry over. Size: the saved file over the original file.", ""]
    if first:
        lines += ["## First run (all defaults)", "",
                  f"`{first['command']}`: preset `{first['preset']}`, target "
                  f"`{first['target']}`; file {first['size_before']:,} -> "
                  f"{first['size_after']:,} bytes ({first['size_ratio']:.3f}x), top-1 "
                  f"{first['top1_before']:.2f}% -> {first['top1_after']:.2f}%, "
                  f"{first['wall_s']:.1f} s wall for the whole command (fresh interpreter, "
                  "verification included).", ""]
    for model in result["models"]:
        lines += [f"## {model['file']}", "",
                  f"Original top-1 {model['top1_before']:.2f}% on {model['images']} images of "
                  f"{model['data']}, {model['size_before']:,} bytes.", "",
                  "| preset | target | prune | top-1 after | size | FLOPs | wall s | runs |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in model["rows"]:
            lines.append(f"| {r['preset']} | {r['target']} | {r['prune']:g} | "
                         f"{r['top1_after']:.2f} | {r['size_ratio']:.3f}x | "
                         f"{r['flops_ratio']:.3f}x | {r['wall_s']:.2f} | {r['runs']} |")
        if not any(r["preset"] == "max" for r in model["rows"]):
            lines.append("")
            lines.append("`max` was not run on this model (model inversion takes minutes; "
                         "`--max-on` adds it).")
        lines.append("")
    return "\n".join(lines)


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text}")
        return values
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = ("digits", "resnet56")
    ap.add_argument("--models", type=_names(models), default=list(models))
    ap.add_argument("--presets", type=_names(tuple(PRESETS)), default=list(PRESETS))
    ap.add_argument("--ratios", type=lambda t: [float(v) for v in t.split(",")],
                    default=[0.0, 0.3])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (max: always 1)")
    ap.add_argument("--max-on", type=_names(models), default=["digits"],
                    help="models the max preset (minutes on ResNet-56) runs on")
    ap.add_argument("--no-first-run", action="store_true", help="skip the CLI first-run row")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "presets.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench_out" / "presets.md")
    args = ap.parse_args(argv)
    args.shared = args.shared.resolve()

    def log(message: str) -> None:
        print(message, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        result: dict[str, Any] = {
            "command": " ".join(["python tools/bench_presets.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "versions": versions(), "runs": args.runs,
            "first_run": None if args.no_first_run else first_run(workdir, log),
            "models": [bench_model(name, args, workdir, log) for name in args.models]}
    for path, text in ((args.json, json.dumps(result, indent=1) + "\n"),
                       (args.md, markdown(result))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    log(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
