"""ONNX Runtime latency of pruned and integer-stored models against the original, compared
with the FLOPs ratio.

Per model the variants are: the original; ``--prune R`` for every ratio, once with kept
channel counts as they fall and once rounded to multiples of 8 (``--round-to 8``); and the
unpruned model with int8 weights stored as integers (``--format qdq``, symmetric, per
channel). For every batch size all variants of a model get sessions in one process and are
timed interleaved (each round runs every variant once, in a rotating order) with the same
random input; the table shows medians, the latency ratio to the original, the FLOPs ratio
from the report, and how far the former is from the latter (``lat/flops - 1``; the target
is within 15 % for pruning of 30 % or more).

Usage (from the repository root; ``python tools/make_resnet50.py`` makes the ResNet-50)::

    python tools/bench_latency.py                                  # CPU, the default models
    python tools/bench_latency.py --batches 1 --runs 50 --json bench_out/latency.json
    python tools/bench_latency.py --provider cuda                  # needs onnxruntime-gpu

The machine's load average is printed before and after: other processes on the same cores
distort the medians, interleaving only spreads the distortion evenly. The "CPU ratio" column
(process CPU time per run, all threads) does not count time spent waiting for a core; with
``--threads 1`` it is the model's own compute cost even on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from onnx_udfc import api
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.report.latency import FOLD_QDQ, interleaved, latency_session, random_feed

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = [ROOT.parent / "shared" / "models" / "resnet56_cifar10_nm_bn.onnx",
                  ROOT / "bench_out" / "resnet50_bn.onnx"]
TARGET = 0.15


def make_variants(model: Path, ratios: list[float], rounds: list[int], qdq: bool,
                  workdir: Path, extra: dict) -> dict[str, dict]:
    """Write every variant of ``model``; returns name -> {path, flops_ratio, params, size}."""
    variants = {"original": {"path": model, "flops_ratio": 1.0, "size": model.stat().st_size}}
    jobs = [(f"prune {r:.0%}" + (f" round {k}" if k > 1 else ""), dict(prune=r, round_to=k))
            for r in ratios for k in rounds]
    asked = {name: kw.get("prune", 0.0) for name, kw in jobs}
    if qdq:
        jobs.append(("qdq int8", dict(bits=8, quantizer="symmetric", granularity="channel",
                                      format="qdq")))
    for name, kw in jobs:
        m, report = api.compress(str(model), check=False, **extra, **kw)
        path = workdir / f"{model.stem}-{len(variants)}.onnx"
        size = api.save_compressed(m, path, check=False)
        variants[name] = {"path": path, "flops_ratio": report.flops_after / report.flops_before,
                          "params_ratio": report.params_after / report.params_before,
                          "size": size, "prune": asked.get(name, 0.0)}
    if qdq:  # the same file, its weights dequantized once at load time
        variants["qdq int8, disable_quant_qdq"] = dict(variants["qdq int8"], options=FOLD_QDQ)
    return variants


def bench_model(model: Path, args, workdir: Path) -> list[dict]:
    # plain pruning, float weights unless a variant says otherwise (not the preset defaults)
    extra = {"target": "fake", "method": "prune"}
    if args.prune_coupled:
        extra["prune_coupled"] = True
    variants = make_variants(model, args.ratios, args.round_to, not args.no_qdq, workdir, extra)
    rows = []
    for batch in args.batches:
        sessions = {n: latency_session(v["path"], args.provider, args.threads,
                                       v.get("options"))
                    for n, v in variants.items()}
        feed = random_feed(sessions["original"], batch)
        runs = args.runs if batch < 16 else max(3, args.runs // 4)
        t0 = time.perf_counter()
        timing = interleaved(sessions, feed, runs=runs, warmup=args.warmup,
                             budget_s=args.budget)
        del sessions
        base = timing["original"].median_s
        for name, v in variants.items():
            t = timing[name]
            ratio = t.median_s / base
            dev = ratio / v["flops_ratio"] - 1
            rows.append({"model": model.name, "batch": batch, "variant": name,
                         "median_ms": 1e3 * t.median_s, "min_ms": 1e3 * t.min_s,
                         "max_ms": 1e3 * t.max_s, "runs": t.runs,
                         "latency_ratio": ratio, "flops_ratio": v["flops_ratio"],
                         "cpu_ms": 1e3 * t.cpu_median_s,
                         "cpu_ratio": t.cpu_median_s / timing["original"].cpu_median_s
                         if timing["original"].cpu_median_s else None,
                         "deviation": dev, "size_ratio": v["size"] / model.stat().st_size,
                         "within_target": abs(dev) <= TARGET
                         if v.get("prune", 0.0) >= 0.3 - 1e-9 else None})
        print(f"  {model.name} batch {batch}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | batch | variant | median ms (min-max) | latency ratio | FLOPs ratio | "
           "lat/FLOPs - 1 | within 15 % | CPU ratio | file |",
           "|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ok = {True: "yes", False: "**no**", None: ""}[r["within_target"]]
        out.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['median_ms']:.2f} "
                   f"({r['min_ms']:.2f}-{r['max_ms']:.2f}) | {r['latency_ratio']:.3f} | "
                   f"{r['flops_ratio']:.3f} | {100 * r['deviation']:+.1f} % | {ok} | "
                   f"{r['cpu_ratio'] or 0:.3f} | {r['size_ratio']:.3f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--ratios", default="0.3,0.5", help="pruning ratios (comma-separated)")
    ap.add_argument("--round-to", default="1,8,16",
                    help="--round-to values (comma-separated; 16 = AVX-512's NCHWc block)")
    ap.add_argument("--batches", default="1,64", help="batch sizes (comma-separated)")
    ap.add_argument("--runs", type=int, default=100,
                    help="interleaved rounds at batch < 16 (a quarter, at least 3, above)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds per model and batch after which rounds stop (>= 3 rounds)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--prune-coupled", action="store_true",
                    help="also prune residual-coupled channel groups")
    ap.add_argument("--no-qdq", action="store_true", help="skip the int8 qdq variant")
    ap.add_argument("--json", type=Path, help="write rows and machine info as JSON")
    ap.add_argument("--workdir", type=Path, help="keep the variants here")
    args = ap.parse_args(argv)
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.round_to = [int(x) for x in args.round_to.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    models = args.models or [p for p in DEFAULT_MODELS if p.is_file()]
    if not models:
        print("no models found (run tools/make_resnet50.py?)", file=sys.stderr)
        return 2
    import onnxruntime as ort

    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "onnxruntime": ort.__version__, "provider": args.provider,
               "threads": args.threads, "load_before": os.getloadavg()}
    print(f"machine: {machine}", file=sys.stderr)
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for model in models:
                rows += bench_model(model, args, workdir)
    except UdfcError as exc:
        print(f"bench_latency: error: {exc}", file=sys.stderr)
        return 2
    machine["load_after"] = os.getloadavg()
    print(table(rows))
    print(f"\nload average before {machine['load_before']}, after {machine['load_after']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
