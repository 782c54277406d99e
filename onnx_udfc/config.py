"""One typed configuration for a compression run: every option, its default and its choices
written once, the presets that name what users want, and the one ``validate()``.

The configuration is plain data, so it sits at the bottom of the package (just above
``core``): every stage takes its own typed section instead of loose keyword arguments. The
command line is generated from the field metadata here (:func:`onnx_udfc.cli`), and
``CompressConfig.to_dict()`` is the report's ``config``.

Precedence, lowest first: the field defaults, the ``preset`` (effort), the ``target``
(storage), then every option the caller set explicitly.

Length: a little over 400 lines, because every option's help text and every check lives here
once; splitting it would scatter what this module exists to keep together.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnx_udfc.core.errors import UdfcError

METHODS = ("prune", "nm", "udfc", "udfc+")
CRITERIA = ("auto", "l1", "l2", "recon")
INPUT_RANGES = ("auto", "standardised", "0-1", "0-255")  # onnx_udfc.moments.input_range
MOMENT_SOURCES = ("auto", "sampled", "proxy", "propagated", "inverted")
QUANTIZERS = ("paper", "symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel")
FORMATS = ("fake", "qdq")
CONTAINERS = ("auto", "int8", "int4")
PROVIDERS = ("cpu", "cuda")
BITS_RANGE = (2, 8)


def option(default: Any = None, help: str = "", *, flag: str | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None,
           repeat: bool = False, cli: bool = True) -> Any:
    """A config field with what the command line needs to expose it.

    ``flag``: the CLI spelling (default ``--field-name``); ``repeat``: a list option given
    several times; ``cli=False``: Python-only (e.g. an in-memory calibration array)."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar,
            "repeat": repeat, "cli": cli}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class GraphOptions:
    """How the graph is read before any channel is touched."""

    input_shapes: dict[str, list[int]] = option(
        {}, "fix a dynamic input shape, e.g. input:1x3x224x224 (repeatable)",
        flag="--input-shape", metavar="NAME:DxD", repeat=True)
    fold_bn: bool = option(False, "fold BatchNormalization into the preceding Conv/Gemm first")
    input_range: str = option(
        "auto", "values of an image input, for the data-free inputs: standardised (mean 0, "
        "spread 1 per channel), 0-1 or 0-255 pixels; auto: read from the first layer",
        choices=INPUT_RANGES)


@dataclass
class PruneOptions:
    """Which channels go."""

    ratio: float = option(0.0, "share of channels removed from every prunable group, in [0, 1)",
                          flag="--prune", metavar="R")
    criterion: str = option("auto", "l1/l2: smallest filters first; recon: the channels the "
                            "kept ones reconstruct best first (from the udfc+ moments, "
                            "unchanged by BN folding); auto: recon for udfc+ on proxy moments "
                            "of a graph without BN, else l1",
                            choices=CRITERIA)
    budget_flops: float | None = option(
        None, "instead of one ratio: per-group ratios by predicted error, so that "
        "FLOPs after <= B x before", metavar="B")
    exclude: list[str] = option([], "leave nodes whose name matches untouched (repeatable)",
                                metavar="REGEX", repeat=True)
    prune_coupled: bool = option(False, "also prune channel groups tied by residual additions")
    round_to: int | str = option(1, "round kept channel counts to a multiple of N; auto: the "
                                 "channel block of ONNX Runtime's CPU convolutions on this "
                                 "machine (16 with AVX-512, 8 on other x86-64)",
                                 metavar="N|auto")


@dataclass
class MethodOptions:
    """How the damage is repaired."""

    name: str = option("prune", "prune: drop channels; nm: Neuron Merging; udfc: the paper's "
                       "closed form; udfc+: least squares on activation moments, GPTQ rounding "
                       "and bias correction", flag="--method", choices=METHODS)
    moments: str = option("auto", "udfc+ without --calibration: sampled (synthetic images, BN "
                          "re-anchored), proxy (crops of built-in photographs), inverted "
                          "(model inversion: minutes), propagated (analytic); auto: proxy "
                          "for image convnets without BN, sampled for other convnets (with "
                          "a 10-step inversion when --sequential prunes a BN-kept net) and "
                          "token models, else propagated",
                          choices=MOMENT_SOURCES)
    sequential: bool = option(False, "udfc+: fit each layer on the compressed-so-far network, "
                              "then refit the next Conv on patches of the kept channels")
    select: bool = option(False, "udfc+ --sequential with pruning: also run the one-shot "
                          "udfc+ and keep the result whose outputs drift least from the "
                          "original's on pink noise and photographs", flag="--select-method")
    calibration: Any = option(None, "udfc+: measure the moments on these preprocessed inputs "
                              "(.npz; in Python also an array or a dict)", metavar="FILE.npz")
    seed: int = option(0, "udfc+: seed of the synthetic samples and the inversion's start",
                       metavar="N")
    alpha1: float = option(0.01, "udfc: Eq. 12 bias-term weight", metavar="A")
    alpha2: float = option(0.008, "udfc: Eq. 14 bias-term weight", metavar="A")


@dataclass
class QuantOptions:
    """Weight quantization (``bits=None``: weights stay in float)."""

    bits: int | None = option(None, "quantize every weight layer to B bits (2..8)",
                              metavar="B")
    quantizer: str = option("paper", "paper: Eq. 3 grid without zero (fake-quant only); "
                            "symmetric / asymmetric: integer grids", choices=QUANTIZERS)
    granularity: str = option("tensor", "one scale per tensor or per output channel",
                              choices=GRANULARITIES)
    block_size: int | None = option(None, "block-wise scales, one per B input channels "
                                    "(overrides --granularity; opset 21)", metavar="B")
    exclude: list[str] = option([], "keep layers whose name matches in float (repeatable)",
                                flag="--quant-exclude", metavar="REGEX", repeat=True)
    budget_size: float | None = option(
        None, "instead of one bit width: per layer 8 or 4 bits or float, by each layer's "
        "measured effect on the outputs, so that the file is <= S x the original (int8/int4 "
        "targets)", metavar="S")
    float_share: float = option(
        0.0, "integer storage: keep in float the layers whose rounding moves the outputs most "
        "per byte (each measured alone, as --budget-size does), adding at most S x the "
        "original's size; 0: every layer at --bits", metavar="S")


@dataclass
class StorageOptions:
    """How quantized weights are written."""

    format: str = option("fake", "fake: float weights on the grid; qdq: integer weights + "
                         "DequantizeLinear", choices=FORMATS)
    container: str = option("auto", "qdq integer type (auto: int4 when bits <= 4)",
                            choices=CONTAINERS)
    opset: int | None = option(None, "qdq: convert to this opset (default: the model's, raised "
                               "to what the storage needs)", metavar="N")
    fold_bn_scales: bool = option(False, "qdq: fold BatchNormalization into the integer "
                                  "weights' scales (exact; smaller file)")
    external_data: bool = option(False, "store weights in OUTPUT.data (automatic above 2 GiB)")


@dataclass
class CheckOptions:
    """What is measured against the original after compression (command line only)."""

    verify: bool = option(True, "compare the output with the original in ONNX Runtime",
                          flag="--no-verify")
    data: str | None = option(None, "inputs (and labels) for the comparison", metavar="FILE.npz")
    provider: str = option("cpu", "ONNX Runtime execution provider", choices=PROVIDERS)
    max_error: float | None = option(
        None, "fidelity guard: back off the plan (less pruning, then 8 bits) until every "
        "output channel's error stays within E of its spread; stop if none does", metavar="E")
    latency: bool = option(False, "time original and output in ONNX Runtime (batch 1, "
                           "median of 20 interleaved runs)")


@dataclass
class OutputOptions:
    """Files written together at the end, only when every stage succeeded."""

    model: str | None = option(None, "the compressed model", flag="--output", metavar="OUT")
    report: str | None = option(None, "the JSON report", metavar="FILE.json")
    plot: str | None = option(None, "per-layer kept channels, bits and predicted error "
                              "(matplotlib)", metavar="FILE.png")


SECTIONS: dict[str, type] = {
    "graph": GraphOptions, "prune": PruneOptions, "method": MethodOptions,
    "quant": QuantOptions, "storage": StorageOptions, "check": CheckOptions,
    "output": OutputOptions}

# The recommended presets keep the layers that rounding hurts most in float, adding at most
# this share of the original file (0.25x for int8 becomes at most 0.28x). On ddddocr's
# detector it took int8 from -1.2 to -0.5 F1 points and int4 from 60 to 84 % F1
# (docs/results/realworld.md); the cost is one network run per weight layer.
FLOAT_SHARE = 0.03

# Effort presets: what users want, not how it is done. ``target`` is the storage a preset
# implies unless the caller names one (the paper's grid cannot be stored as integers).
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"method.name": "udfc"},
    "balanced": {"method.name": "udfc+", "quant.float_share": FLOAT_SHARE},
    "best": {"method.name": "udfc+", "method.sequential": True, "method.select": True,
             "quant.float_share": FLOAT_SHARE},
    "max": {"method.name": "udfc+", "method.sequential": True, "method.moments": "inverted",
            "method.select": True, "quant.float_share": FLOAT_SHARE},
    "paper": {"method.name": "udfc", "target": "fake"},
}
PRESET_HELP = {
    "fast": "udfc closed form (seconds)",
    "balanced": "udfc+ on sampled moments, the most sensitive layers kept in float "
                "(--float-share): the default",
    "best": "udfc+ --sequential; with pruning also the one-shot udfc+, the least drift kept",
    "max": "best on inverted images (minutes)",
    "paper": "the faithful reproduction: udfc, the paper's grid, fake quantization",
}
DEFAULT_PRESET = "balanced"

# Storage targets: the deployable file a user gets.
TARGETS: dict[str, dict[str, Any]] = {
    "fake": {"quant.quantizer": "paper", "storage.format": "fake"},
    "int8": {"quant.bits": 8, "quant.quantizer": "symmetric", "quant.granularity": "channel",
             "storage.format": "qdq"},
    "int4": {"quant.bits": 4, "quant.quantizer": "symmetric", "quant.granularity": "channel",
             "storage.format": "qdq"},
}
TARGET_HELP = {
    "fake": "float file, weights rounded to --bits when given (research)",
    "int8": "int8 per-channel QDQ weights (about 0.25x the float file)",
    "int4": "int4 per-channel QDQ weights (about 0.13x; opset 21)",
}
DEFAULT_TARGET = "int8"


@dataclass
class CompressConfig:
    """Everything a compression run needs. Build it with :meth:`resolve` to apply a preset and
    a target under explicit overrides; ``validate()`` refuses bad values in one line."""

    preset: str = DEFAULT_PRESET
    target: str = DEFAULT_TARGET
    graph: GraphOptions = field(default_factory=GraphOptions)
    prune: PruneOptions = field(default_factory=PruneOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    storage: StorageOptions = field(default_factory=StorageOptions)
    check: CheckOptions = field(default_factory=CheckOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    # what the caller set explicitly (dotted names), recorded in the report
    explicit: list[str] = field(default_factory=list)

    @classmethod
    def resolve(cls, preset: str | None = None, target: str | None = None,
                **overrides: Any) -> CompressConfig:
        """Defaults < preset < target < ``overrides`` (dotted names, e.g. ``prune.ratio``, or
        the short names of :data:`SHORT_NAMES`, e.g. ``prune=0.3``, ``bits=6``)."""
        preset = DEFAULT_PRESET if preset is None else preset
        if preset not in PRESETS:
            raise UdfcError(f"unknown preset '{preset}' (choose {', '.join(PRESETS)})")
        chosen = dict(PRESETS[preset])
        target = target if target is not None else chosen.pop("target", DEFAULT_TARGET)
        chosen.pop("target", None)
        if target not in TARGETS:
            raise UdfcError(f"unknown target '{target}' (choose {', '.join(TARGETS)})")
        config = cls(preset=preset, target=target)
        for key, value in {**chosen, **TARGETS[target]}.items():
            config.set(key, value)
        explicit = []
        for key, value in overrides.items():
            dotted = SHORT_NAMES.get(key, key)
            if dotted == "graph.input_shapes":
                value = {k: list(v) for k, v in (value or {}).items()}
            config.set(dotted, value)
            explicit.append(dotted)
        config.explicit = sorted(explicit)
        if config.method.name != "udfc+":  # the preset's udfc+ settings do not apply
            for key in ("method.sequential", "method.moments", "method.select"):
                if key not in explicit:
                    config.set(key, getattr(MethodOptions(), key.split(".")[1]))
        if not config.method.sequential and "method.select" not in explicit:
            config.method.select = False  # it compares the sequential fit with the one-shot
        if "quant.bits" not in config.explicit and target == "fake":
            config.quant.bits = None
        if "quant.float_share" not in explicit and (
                target == "fake" or config.storage.format != "qdq"
                or config.quant.budget_size is not None):
            config.quant.float_share = 0.0  # research files, or the budget's float layers
        if "quant.quantizer" not in explicit and config.quant.budget_size is not None \
                and config.storage.format == "qdq":
            # Most of a size budget's layers go to 4 bits, where a symmetric grid leaves half
            # its 16 levels unused on a skewed channel (a BN-folded 3x3 depthwise kernel); a
            # zero point costs a byte per channel (docs/results/realworld.md, budget rows).
            config.quant.quantizer = "asymmetric"
        return config

    def set(self, dotted: str, value: Any) -> None:
        section, _, name = dotted.partition(".")
        part = getattr(self, section, None) if name else None
        if part is None or not dataclasses.is_dataclass(part) \
                or name not in {f.name for f in dataclasses.fields(part)}:
            raise UdfcError(f"unknown option '{dotted}'")
        setattr(part, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``config``: every effective option; in-memory calibration data is
        named by its type."""
        out: dict[str, Any] = {"preset": self.preset, "target": self.target,
                               "explicit": list(self.explicit)}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            if section == "method" and values["calibration"] is not None \
                    and not isinstance(values["calibration"], str | Path):
                values["calibration"] = f"<{type(self.method.calibration).__name__}>"
            elif section == "method" and values["calibration"] is not None:
                values["calibration"] = str(values["calibration"])
            out[section] = values
        return out

    @property
    def inverted(self) -> bool:
        """True when the run needs the model-inversion batch."""
        return self.method.name == "udfc+" and self.method.moments == "inverted" \
            and self.method.calibration is None

    def validate(self) -> None:
        """Refuse every bad or contradictory value before any work, one line each."""
        p, m, q, s = self.prune, self.method, self.quant, self.storage
        check_prune(p)
        _check_choice("input range", self.graph.input_range, INPUT_RANGES)
        for pattern in q.exclude:
            _check_regex(pattern)
        if p.budget_flops is not None and (not _is_number(p.budget_flops)
                                           or not 0.0 < p.budget_flops <= 1.0):
            raise UdfcError(f"--budget-flops must be in (0, 1], got {p.budget_flops!r}")
        _check_choice("method", m.name, METHODS)
        _check_choice("moments source", m.moments, MOMENT_SOURCES)
        if m.sequential and m.name != "udfc+":
            raise UdfcError("--sequential applies to --method udfc+ only")
        if m.select and (m.name != "udfc+" or not m.sequential):
            raise UdfcError("--select-method compares --sequential with the one-shot fit: "
                            "give --method udfc+ --sequential")
        if isinstance(m.seed, bool) or not isinstance(m.seed, int | np.integer) or m.seed < 0:
            raise UdfcError(f"seed must be a non-negative integer, got {m.seed!r}")
        for name in ("alpha1", "alpha2"):
            value = getattr(m, name)
            if not _is_number(value) or value < 0:
                raise UdfcError(f"{name} must be a finite number >= 0, got {value!r}")
        if q.bits is not None:
            _check_bits(q.bits)
        if q.budget_size is not None:
            _check_size_budget(self)
        _check_float_share(self)
        _check_choice("quantizer", q.quantizer, QUANTIZERS)
        _check_choice("granularity", q.granularity, GRANULARITIES)
        if q.block_size is not None:
            _check_int("block size", q.block_size, 2)
            if q.bits is None:
                raise UdfcError("--block-size sets the quantization blocks: give --bits too")
        _check_choice("format", s.format, FORMATS)
        _check_choice("container", s.container, CONTAINERS)
        _check_storage(s, q)
        _check_choice("provider", self.check.provider, PROVIDERS)
        if self.check.max_error is not None:
            if not _is_number(self.check.max_error) or self.check.max_error <= 0:
                raise UdfcError(f"--max-error must be a number > 0, got "
                                f"{self.check.max_error!r}")
            if not self.check.verify:
                raise UdfcError("--max-error needs the comparison: drop --no-verify")
        for name, shape in self.graph.input_shapes.items():
            if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0
                                for d in shape):
                raise UdfcError(f"bad input shape for '{name}': {shape!r} (positive integers)")


# Short keyword names accepted by CompressConfig.resolve and api.compress: the field's own name,
# except where two sections share one or the section names it.
_RENAMED = {"prune.ratio": "prune", "method.name": "method", "quant.exclude": "quant_exclude"}
SHORT_NAMES: dict[str, str] = {
    _RENAMED.get(f"{section}.{f.name}", f.name): f"{section}.{f.name}"
    for section in ("graph", "prune", "method", "quant", "storage")
    for f in dataclasses.fields(SECTIONS[section])}


def check_prune(p: PruneOptions, group_ratios: dict[int, float] | None = None) -> None:
    """The pruning options, and per-group ratios when a budget allocated them."""
    for ratio in [p.ratio, *(group_ratios or {}).values()]:
        _check_ratio(ratio)
    _check_choice("criterion", p.criterion, CRITERIA)
    if p.round_to != "auto":
        _check_int("--round-to", p.round_to, 1)
    for pattern in p.exclude:
        _check_regex(pattern)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_ratio(ratio: Any) -> None:
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or math.isnan(ratio) \
            or not 0.0 <= ratio < 1.0:
        raise UdfcError(f"pruning ratio {ratio} is outside [0, 1)")


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UdfcError(f"unknown {what} '{value}' (choose {', '.join(choices)})")


def _check_int(what: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UdfcError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_bits(bits: Any) -> None:
    lo, hi = BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise UdfcError(f"bits must be an integer in {lo}..{hi}, got {bits!r}")


def _check_size_budget(config: CompressConfig) -> None:
    q = config.quant
    if not _is_number(q.budget_size) or not 0.0 < q.budget_size <= 1.0:
        raise UdfcError(f"--budget-size must be in (0, 1], got {q.budget_size!r}")
    if config.storage.format != "qdq":
        raise UdfcError("--budget-size counts integer storage: use --target int8 or int4 "
                        "(or --format qdq)")
    if "quant.bits" in config.explicit:
        raise UdfcError("--budget-size chooses the bits of every layer: drop --bits")
    if config.storage.container == "int4":
        raise UdfcError("--budget-size mixes 8- and 4-bit layers: drop --container int4")


def _check_float_share(config: CompressConfig) -> None:
    share = config.quant.float_share
    if not _is_number(share) or not 0.0 <= share < 1.0:
        raise UdfcError(f"--float-share must be in [0, 1), got {share!r}")
    if share == 0.0:
        return
    if config.storage.format != "qdq":
        raise UdfcError("--float-share counts integer storage: use --target int8 or int4 "
                        "(or --format qdq)")
    if config.quant.budget_size is not None:
        raise UdfcError("--budget-size already keeps layers in float where it pays: drop "
                        "--float-share")


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UdfcError(f"bad --exclude regex '{pattern}': {exc}") from None


def needed_opset(storage: StorageOptions, quant: QuantOptions,
                 bits: int | None = None) -> tuple[int, str]:
    """The lowest opset whose DequantizeLinear can hold this storage, and why (``bits``: the
    narrowest layer's width when a size budget mixes them)."""
    narrowest = bits if bits is not None else 4 if quant.budget_size is not None else quant.bits
    if container_type(storage, narrowest or 8, "symmetric") == "int4":
        return 21, "int4 DequantizeLinear"
    if quant.block_size:
        return 21, "block-wise DequantizeLinear"
    if quant.granularity == "channel":
        return 13, "per-channel DequantizeLinear"
    return 10, "DequantizeLinear"


def container_type(storage: StorageOptions, bits: int, scheme: str) -> str:
    """The integer type: int4/uint4 or int8/uint8 (signed for the symmetric grid)."""
    four = storage.container == "int4" or (storage.container == "auto" and bits <= 4)
    return ("" if scheme == "symmetric" else "u") + ("int4" if four else "int8")


def _check_storage(s: StorageOptions, q: QuantOptions) -> None:
    if s.fold_bn_scales and s.format != "qdq":
        raise UdfcError("--fold-bn-scales needs --format qdq (it folds BatchNormalization into "
                        "the integer weights' scales)")
    if s.format == "fake":
        if s.container != "auto" or s.opset is not None:
            raise UdfcError("--container and --opset apply to --format qdq only")
        return
    if q.bits is None:
        raise UdfcError("--format qdq stores quantized weights: give --bits B (2..8)")
    if q.quantizer == "paper":
        raise UdfcError("--format qdq cannot store the paper grid (--quantizer paper): its "
                        "levels exclude 0 and are not integers with a zero point; use "
                        "--quantizer symmetric|asymmetric, or --format fake")
    if s.container == "int4" and q.bits > 4:
        raise UdfcError(f"--container int4 holds at most 4 bits, got --bits {q.bits}")
    if s.opset is not None:
        import onnx

        latest = onnx.defs.onnx_opset_version()
        if isinstance(s.opset, bool) or not isinstance(s.opset, int):
            raise UdfcError(f"opset must be an integer, got {s.opset!r}")
        if s.opset > latest:
            raise UdfcError(f"target opset {s.opset} is newer than the installed onnx "
                            f"{onnx.__version__} can convert to (at most {latest})")
        need, why = needed_opset(s, q)
        if s.opset < need:
            raise UdfcError(f"target opset {s.opset} is too old: {why} needs opset >= {need}")
