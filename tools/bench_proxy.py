"""Data-free moment sources against the real-data oracle (issue 16): writes
``docs/results/data_free.md``.

Every point is ``udfc+ --sequential``, ``--criterion auto`` unless the column names one (l1;
recon for proxy or real moments of a graph without BN), 4-bit weights (fake-quant), on the
shared CIFAR-10
images split in two: the first ``--calibration`` images feed the oracle (``--calibration``, the
real-data reference), every column is evaluated on the remaining ones only. The data-free
sources run once per ``--seeds`` seed (mean +- sd); the oracle and the original model once.
Data loading, preprocessing and top-1 come from ``tools/bench_udfc.py``. A rerun rewrites the
tables and keeps the markdown's hand-written part (after :data:`NOTES`).

    nice -n 10 python tools/bench_proxy.py \\
        --model resnet20_cifar10_folded.onnx --model resnet20_cifar10_bn.onnx \\
        --model resnet56_cifar10_nm_folded.onnx --model resnet56_cifar10_nm_bn.onnx \\
        --seeds 0,1,2 --json bench_out/data_free.json --md docs/results/data_free.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_udfc  # noqa: E402

from onnx_udfc import api  # noqa: E402
from onnx_udfc.moments import proxy  # noqa: E402

# column -> (compress() options, proxy module settings for the run); "oracle" reads images
SOURCES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sampled": ({"moments": "sampled"}, {}),
    # auto: on a BN-kept graph the pink noise takes a short model inversion (sampled + fit)
    "auto": ({"moments": "auto"}, {}),
    "auto-fit-30": ({"moments": "auto"}, {"BN_FIT_STEPS": 30}),
    # auto on a BN-kept graph before the fifth round: the fitted pink noise alone, l1
    "auto-noise-l1": ({"moments": "auto", "criterion": "l1"}, {"NOISE_WITH_CROPS": False}),
    # auto's noise and crops ranked by recon (measured in the fifth round, not the default)
    "auto-crops-recon": ({"moments": "auto", "criterion": "recon"}, {}),
    "auto-recon": ({"moments": "auto", "criterion": "recon"}, {}),
    "proxy": ({"moments": "proxy"}, {}),
    # the parts of proxy on a graph without BN: crops alone (the first proxy), class prior, recon
    "proxy-crops": ({"moments": "proxy", "criterion": "l1"}, {"PRIOR_STEPS": 0,
                                                                "BN_FIT_STEPS": 0}),
    "proxy-crops-recon": ({"moments": "proxy"}, {"PRIOR_STEPS": 0, "BN_FIT_STEPS": 0}),
    "proxy-recon": ({"moments": "proxy", "criterion": "recon"}, {}),
    "proxy-prior-l1": ({"moments": "proxy", "criterion": "l1"}, {}),
    "proxy-prior-30": ({"moments": "proxy"}, {"PRIOR_STEPS": 30}),
    "proxy-prior-lr05": ({"moments": "proxy"}, {"PRIOR_LEARNING_RATE": 0.05}),
    "proxy-plain": ({"moments": "proxy"}, {"ANCHOR_BN": False}),
    "proxy-refit": ({"moments": "proxy"}, {"REFIT_KEPT": True}),
    "proxy-256": ({"moments": "proxy"}, {"SAMPLES": 256, "POSITIONS": 1 << 18}),
    "proxy-256-refit": ({"moments": "proxy"}, {"SAMPLES": 256, "POSITIONS": 1 << 18,
                                               "REFIT_KEPT": True}),
    "proxy-grey": ({"moments": "proxy"}, {"GREY_IN_COLOUR": True}),
    "proxy-unit": ({"moments": "proxy"}, {"UNIT_RANGE": True}),
    "proxy-small": ({"moments": "proxy"}, {"CROP_AREA": (0.05, 0.5)}),
    "proxy-whole": ({"moments": "proxy"}, {"CROP_AREA": (0.6, 1.0)}),
    "oracle": ({}, {}),
    "oracle-recon": ({"criterion": "recon"}, {}),
}
DATA_FREE = [s for s in SOURCES if not s.startswith("oracle")]
NOTES = "<!-- written by hand from here on: bench_proxy.py keeps it -->"


@contextlib.contextmanager
def proxy_settings(settings: dict[str, Any]):
    """The :mod:`onnx_udfc.moments.proxy` constants set to ``settings`` for one run."""
    saved = {k: getattr(proxy, k) for k in settings}
    for k, v in settings.items():
        setattr(proxy, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(proxy, k, v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--shared", type=Path, default=bench_udfc.DEFAULT_SHARED)
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help=f"comma-separated columns from {', '.join(SOURCES)}; empty: measure "
                         "nothing, only tabulate the --merge runs")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--calibration", type=int, default=256,
                    help="images for the oracle; the rest are evaluated")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "data_free.json")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--one-shot", action="store_true",
                    help="the one-shot udfc+ fit instead of --sequential (the balanced preset)")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="an earlier run's --json (repeatable): its points of this run's "
                         "models and ratios, for sources this run does not measure, join the "
                         "tables after this run's columns, and its command is listed")
    args = ap.parse_args(argv)
    args.sources = [s for s in args.sources.split(",") if s]
    unknown = [s for s in args.sources if s not in SOURCES]
    if unknown:
        ap.error(f"unknown sources {unknown}")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def run_point(path: Path, source: str, ratio: float, bits: int, seed: int,
              calibration: np.ndarray, x: np.ndarray, y: np.ndarray, name: str,
              sequential: bool = True) -> dict[str, Any]:
    options, settings = SOURCES[source]
    t = time.perf_counter()
    with proxy_settings(settings):
        model, report = api.compress(
            str(path), target="fake", prune=ratio, method="udfc+", sequential=sequential,
            bits=bits, check=False, seed=seed,
            calibration=calibration if source.startswith("oracle") else None,
            **{"criterion": "auto", **options})
    seconds = time.perf_counter() - t
    top1, _ = bench_udfc.evaluate(model, name, x, y)
    return {"source": source, "ratio": ratio, "seed": seed, "top1": top1,
            "compress_s": round(seconds, 2), "moments": report.to_dict()["moments"],
            "criterion": report.criterion}


def bench_model(args: argparse.Namespace, manifest: dict, file: str, log) -> dict[str, Any]:
    entry = bench_udfc.manifest_entry(manifest, file)
    path = args.shared / "models" / entry["file"]
    x, y, _ = bench_udfc.load_data(args.shared, entry)
    calibration, x_eval, y_eval = x[:args.calibration], x[args.calibration:], \
        y[args.calibration:]
    name = bench_udfc.input_name(api.load(str(path)))
    original, _ = bench_udfc.evaluate(api.load(str(path)), name, x_eval, y_eval)
    log(f"[{file}] original top-1 on the {len(y_eval)} held-out images: {original:.2f}%")
    points = []
    for ratio in args.ratios:
        for source in args.sources:
            for seed in (args.seeds if source in DATA_FREE else [0]):
                p = run_point(path, source, ratio, args.bits, seed, calibration, x_eval,
                              y_eval, name, not args.one_shot)
                used = p["moments"]["used"] if p["moments"] else "-"
                log(f"  {ratio:.1f} {source:12s} seed {seed}: {p['top1']:6.2f}%  "
                    f"{p['compress_s']:6.1f}s  (moments {used}, {p['criterion']})")
                points.append(p)
    return {"file": file, "batchnorm": entry.get("batchnorm"), "images": len(y_eval),
            "original": original, "points": points}


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    sources = cfg["sources"]
    lines = [
        "# Data-free moment sources against real data (issue 16)", "",
        f"`udfc+{' --sequential' if cfg.get('sequential', True) else ' (one-shot)'}`, "
        "`--criterion auto` (l1; recon where udfc+ reads proxy or real moments of a graph "
        "without BN; each point's criterion is in the JSON) unless the column says otherwise, "
        f"{cfg['bits']}-bit weights "
        "(fake-quant). Top-1 (%) on the "
        f"shared CIFAR-10 images after the first {cfg['calibration']} (held out from the "
        f"oracle, which is fed those {cfg['calibration']} through `--calibration`). "
        f"Data-free columns: mean ± sd over seeds {cfg['seeds']}.", "",
        f"Command: `python tools/bench_proxy.py {' '.join(cfg['argv'])}`"
        + "".join(f", with the points of `python tools/bench_proxy.py {' '.join(a)}`"
                  for a in cfg.get("merged", [])), "",
        "| model | BN | ratio | original | " + " | ".join(sources) + " |",
        "|---|---|---|---|" + "---|" * len(sources),
    ]
    for model in result["models"]:
        for ratio in cfg["ratios"]:
            cells = [_cell([p["top1"] for p in model["points"]
                            if p["source"] == s and p["ratio"] == ratio]) for s in sources]
            lines.append(f"| {model['file']} | {model['batchnorm']} | {100 * ratio:g}% | "
                         f"{model['original']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Compression wall time (s, median over every point of the column; the "
              "machine is shared, timings are indicative):", "",
              "| model | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for model in result["models"]:
        times = [np.median([p["compress_s"] for p in model["points"] if p["source"] == s])
                 if any(p["source"] == s for p in model["points"]) else None for s in sources]
        lines.append(f"| {model['file']} | " + " | ".join(
            "—" if t is None else f"{t:.1f}" for t in times) + " |")
    return "\n".join(lines) + "\n"


def merged(result: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """``result`` with the points of ``earlier`` runs of its models and ratios added, their
    sources appended to the columns and their commands recorded (``config["merged"]``)."""
    cfg = result["config"]
    by_file = {m["file"]: m for m in result["models"]}
    measured = set(cfg["sources"])  # this run's own columns are not mixed with earlier ones
    for run in earlier:
        cfg.setdefault("merged", []).append(run["config"]["argv"])
        for model in run["models"]:
            if model["file"] not in by_file:
                continue
            points = [p for p in model["points"]
                      if p["ratio"] in cfg["ratios"] and p["source"] not in measured]
            by_file[model["file"]]["points"] += points
            cfg["sources"] += [s for s in dict.fromkeys(p["source"] for p in points)
                               if s not in cfg["sources"]]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = bench_udfc.load_manifest(args.shared.resolve())
    models = [bench_model(args, manifest, m, lambda s: print(s, flush=True))
              for m in args.model]
    config = {"models": args.model, "sources": args.sources, "ratios": args.ratios,
              "sequential": not args.one_shot,
              "bits": args.bits, "seeds": args.seeds, "calibration": args.calibration,
              "argv": sys.argv[1:] if argv is None else argv}
    result = merged({"config": config, "versions": bench_udfc.versions(), "models": models},
                    [json.loads(path.read_text()) for path in args.merge])
    bench_udfc._write(args.json, json.dumps(result, indent=1) + "\n")
    if args.md:
        notes = args.md.read_text().partition(NOTES)[2] if args.md.is_file() else ""
        bench_udfc._write(args.md, markdown(result) + (f"\n{NOTES}{notes}" if notes else ""))
    print(f"wrote {args.json}" + (f" and {args.md}" if args.md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
