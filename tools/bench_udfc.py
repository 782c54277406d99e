"""Accuracy benchmark of onnx-udfc on the real models in ``../shared`` (deterministic).

For every ``--model`` (a file name from ``shared/models/manifest.json``) the script

1. loads the model's evaluation data (``dataset`` cifar10 -> ``cifar10_test_first1017.npz``,
   fashionmnist -> ``fashionmnist_test_first4443.npz``; arrays ``images`` and ``labels``) and
   preprocesses it exactly as the manifest says: uint8 pixels / 255, then
   ``(x - mean) / std`` per channel, layout NCHW (CIFAR ``(N,32,32,3)`` HWC RGB is transposed,
   FashionMNIST ``(N,28,28)`` becomes ``(N,1,28,28)``);
2. checks that the ORIGINAL model's top-1 on the whole shared subset equals the manifest's
   ``top1_on_shared_subset`` within 0.05 points (the proof that preprocessing is right) and
   aborts otherwise;
3. runs ``onnx_udfc.api.compress`` in-process for every grid point, with ``target="fake"``
   and every other option given explicitly (the presets and targets do not apply)
   ``method x ratio x bits x criterion`` (plus, with ``--quant-only``, the ratio-0
   quantization-only baselines: method ``prune`` = plain round-to-nearest, method ``udfc`` =
   RTN + Eq. 21 scales, for every bits value) and evaluates top-1 (%) in ONNX Runtime (CPU)
   on the first ``--limit`` images (all by default);
4. records per point: top-1, params/FLOPs after, compression wall time, the number of layers
   whose pruning was compensated / not compensated (with the reasons), the number of layers
   quantized / scale-compensated (with the reasons), and SHA-256 digests of the compressed
   model and of the logits (two runs can be diffed for determinism);
5. writes JSON (all numbers + config + versions + timings) and markdown: per model and
   criterion one table shaped like METHOD.md's (rows = ratio, columns = method x bits), then
   per model a table of sizes and compensation counts. The markdown holds no timings, so a
   rerun reproduces it byte for byte.

Nothing is random: the data is a fixed prefix, pruning and quantization are closed-form, and
the grid is walked in the order given on the command line. Wall times (JSON and stdout only)
are the only numbers that change between runs.

Commands used for the reported runs (from the repository root)::

    python tools/bench_udfc.py --model resnet56_cifar10_nm_bn.onnx --criteria l1,l2 \\
        --ratios 0.3,0.4,0.5 --bits fp,4 --quant-only \\
        --json bench_out/r56nm_bn.json --md bench_out/r56nm_bn.md
    # block convs only (stem conv, projection shortcuts and the classifier stay float):
    python tools/bench_udfc.py --model resnet56_cifar10_nm_bn.onnx --criteria l1,l2 \\
        --ratios 0.3,0.4,0.5 --bits fp,4 --quant-only \\
        --quant-exclude '^/conv1/Conv$' --quant-exclude 'downsample' \\
        --quant-exclude '^/fc/Gemm$' \\
        --json bench_out/r56nm_bn_blocks.json --md bench_out/r56nm_bn_blocks.md
    python tools/bench_udfc.py --model resnet56_cifar10_nm_folded.onnx --criteria l1,l2 \\
        --ratios 0.3,0.4,0.5 --bits fp,4 --quant-only \\
        --json bench_out/r56nm_folded.json --md bench_out/r56nm_folded.md
    python tools/bench_udfc.py --model lenet300100_fashionmnist_nm.onnx \\
        --ratios 0.5,0.6,0.7,0.8 --criteria l1 --bits fp,4 \\
        --json bench_out/lenet.json --md bench_out/lenet.md
    python tools/bench_udfc.py --model resnet20_cifar10_bn.onnx \\
        --model resnet56_cifar10_bn.onnx --criteria l1 --ratios 0.3,0.4,0.5 --bits fp,4 \\
        --quant-only --json bench_out/untuned.json --md bench_out/untuned.md

Defaults: ``--methods prune,nm,udfc --ratios 0.3,0.4,0.5 --bits fp,4 --criteria l1,l2
--quantizer paper --granularity tensor --alpha1 0.01 --alpha2 0.008``; ``--shared`` defaults to
the ``shared`` folder beside the repository (``<repo>/../shared``); ``--json``/``--md`` default
to ``bench_out/bench_udfc_<model stems>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

import onnx_udfc
from onnx_udfc import api
from onnx_udfc.config import GRANULARITIES, METHODS, QUANTIZERS
from onnx_udfc.core.ort import run, session

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO.parent / "shared"
DATA_FILES = {"cifar10": "cifar10_test_first1017.npz",
              "fashionmnist": "fashionmnist_test_first4443.npz"}
REFERENCE_TOLERANCE = 0.05  # points of top-1
BATCH = 256


# bench-only method names -> (library method, compress() options, uses the images)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "udfc+prop": ("udfc+", {"moments": "propagated"}, False),
    "udfc+seq": ("udfc+", {"sequential": True, "moments": "sampled"}, False),
    "udfc+auto+seq": ("udfc+", {"sequential": True}, False),  # auto: fitted photographs on BN
    "udfc+inv": ("udfc+", {"moments": "inverted"}, False),
    "udfc+inv+seq": ("udfc+", {"moments": "inverted", "sequential": True}, False),
    "oracle": ("udfc+", {}, True),
    "oracle+seq": ("udfc+", {"sequential": True}, True),
}


class BenchError(Exception):
    """A setup problem (missing files, wrong preprocessing); reported as one line, exit 2."""


@dataclass
class Point:
    """One grid point: its configuration and what it measured."""

    model: str
    method: str
    ratio: float
    bits: int | None
    criterion: str
    top1: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    compress_s: float | None = None
    eval_s: float | None = None
    pruned_layers: int = 0
    compensated: int = 0
    not_compensated: int = 0
    not_compensated_reasons: dict[str, int] = field(default_factory=dict)
    quantized_layers: int = 0
    scale_compensated: int = 0
    scale_not_compensated: int = 0
    scale_reasons: dict[str, int] = field(default_factory=dict)
    degenerate_channels: int = 0
    report_timings: dict[str, float] = field(default_factory=dict)
    model_sha256: str | None = None
    logits_sha256: str | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, float, int | None, str]:
        return (self.model, self.method, self.ratio, self.bits, self.criterion)


# ----------------------------------------------------------------------------- arguments


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") \
            from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must lie in [0, 1): {text}")
    return values


def _bits(text: str) -> list[int | None]:
    out: list[int | None] = []
    for v in (v.strip().lower() for v in text.split(",") if v.strip()):
        if v in ("fp", "float", "none"):
            out.append(None)
        elif v.isdigit() and 2 <= int(v) <= 8:
            out.append(int(v))
        else:
            raise argparse.ArgumentTypeError(f"bits must be 'fp' or 2..8, got '{v}'")
    if not out:
        raise argparse.ArgumentTypeError("empty --bits")
    return out


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text}")
        return values
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="model file name from shared/models/manifest.json (repeatable)")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"the shared folder (default {DEFAULT_SHARED})")
    ap.add_argument("--methods", type=_choices((*METHODS, *VARIANTS)),
                    default=["prune", "nm", "udfc"],
                    help="udfc+prop = udfc+ with analytically propagated moments; "
                         "udfc+seq = udfc+ --sequential on sampled moments (data-free); "
                         "udfc+auto+seq = the same with --moments auto; udfc+inv(+seq) = "
                         "udfc+ --moments inverted (with --sequential); oracle = udfc+ fed with "
                         "moments measured on the evaluation images (data-driven upper bound); "
                         "oracle+seq = the same with --sequential")
    ap.add_argument("--ratios", type=_floats, default=[0.3, 0.4, 0.5])
    ap.add_argument("--bits", type=_bits, default=[None, 4], help="e.g. fp,4 (fp = float)")
    ap.add_argument("--criteria", type=_choices(("l1", "l2", "recon")), default=["l1", "l2"])
    ap.add_argument("--quantizer", choices=QUANTIZERS, default="paper")
    ap.add_argument("--granularity", choices=GRANULARITIES, default="tensor")
    ap.add_argument("--alpha1", type=float, default=0.01)
    ap.add_argument("--alpha2", type=float, default=0.008)
    ap.add_argument("--quant-exclude", action="append", default=[], metavar="REGEX",
                    help="node-name regex whose layers stay float (repeatable)")
    ap.add_argument("--quant-only", action="store_true",
                    help="add the ratio-0 baselines (prune = RTN, udfc = RTN + Eq. 21 scales)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N images")
    ap.add_argument("--seed", type=int, default=0,
                    help="udfc+ data-free: seed of the synthetic samples / inversion start (run "
                         "the bench once per seed to see the spread)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        ap.error("--limit must be positive")
    for pattern in args.quant_exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            ap.error(f"--quant-exclude '{pattern}': {exc}")
    stems = "+".join(Path(m).stem for m in args.model)
    args.json = args.json or REPO / "bench_out" / f"bench_udfc_{stems}.json"
    args.md = args.md or REPO / "bench_out" / f"bench_udfc_{stems}.md"
    return args


# ----------------------------------------------------------------------------- data


def load_manifest(shared: Path) -> dict[str, Any]:
    path = shared / "models" / "manifest.json"
    if not shared.is_dir():
        raise BenchError(f"shared folder not found: {shared} (pass --shared DIR; it must hold "
                         "models/manifest.json and data/)")
    if not path.is_file():
        raise BenchError(f"{path} not found (is --shared {shared} the right folder?)")
    return json.loads(path.read_text())


def manifest_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    base = Path(name).name
    for entry in manifest["models"]:
        if entry["file"] == base:
            return entry
    known = ", ".join(e["file"] for e in manifest["models"])
    raise BenchError(f"model '{name}' is not in the manifest (known: {known})")


def load_data(shared: Path, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    """Preprocessed NCHW float32 images and int64 labels of the model's dataset."""
    dataset = entry["dataset"]
    if dataset not in DATA_FILES:
        raise BenchError(f"no data file known for dataset '{dataset}'")
    path = shared / "data" / DATA_FILES[dataset]
    if not path.is_file():
        raise BenchError(f"data file not found: {path}")
    with np.load(path) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int64)
    if images.dtype != np.uint8:
        raise BenchError(f"{path}: images are {images.dtype}, expected uint8")
    mean = np.asarray(entry["preprocess"]["mean"], dtype=np.float32)
    std = np.asarray(entry["preprocess"]["std"], dtype=np.float32)
    x = images.astype(np.float32) / np.float32(255.0)
    if x.ndim == 4 and x.shape[-1] == len(mean):  # (N, H, W, C) -> (N, C, H, W)
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 3 and len(mean) == 1:  # (N, H, W) -> (N, 1, H, W)
        x = x[:, None]
    else:
        raise BenchError(f"{path}: images of shape {images.shape} do not match "
                         f"{len(mean)} channel(s)")
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    if len(x) != len(labels):
        raise BenchError(f"{path}: {len(x)} images but {len(labels)} labels")
    return np.ascontiguousarray(x, dtype=np.float32), labels, path.name


def input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise BenchError(f"expected one graph input, found {names}")
    return names[0]


def evaluate(model: onnx.ModelProto, name: str, x: np.ndarray,
             labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Top-1 (%) and the logits in ONNX Runtime (CPU)."""
    logits = run(session(model), {name: x}, batch=BATCH)[0]
    logits = logits.reshape(len(labels), -1)
    return 100.0 * float((logits.argmax(1) == labels).mean()), logits


# ----------------------------------------------------------------------------- report parsing


_QUOTED = re.compile(r"'[^']*'")


def _generic(reason: str) -> str:
    """Reasons without the node names, so that they can be counted."""
    return _QUOTED.sub("<node>", reason)


def summarise_report(point: Point, report: dict[str, Any]) -> None:
    point.params_before, point.params_after = report["params_before"], report["params_after"]
    point.flops_before, point.flops_after = report["flops_before"], report["flops_after"]
    point.report_timings = {k: round(v, 4) for k, v in report.get("timings", {}).items()}
    reasons: Counter[str] = Counter()
    scale_reasons: Counter[str] = Counter()
    for layer in report["layers"]:
        comp = layer.get("compensation")
        if comp:
            point.pruned_layers += 1
            if comp.get("compensated"):
                point.compensated += 1
            else:
                point.not_compensated += 1
                reasons[_generic(comp.get("reason", "?"))] += 1
            point.degenerate_channels += len(comp.get("degenerate") or [])
        quant = layer.get("quantization")
        if quant:
            point.quantized_layers += 1
            if quant.get("scale_compensated"):
                point.scale_compensated += 1
            elif point.method == "udfc":
                point.scale_not_compensated += 1
                scale_reasons[_generic(quant.get("reason", "?"))] += 1
    point.not_compensated_reasons = dict(sorted(reasons.items()))
    point.scale_reasons = dict(sorted(scale_reasons.items()))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- the grid


def grid(args: argparse.Namespace) -> list[tuple[str, float, int | None, str]]:
    """(method, ratio, bits, criterion) in a fixed order; ratio-0 points once per model."""
    points: list[tuple[str, float, int | None, str]] = []
    if args.quant_only:
        for bits in args.bits:
            for method in ("prune", "udfc"):
                points.append((method, 0.0, bits, args.criteria[0]))
    for criterion in args.criteria:
        for ratio in args.ratios:
            for bits in args.bits:
                for method in args.methods:
                    if ratio == 0.0 and (method, 0.0, bits, args.criteria[0]) in points:
                        continue
                    points.append((method, ratio, bits, criterion))
    return points


def bench_model(args: argparse.Namespace, manifest: dict[str, Any], name: str,
                log) -> dict[str, Any]:
    entry = manifest_entry(manifest, name)
    path = args.shared / "models" / entry["file"]
    if not path.is_file():
        raise BenchError(f"model file not found: {path}")
    x_all, y_all, data_name = load_data(args.shared, entry)
    original = onnx.load(str(path))
    feed_name = input_name(original)

    top1_full, logits_full = evaluate(original, feed_name, x_all, y_all)
    expected = float(entry["top1_on_shared_subset"])
    log(f"[{entry['file']}] original top-1 on {data_name} ({len(y_all)} images): "
        f"{top1_full:.2f}% (manifest: {expected:.2f}%)")
    if abs(top1_full - expected) > REFERENCE_TOLERANCE:
        raise BenchError(f"{entry['file']}: original top-1 {top1_full:.3f}% differs from the "
                         f"manifest's {expected:.2f}% by more than {REFERENCE_TOLERANCE} "
                         "points: the preprocessing or the data is wrong")
    n = min(args.limit or len(y_all), len(y_all))
    x, y = x_all[:n], y_all[:n]
    top1_orig = 100.0 * float((logits_full[:n].argmax(1) == y).mean())

    points: list[Point] = []
    for method, ratio, bits, criterion in grid(args):
        p = Point(entry["file"], method, ratio, bits, criterion)
        t = time.perf_counter()
        try:
            base, extra, calibrated = VARIANTS.get(method, (method, {}, False))
            model, report = api.compress(  # every option explicit: the figures predate presets
                original, target="fake", prune=ratio, method=base, **extra,
                calibration=x if calibrated else None, bits=bits, criterion=criterion,
                quantizer=args.quantizer, granularity=args.granularity, alpha1=args.alpha1,
                alpha2=args.alpha2, quant_exclude=list(args.quant_exclude), check=False,
                seed=args.seed)
            p.compress_s = round(time.perf_counter() - t, 4)
            summarise_report(p, report.to_dict())
            t = time.perf_counter()
            p.top1, logits = evaluate(model, feed_name, x, y)
            p.eval_s = round(time.perf_counter() - t, 4)
            p.model_sha256 = _sha(model.SerializeToString())
            p.logits_sha256 = _sha(np.ascontiguousarray(logits, dtype=np.float32).tobytes())
        except Exception as exc:  # UdfcError or a bug: recorded, the grid goes on
            p.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        points.append(p)
        bits_s = "FP" if bits is None else f"{bits}b"
        result = p.error or (f"top-1 {p.top1:6.2f}%  compress {p.compress_s:.2f}s  "
                             f"compensated {p.compensated}/{p.pruned_layers}  "
                             f"scales {p.scale_compensated}/{p.quantized_layers}")
        log(f"  {method:5s} {criterion} ratio {ratio:.2f} {bits_s:3s}: {result}")
    return {
        "file": entry["file"], "dataset": entry["dataset"], "data_file": data_name,
        "batchnorm": entry.get("batchnorm"), "images": n, "seed": args.seed,
        "preprocess": entry["preprocess"],
        "top1_original_full_subset": top1_full, "top1_manifest": expected,
        "top1_original": top1_orig,
        "logits_original_sha256": _sha(np.ascontiguousarray(logits_full[:n]).tobytes()),
        "points": [asdict(p) for p in points],
    }


# ----------------------------------------------------------------------------- markdown


def _bits_label(bits: int | None) -> str:
    return "FP" if bits is None else f"{bits}b"


def _cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "—"
    return "error" if p["error"] else f"{p['top1']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    q_excl = ", ".join(f"`{r}`" for r in cfg["quant_exclude"]) or "none"
    lines = [
        "# onnx-udfc accuracy benchmark", "",
        f"Top-1 (%) in ONNX Runtime CPU. Quantizer `{cfg['quantizer']}` / "
        f"`{cfg['granularity']}`, alpha1 {cfg['alpha1']}, alpha2 {cfg['alpha2']}, "
        f"quantization excluded: {q_excl}. Ratio 0 = quantization only "
        "(prune = round-to-nearest, udfc = RTN + Eq. 21 scales).", "",
    ]
    for model in result["models"]:
        pts = model["points"]
        index = {(p["method"], p["ratio"], p["bits"], p["criterion"]): p for p in pts}
        crit0 = cfg["criteria"][0]
        columns = [(m, b) for b in cfg["bits"] for m in cfg["methods"]]
        ratios = ([0.0] if cfg["quant_only"] else []) + [r for r in cfg["ratios"] if r != 0.0]
        for criterion in cfg["criteria"]:
            lines += [
                f"## {model['file']} — {criterion} criterion", "",
                f"Original {model['top1_original']:.2f}% on {model['images']} images of "
                f"{model['data_file']} (manifest {model['top1_manifest']:.2f}% on the full "
                f"subset; BN {model['batchnorm']}).", "",
                "| ratio | " + " | ".join(f"{m} {_bits_label(b)}" for m, b in columns) + " |",
                "|---|" + "---|" * len(columns),
            ]
            for r in ratios:
                crit = crit0 if r == 0.0 else criterion
                label = "0% (quant only)" if r == 0.0 else f"{100 * r:g}%"
                cells = [_cell(index.get((m, r, b, crit))) for m, b in columns]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"### {model['file']} — sizes and compensation", "",
                  "| ratio | params after | FLOPs after | nm: pruned layers compensated | "
                  "udfc: pruned layers compensated | udfc: layers quantized / Eq.21-scaled |",
                  "|---|---|---|---|---|---|"]
        for r in ratios:
            sel = [p for p in pts if p["ratio"] == r and not p["error"]]
            if not sel:
                continue
            first = sel[0]
            comp = []
            for m in ("nm", "udfc"):
                ms = [p for p in sel if p["method"] == m]
                comp.append(f"{ms[0]['compensated']}/{ms[0]['pruned_layers']}"
                            if ms and r > 0 else "—")
            qs = [p for p in sel if p["method"] == "udfc" and p["bits"] is not None]
            qcell = f"{qs[0]['quantized_layers']} / {qs[0]['scale_compensated']}" if qs else "—"
            lines.append(f"| {100 * r:g}% | {first['params_after']:,} "
                         f"({first['params_after'] / first['params_before']:.3f}x) | "
                         f"{first['flops_after']:,} "
                         f"({first['flops_after'] / first['flops_before']:.3f}x) | "
                         f"{' | '.join(comp)} | {qcell} |")
        reasons: Counter[str] = Counter()
        for p in pts:
            if p["method"] == "udfc" and p["bits"] is not None and not p["error"]:
                reasons.update(p["scale_reasons"])
                break
        not_comp: Counter[str] = Counter()
        for p in pts:
            if p["method"] != "prune":
                not_comp.update(p["not_compensated_reasons"])
        if not_comp:
            lines += ["", "Pruned layers not compensated (nm/udfc, all points): " + "; ".join(
                f"{n}x {r}" for r, n in sorted(not_comp.items()))]
        if reasons:
            lines += ["", "Quantized layers without Eq. 21 scales (one udfc point): " +
                      "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items()))]
        errors = [p for p in pts if p["error"]]
        if errors:
            lines += ["", "Errors: " + "; ".join(
                f"{p['method']} {p['criterion']} {p['ratio']} {_bits_label(p['bits'])}: "
                f"{p['error']}" for p in errors)]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx_udfc": onnx_udfc.__version__,
            "cpu_count": str(os.cpu_count())}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    try:
        args.shared = args.shared.resolve()
        manifest = load_manifest(args.shared)
        for name in args.model:
            manifest_entry(manifest, name)
        models = [bench_model(args, manifest, name, log) for name in args.model]
    except BenchError as exc:
        print(f"bench_udfc: error: {exc}", file=sys.stderr)
        return 2
    config = {"models": args.model, "shared": str(args.shared), "methods": args.methods,
              "ratios": args.ratios, "bits": args.bits, "criteria": args.criteria,
              "quantizer": args.quantizer, "granularity": args.granularity,
              "alpha1": args.alpha1, "alpha2": args.alpha2,
              "quant_exclude": args.quant_exclude, "quant_only": args.quant_only,
              "limit": args.limit, "batch": BATCH, "argv": sys.argv[1:] if argv is None
              else argv}
    result = {"config": config, "versions": versions(), "models": models,
              "wall_s": round(time.perf_counter() - t0, 2)}
    _write(args.json, json.dumps(result, indent=1) + "\n")
    _write(args.md, markdown(result))
    log(f"wrote {args.json} and {args.md} ({result['wall_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
