"""Command line: ``onnx-udfc inspect | compress | verify``.

Errors print one line to stderr and exit with status 2; nothing is written half-way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from onnx_udfc import __version__
from onnx_udfc.core.errors import UdfcError


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnx-udfc",
        description="Data-free structured pruning and quantization of ONNX models.")
    p.add_argument("--version", action="version", version=f"onnx-udfc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    common.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    common.add_argument("--input-shape", action="append", default=[], metavar="NAME:DxD",
                        help="fix a dynamic input shape, e.g. input:1x3x224x224")

    ins = sub.add_parser("inspect", parents=[common],
                         help="list channel groups, what is prunable and why not")
    ins.add_argument("model")
    ins.add_argument("--json", metavar="FILE", help="write the analysis as JSON")

    c = sub.add_parser("compress", parents=[common], help="prune a model")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--prune", type=float, default=0.0, metavar="R",
                   help="share of channels to remove from every prunable group, in [0, 1)")
    c.add_argument("--criterion", choices=["l1", "l2", "recon"], default="l1",
                   help="l1/l2: smallest filters first; recon: the channels the kept ones "
                        "reconstruct best first (from the same moments udfc+ uses)")
    c.add_argument("--budget-flops", type=float, metavar="B",
                   help="instead of one --prune ratio: per-group ratios, allocated by the "
                        "predicted reconstruction error, so that FLOPs after <= B x before")
    c.add_argument("--method", choices=["prune", "nm", "udfc", "udfc+"], default="prune",
                   help="prune: drop channels; nm: Neuron Merging; udfc: closed-form "
                        "reconstruction of pruned and quantized channels (the paper); "
                        "udfc+: reconstruction and bias correction from a model of the "
                        "activation moments")
    c.add_argument("--calibration", metavar="FILE.npz",
                   help="udfc+: measure the moments on these preprocessed inputs instead")
    c.add_argument("--moments", choices=["auto", "sampled", "inverted", "propagated"],
                   default="auto",
                   help="udfc+ without --calibration: 'sampled' runs synthetic images through "
                        "the network with BatchNorms re-anchored to their statistics, "
                        "'inverted' first fits the images to the BatchNorm statistics "
                        "(model inversion: minutes, the most accurate), 'propagated' computes "
                        "the moments analytically; auto: sampled for networks with BN or Conv "
                        "layers, propagated for plain MLPs")
    c.add_argument("--sequential", action="store_true",
                   help="udfc+: fit each layer's reconstruction on the compressed-so-far "
                        "network, then refit the next Conv on patches of the kept channels "
                        "(one network run per pruned layer; the most accurate, data-free too)")
    c.add_argument("--seed", type=_seed, default=0,
                   help="udfc+ without --calibration: seed of the synthetic samples (and of "
                        "the inversion's start); results vary with it by about 0.5 points")
    c.add_argument("--bits", type=_bits, metavar="B",
                   help="fake-quantize every weight layer to B bits (2..8)")
    c.add_argument("--quantizer", choices=["paper", "symmetric", "asymmetric"],
                   default="paper", help="paper: Eq. 3 grid without zero (fake-quant only)")
    c.add_argument("--granularity", choices=["tensor", "channel"], default="tensor")
    c.add_argument("--block-size", type=int, metavar="B",
                   help="block-wise scales: one per B input channels of each output channel "
                        "(overrides --granularity; stored with opset 21)")
    c.add_argument("--format", choices=["fake", "qdq"], default="fake",
                   help="fake: float weights on the grid; qdq: integer weights + "
                        "DequantizeLinear (int4/uint4 for --bits <= 4, else int8/uint8)")
    c.add_argument("--container", choices=["auto", "int8", "int4"], default="auto",
                   help="qdq storage type (auto: int4 when --bits <= 4)")
    c.add_argument("--opset", type=int, metavar="N",
                   help="qdq: convert to this opset (default: the model's, raised to 13 for "
                        "per-channel and 21 for int4/blocks when needed)")
    c.add_argument("--fold-bn-scales", action="store_true",
                   help="qdq: fold BatchNormalization into the integer weights' dequantization "
                        "scales after quantization (exact; smaller file, same accuracy)")
    c.add_argument("--latency", action="store_true",
                   help="time original and output in ONNX Runtime (batch 1, median of 20 "
                        "interleaved runs) for the summary and report")
    c.add_argument("--alpha1", type=float, default=0.01, help="Eq. 12 bias-term weight")
    c.add_argument("--alpha2", type=float, default=0.008, help="Eq. 14 bias-term weight")
    c.add_argument("--quant-exclude", action="append", default=[], metavar="REGEX",
                   help="keep layers whose name matches in float (repeatable)")
    c.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave nodes whose name matches untouched (repeatable)")
    c.add_argument("--prune-coupled", action="store_true",
                   help="also prune channel groups tied by residual connections")
    c.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="round kept channel counts to a multiple of N")
    c.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNormalization into the preceding Conv/Gemm")
    c.add_argument("--report", metavar="FILE.json", help="write the JSON report")
    c.add_argument("--plot", metavar="FILE.png",
                   help="plot per-layer kept channels, bits and predicted error (matplotlib)")
    c.add_argument("--external-data", action="store_true",
                   help="store weights in OUTPUT.data (automatic above 2 GiB)")
    c.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime comparison with the original")
    c.add_argument("--data", metavar="FILE.npz", help="inputs (and labels) for verification")
    c.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")

    v = sub.add_parser("verify", parents=[common],
                       help="compare two models' outputs in ONNX Runtime")
    v.add_argument("original")
    v.add_argument("compressed")
    v.add_argument("--data", metavar="FILE.npz",
                   help="preprocessed inputs named like the model inputs, optional 'labels'")
    v.add_argument("--batch", type=int, default=8,
                   help="batch size for generated inputs of dynamic models")
    v.add_argument("--limit", type=int, help="use at most this many samples from --data")
    v.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    v.add_argument("--json", metavar="FILE", help="write the comparison as JSON")

    e = sub.add_parser("evaluate", parents=[common], help="top-1 accuracy of one or more models")
    e.add_argument("models", nargs="+", metavar="MODEL")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE.npz",
                        help="preprocessed inputs named like the model input, and 'labels'")
    source.add_argument("--dataset", choices=["digits"],
                        help="scikit-learn's digits test split (for the embedded model)")
    e.add_argument("--limit", type=int, help="use at most this many samples")
    e.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    e.add_argument("--json", metavar="FILE", help="write the accuracies as JSON")
    return p


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 2..8, got '{text}'") \
            from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 2..8, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got '{text}'")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit status 2, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"onnx-udfc: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"inspect": _inspect, "compress": _compress, "verify": _verify,
                    "evaluate": _evaluate}
        return commands[args.command](args)
    except UdfcError as exc:
        print(f"onnx-udfc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-udfc: interrupted", file=sys.stderr)
        return 130


def _inspect(args) -> int:
    from onnx_udfc import api
    from onnx_udfc.core.io import parse_input_shapes
    from onnx_udfc.ops.cost import count_params, layer_stats, total_macs

    model = api.load(args.model)
    api.normalize(model)
    analysis = api.analyse(model, parse_input_shapes(args.input_shape))
    layers = layer_stats(model, analysis.shapes)
    groups = [{
        "id": g.id, "channels": g.size, "prunable": g.prunable, "coupled": g.coupled,
        "producers": g.producers, "fixed_reasons": g.reasons()} for g in analysis.groups]
    info = {"params": count_params(model), "macs": total_macs(layers),
            "flops": 2 * total_macs(layers), "groups": groups,
            "unsupported": [{"node": n, "reason": r} for n, r in analysis.channels.unsupported],
            "layers": [layer.to_dict() for layer in layers]}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    if not args.quiet:
        print(f"{args.model}: {info['params']:,} params, {info['flops']:,} FLOPs per sample, "
              f"{len(groups)} channel groups")
        print(f"{'id':>4} {'chan':>6} {'prun':>6} {'coupled':>7}  producers / why fixed")
        for g in groups:
            who = ", ".join(g["producers"][:2]) + (" ..." if len(g["producers"]) > 2 else "")
            why = "" if not g["fixed_reasons"] else "  [" + "; ".join(
                g["fixed_reasons"][: (None if args.verbose else 1)]) + "]"
            print(f"{g['id']:>4} {g['channels']:>6} {g['prunable']:>6} "
                  f"{'yes' if g['coupled'] else 'no':>7}  {who or '-'}{why}")
        for u in info["unsupported"]:
            print(f"unsupported: {u['node']}: {u['reason']}")
    return 0


def _compress(args) -> int:
    from onnx_udfc import api
    from onnx_udfc.core.io import disk_size, parse_input_shapes
    from onnx_udfc.report.report import Progress
    from onnx_udfc.report.verify import verify

    out = Path(args.output)
    src = Path(args.model)
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise UdfcError(f"{out}: output path is the input model; choose another path")
    if out.parent and not out.parent.is_dir():
        raise UdfcError(f"{out}: output directory '{out.parent}' does not exist")
    inverting = args.method == "udfc+" and args.moments == "inverted" and not args.calibration
    stages = ["load", "analyse"] + (["invert"] if inverting else []) + \
        ["plan", "solve", "rewrite"] + (["quantize"] if args.bits else []) + \
        (["store"] if args.format == "qdq" else []) + ["save"] + \
        ([] if args.no_verify else ["verify"]) + (["latency"] if args.latency else [])
    progress = Progress(stages, args.quiet)
    try:
        model, report = api.compress(
            args.model, prune=args.prune, criterion=args.criterion, exclude=args.exclude,
            prune_coupled=args.prune_coupled, round_to=args.round_to, fold_bn=args.fold_bn,
            input_shapes=parse_input_shapes(args.input_shape), progress=progress, check=False,
            method=args.method, bits=args.bits, quantizer=args.quantizer,
            granularity=args.granularity, alpha1=args.alpha1, alpha2=args.alpha2,
            quant_exclude=args.quant_exclude, format=args.format, block_size=args.block_size,
            container=args.container, opset=args.opset, calibration=args.calibration,
            budget_flops=args.budget_flops, fold_bn_scales=args.fold_bn_scales,
            moments=args.moments, sequential=args.sequential, seed=args.seed)
        progress("save")
        t = time.perf_counter()
        report.size_after = api.save_compressed(model, out, source=args.model,
                                                external_data=args.external_data or None)
        report.size_before = disk_size(src)
        report.timings["save"] = time.perf_counter() - t
        del model
        if not args.no_verify:
            progress("verify")
            t = time.perf_counter()
            result = verify(args.model, out, data=args.data, provider=args.provider)
            report.fidelity = [f.to_dict() for f in result.fidelity]
            report.accuracy_before, report.accuracy_after = result.accuracy_before, \
                result.accuracy_after
            report.timings["verify"] = time.perf_counter() - t
        if args.latency:
            from onnx_udfc.report.latency import compare_latency

            progress("latency")
            report.latency = compare_latency(args.model, out, provider=args.provider,
                                             qdq=args.format == "qdq")
            report.latency["flops_ratio"] = report.flops_after / report.flops_before \
                if report.flops_before else None
    finally:
        progress.close()
    if args.report:
        report.write(args.report)
    if args.plot:
        from onnx_udfc.report.plot import plot_report

        plot_report(report.to_dict(), args.plot)
    if not args.quiet:
        print(f"{args.model} -> {out}")
        if args.verbose:
            print(report.layer_table())
        print(report.summary())
    return 0


def _evaluate(args) -> int:
    import numpy as np

    from onnx_udfc.core.io import graph_inputs, load_model
    from onnx_udfc.core.ort import make_inputs, run, session
    from onnx_udfc.report.verify import accuracy

    results = {}
    for path in args.models:
        model = load_model(path, check_finite=False)
        if args.dataset:
            from onnx_udfc.report.datasets import load_dataset

            images, labels = load_dataset(args.dataset)
            feed = {graph_inputs(model)[0].name: images[:args.limit] if args.limit else images}
            labels = labels[:args.limit] if args.limit else labels
        else:
            feed, labels = make_inputs(model, data=args.data, limit=args.limit)
            if labels is None:
                raise UdfcError(f"{args.data}: no 'labels' array to score against")
        logits = run(session(path, args.provider), feed)[0]
        results[path] = {"top1": accuracy(logits, np.asarray(labels)), "samples": len(labels)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.quiet:
        for path, r in results.items():
            print(f"{path}: top-1 {100 * r['top1']:.2f}% on {r['samples']} samples")
    return 0


def _verify(args) -> int:
    from onnx_udfc.core.io import load_model
    from onnx_udfc.report.verify import verify

    for path in (args.original, args.compressed):
        load_model(path, check_finite=False)
    result = verify(args.original, args.compressed, data=args.data, batch=args.batch,
                    provider=args.provider, limit=args.limit)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    if not args.quiet:
        print(f"{result.samples} samples on {result.provider}")
        for f in result.fidelity:
            top1 = "" if f.top1_agreement is None else \
                f"  top-1 agreement {100 * f.top1_agreement:.2f}%"
            print(f"{f.output}: max abs {f.max_abs:.4g}  mean abs {f.mean_abs:.4g}  "
                  f"cosine {f.cosine:.6f}{top1}")
        if result.accuracy_before is not None:
            print(f"accuracy {100 * result.accuracy_before:.2f}% -> "
                  f"{100 * result.accuracy_after:.2f}%")
    return 0
