"""Command line: ``onnx-udfc inspect | compress | verify``.

Errors print one line to stderr and exit with status 2; nothing is written half-way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from onnx_udfc import __version__
from onnx_udfc.config import (
    DEFAULT_PRESET,
    DEFAULT_TARGET,
    PRESET_HELP,
    PRESETS,
    SECTIONS,
    TARGET_HELP,
    TARGETS,
    CompressConfig,
)
from onnx_udfc.core.errors import UdfcError

PIPE_CLOSED = 141  # 128 + SIGPIPE: the status a shell reports for a reader that went away


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnx-udfc",
        description="Data-free structured pruning and quantization of ONNX models.")
    p.add_argument("--version", action="version", version=f"onnx-udfc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    common.add_argument("-v", "--verbose", action="store_true", help="print more detail")

    ins = sub.add_parser("inspect", parents=[common],
                         help="list channel groups, what is prunable and why not")
    ins.add_argument("model")
    _add_input_shape(ins)
    ins.add_argument("--json", metavar="FILE", help="write the analysis as JSON")

    c = sub.add_parser("compress", parents=[common], formatter_class=_Help,
                       help="prune and quantize a model (default: int8 QDQ with udfc+)",
                       description="Presets first: --preset names the effort, --target the "
                       "storage; every other option overrides them.")
    c.add_argument("model")
    _add_config_options(c)
    v = sub.add_parser("verify", parents=[common],
                       help="compare two models' outputs in ONNX Runtime")
    v.add_argument("original")
    v.add_argument("compressed")
    _add_input_shape(v)
    v.add_argument("--data", metavar="FILE.npz",
                   help="preprocessed inputs named like the model inputs, optional 'labels'")
    v.add_argument("--batch", type=_positive, default=8,
                   help="batch size for generated inputs of dynamic models")
    v.add_argument("--limit", type=_positive, help="use at most this many samples from --data")
    v.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    v.add_argument("--json", metavar="FILE", help="write the comparison as JSON")
    checks = v.add_argument_group(
        "pass or fail (exit status 1, one line per failing output)",
        "a value passes when |compressed - original| <= atol + rtol * |original|")
    checks.add_argument("--atol", type=_number, metavar="A", help="absolute tolerance")
    checks.add_argument("--rtol", type=_number, metavar="R", help="relative tolerance")
    checks.add_argument("--min-agreement", type=_number, metavar="F",
                        help="least top-1 agreement of classifier outputs, a fraction in [0, 1]")

    e = sub.add_parser("evaluate", parents=[common], help="top-1 accuracy of one or more models")
    e.add_argument("models", nargs="+", metavar="MODEL")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE.npz",
                        help="preprocessed inputs named like the model input, and 'labels'")
    source.add_argument("--dataset", choices=["digits"],
                        help="scikit-learn's digits test split (for the embedded model)")
    e.add_argument("--limit", type=_positive, help="use at most this many samples")
    e.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    e.add_argument("--json", metavar="FILE", help="write the accuracies as JSON")
    return p


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help only where the option has one (not for flags and empty lists)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], {}, argparse.SUPPRESS) \
                or "(default" in (action.help or ""):
            return action.help or ""
        return f"{action.help} (default: {action.default})"


def _add_input_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:DxD",
                        help="fix a dynamic input shape, e.g. input:1x3x224x224")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """The compress options, generated from :mod:`onnx_udfc.config` (choices, defaults and
    help are written there once). Only options given on the command line reach the config,
    so the preset and target fill the rest; --help shows the defaults of the default preset
    and target."""
    effective = CompressConfig.resolve()
    first = parser.add_argument_group("effort and storage")
    first.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                       help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    first.add_argument("--target", choices=list(TARGETS),
                       help="; ".join(f"{k}: {v}" for k, v in TARGET_HELP.items())
                       + f" (default: {DEFAULT_TARGET}, fake with --preset paper)")
    for section, options in SECTIONS.items():
        group = first if section == "output" else parser.add_argument_group(
            options.__doc__.strip().splitlines()[0].rstrip(".") if options.__doc__
            else section)
        current = getattr(effective, section)
        for f in dataclasses.fields(options):
            meta = f.metadata
            if not meta.get("cli", True):
                continue
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            default = getattr(current, f.name)
            kwargs: dict = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                            "help": meta["help"]}
            if isinstance(default, bool):
                kwargs["action"] = "store_false" if default else "store_true"
            else:
                if meta["repeat"]:
                    kwargs["action"] = "append"
                kwargs["metavar"] = meta["metavar"]
                kwargs["type"] = _VALUE_TYPES.get(f"{section}.{f.name}", _typed(f.type))
                if meta["choices"]:
                    kwargs["choices"] = list(meta["choices"])
                if default not in (None, [], {}):
                    kwargs["help"] = f"{meta['help']} (default: {default})"
            names = [flag] + (["-o"] if flag == "--output" else [])
            if flag == "--output":
                kwargs["required"] = True
            group.add_argument(*names, **kwargs)


def _typed(annotation: str):
    if annotation.startswith("int"):
        return _integer
    if annotation.startswith("float"):
        return _number
    return str


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 2..8, got '{text}'") \
            from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 2..8, got {value}")
    return value


def _shape(text: str) -> tuple[str, list[int]]:
    from onnx_udfc.core.io import parse_input_shapes

    try:
        return next(iter(parse_input_shapes([text]).items()))
    except UdfcError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got '{text}'")
    return value


def _round_to(text: str) -> int | str:
    return text if text == "auto" else _integer(text)


_VALUE_TYPES = {"quant.bits": _bits, "method.seed": _seed, "graph.input_shapes": _shape,
                "prune.round_to": _round_to}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit status 2, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"onnx-udfc: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"inspect": _inspect, "compress": _compress, "verify": _verify,
                    "evaluate": _evaluate}
        status = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return status
    except UdfcError as exc:
        print(f"onnx-udfc: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("onnx-udfc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _pipe_closed()


def _pipe_closed() -> int:
    """The reader of stdout went away (``inspect ... | head``): stop quietly with the status a
    shell gives a process ended by SIGPIPE. What is still buffered would fail again when the
    interpreter flushes stdout at exit ("Exception ignored ..."), so stdout goes to devnull."""
    try:
        stdout = sys.stdout.fileno()
    except (OSError, ValueError):  # captured in-process: nothing is flushed to a pipe at exit
        return PIPE_CLOSED
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stdout)
    os.close(devnull)
    return PIPE_CLOSED


def _inspect(args) -> int:
    from onnx_udfc import api
    from onnx_udfc.core.io import parse_input_shapes
    from onnx_udfc.ops.checks import quantized_layers
    from onnx_udfc.ops.cost import count_params, layer_stats, total_macs

    model = api.load(args.model)
    api.normalize(model)
    analysis = api.analyse(model, parse_input_shapes(args.input_shape))
    layers = layer_stats(model, analysis.shapes)
    quantized = quantized_layers(model)
    groups = [{
        "id": g.id, "channels": g.size, "prunable": g.prunable, "coupled": g.coupled,
        "producers": g.producers, "fixed_reasons": g.reasons()} for g in analysis.groups]
    info = {"params": count_params(model), "macs": total_macs(layers),
            "flops": 2 * total_macs(layers), "quantized": quantized, "groups": groups,
            "unsupported": [{"node": n, "reason": r} for n, r in analysis.channels.unsupported],
            "layers": [layer.to_dict() for layer in layers]}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    if not args.quiet:
        print(f"{args.model}: {info['params']:,} params, {info['flops']:,} FLOPs per sample, "
              f"{len(groups)} channel groups")
        if quantized:
            print(f"already quantized: {len(quantized)} layer(s) compute on integer weights; "
                  "compress needs the float model")
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
    from onnx_udfc.outputs import compress_to_files

    overrides = {k: v for k, v in vars(args).items() if "." in k}
    if "graph.input_shapes" in overrides:
        overrides["graph.input_shapes"] = dict(overrides["graph.input_shapes"])
    config = CompressConfig.resolve(args.preset, args.target, **overrides)
    config.validate()
    report = compress_to_files(args.model, config, quiet=args.quiet)
    if not args.quiet:
        print(f"{args.model} -> {config.output.model}")
        if args.verbose:
            print(report.layer_table())
        print(report.summary())
    guard = report.guard or {}
    if guard.get("holds") is False:  # written, but never silently: stderr survives -q and pipes
        print(f"onnx-udfc: warning: the compressed model is likely broken: {guard['verdict']}. "
              "Compress less (--prune, --bits), or let --max-error E back off the plan.",
              file=sys.stderr)
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
        sess = session(path, args.provider)
        logits = run(sess, feed)[0]
        top1 = accuracy(logits, np.asarray(labels),
                        f"{path}: output '{sess.get_outputs()[0].name}'")
        results[path] = {"top1": top1, "samples": len(labels)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.quiet:
        for path, r in results.items():
            print(f"{path}: top-1 {100 * r['top1']:.2f}% on {r['samples']} samples")
    return 0


def _verify(args) -> int:
    from onnx_udfc.core.io import check_input_shapes, load_model, parse_input_shapes
    from onnx_udfc.report.verify import verify

    shapes = parse_input_shapes(args.input_shape)
    for path in (args.original, args.compressed):
        check_input_shapes(load_model(path, check_finite=False), shapes)
    result = verify(args.original, args.compressed, data=args.data, batch=args.batch,
                    provider=args.provider, limit=args.limit, input_shapes=shapes,
                    atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    if not args.quiet:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result.input_shapes.items())
        print(f"{result.samples} samples ({shapes}) on {result.provider}")
        for f in result.fidelity:
            top1 = "" if f.top1_agreement is None else \
                f"  top-1 agreement {100 * f.top1_agreement:.2f}%"
            print(f"{f.output}: max abs {f.max_abs:.4g}  mean abs {f.mean_abs:.4g}  "
                  f"cosine {f.cosine:.6f}{top1}")
        if result.accuracy_before is not None:
            print(f"accuracy {100 * result.accuracy_before:.2f}% -> "
                  f"{100 * result.accuracy_after:.2f}%")
    for failure in result.failures:
        print(f"onnx-udfc: mismatch: {failure}", file=sys.stderr)
    return 0 if result.passed else 1
