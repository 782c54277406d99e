"""The JSON report and the short human summary.

Report schema (all counts per single sample; ``flops = 2 * macs``)::

    tool, version, config                         what was asked
    params_before / params_after                  floating-point initializer elements
    macs_before / macs_after, flops_before / flops_after
    size_before / size_after                      serialized bytes (file size on save)
    groups: [{id, channels, prunable, coupled, removed, kept, ratio, producers, fixed_reasons}]
    layers: [{name, op, in_channels_before/after, out_channels_before/after, params_before/after,
              macs_before/after, bits, predicted_error,
              compensation: {method, compensated, reason?, stats, absorbers, degenerate} | null,
              quantization: {bits, quantizer, granularity, block_size, quant_error,
                             scale_compensated, reason?,
                             storage: {format fake|qdq, dtype float32|int8|uint8|int4|uint4,
                                       bits, scheme, axis?, block_size?, zero_point?,
                                       bytes?, float_bytes?}} | null}]
    storage: {format, opset_before, opset_after, ir_version, weights: {dtype: layers}}
    latency: {batch, provider, runs, before_ms, after_ms, ratio, flops_ratio,
              after_folded_ms?} | null        CLI --latency: ONNX Runtime medians;
                                                  after_folded_ms: a qdq output run with
                                                  session.disable_quant_qdq=1
    predicted_error: for udfc the mean relative Eq. 12 residual of the pruned channels
                     (0 exact, 1 nothing recovered); otherwise the share of the layer's filter
                     energy (squared l2) that pruning removes.
    unsupported: [{node, reason}]                 nodes left untouched, and why
    float_layers: [{node, reason}]                with --bits: weight layers kept in float
    other_weights: {node:W|node:R: quantization}  quantized recurrent (LSTM/GRU/RNN) weights
    selection: {inputs, metric, candidates: [{method, error, seconds, chosen}], chosen,
                skipped} | null                   --select-method: the methods run and kept
    flops_budget: {sensitivity, group_drift: {group id: drift}} | null
                                                  --budget-flops: each group's output drift when
                                                  cut off uncompensated (weights its errors)
    mixed_precision: {budget_size, float_share, predicted_size, predicted_ratio, sensitivity,
                      counts, predicted_error,
                      layers: {name: {bits, error, error_at_4_bits, bytes}}}
                                                  --budget-size or --float-share: the per-layer
                                                  allocation (one of the two is null)
    duplicated_initializers: [{initializer, copy, nodes, shared_with, elements, reason}]
                                                  shared initializers the rewrite had to copy
    folded_batchnorm: [producer names]            when --fold-bn was used
    fidelity, accuracy_before/after               when verification ran; each output has
                                                  channel_error (worst channel's RMS error
                                                  over its spread) and worst_channel
    guard: {inputs data|synthetic, limit, holds, verdict, max_error, attempts: [{prune,
            budget_flops, bits, holds, verdict}]}   the fidelity guard (report/fidelity.py)
    input_shapes: {input: {shape, from}}          the concrete shapes of dynamic inputs the run
                                                  worked at (given by --input-shape, stated by
                                                  the model, or the default side)
    input_range: {range, from}                    the values the data-free image inputs take
                                                  (standardised, 0-1, 0-255; given or auto;
                                                  range null: auto, never needed, not measured)
    moments: {requested, used, fallbacks: [{from, to, cause, stage}]} | null
                                                  where the activation moments came from
                                                  (udfc+, --criterion recon, --budget-flops)
    criterion: l1|l2|recon                        the channel criterion the plan used
                                                  (--criterion auto resolved)
    timings: {stage: seconds}
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from onnx_udfc import __version__
from onnx_udfc.ops.cost import LayerStats, total_macs


@dataclass
class Report:
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int
    groups: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    unsupported: list[dict[str, str]]
    folded_batchnorm: list[str] = field(default_factory=list)
    fidelity: list[dict[str, Any]] | None = None
    guard: dict[str, Any] | None = None  # the fidelity verdict (onnx_udfc.report.fidelity)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    storage: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    inversion: dict[str, Any] | None = None  # --moments inverted: how the fit went
    moments: dict[str, Any] | None = None  # udfc+, recon, budget: the moment source used
    criterion: str | None = None  # the channel criterion the plan used (auto resolved)
    float_layers: list[dict[str, str]] = field(default_factory=list)
    duplicated_initializers: list[dict[str, Any]] = field(default_factory=list)
    input_shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_range: dict[str, str | None] | None = None  # of the image input (moments/input_range.py)
    # Quantized weights outside the layer table (LSTM/GRU/RNN W and R), by ``node:W``.
    other_weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    mixed_precision: dict[str, Any] | None = None  # --budget-size: the allocation
    flops_budget: dict[str, Any] | None = None  # --budget-flops: the groups' output drift
    selection: dict[str, Any] | None = None  # --select-method: the candidates and the choice

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    def to_dict(self) -> dict[str, Any]:
        d = {"tool": "onnx-udfc", "version": __version__}
        d.update(asdict(self))
        d["flops_before"], d["flops_after"] = self.flops_before, self.flops_after
        return d

    def write(self, path: str | os.PathLike) -> None:
        """Atomic JSON write."""
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        os.replace(tmp, path)

    def layer_table(self) -> str:
        """One line per weight layer (``-v``)."""
        rows = [f"{'layer':<40} {'op':<6} {'out':>11} {'in':>11} {'bits':>4} {'pred.err':>8}"]
        for x in self.layers:
            err = "" if x["predicted_error"] is None else f"{x['predicted_error']:.3f}"
            rows.append(f"{x['name'][-40:]:<40} {x['op']:<6} "
                        f"{x['out_channels_before']:>5}>{x['out_channels_after']:<5} "
                        f"{x['in_channels_before']:>5}>{x['in_channels_after']:<5} "
                        f"{x['bits'] or '-':>4} {err:>8}")
        return "\n".join(rows)

    def summary(self) -> str:
        def ratio(a: int, b: int) -> str:
            return f"{b / a:.3f}x" if a else "n/a"

        pruned = sum(1 for g in self.groups if g["removed"])
        explicit = ", ".join(k for k in self.config.get("explicit", [])
                             if not k.startswith(("output.", "check."))) or "nothing"
        lines = [
            f"config  preset {self.config.get('preset')}, target {self.config.get('target')}, "
            f"set explicitly: {explicit}",
            f"params  {self.params_before:,} -> {self.params_after:,} "
            f"({ratio(self.params_before, self.params_after)})",
            f"FLOPs   {self.flops_before:,} -> {self.flops_after:,} "
            f"({ratio(self.flops_before, self.flops_after)}) per sample",
            f"size    {self.size_before / 2**20:.2f} MiB -> {self.size_after / 2**20:.2f} MiB "
            f"({ratio(self.size_before, self.size_after)})" + _storage_note(self.storage),
            f"groups  {len(self.groups)} found, {pruned} pruned, "
            f"{sum(1 for g in self.groups if g['prunable'] == 0)} fully fixed",
        ]
        chosen = {k: v for k, v in self.input_shapes.items() if v["from"] != "given"}
        if chosen:
            lines.append("inputs  " + "; ".join(
                f"{name} worked at {'x'.join(map(str, v['shape']))} ({v['from']}; the output "
                "keeps its dynamic dims, --input-shape sets the size)"
                for name, v in chosen.items()))
        if self.input_range and self.input_range["range"] not in (None, "standardised"):
            lines.append(f"range   image input read as {self.input_range['range']} "
                         f"({self.input_range['from']}; --input-range sets it)")
        if self.latency:
            lat = self.latency
            lines.insert(3, f"latency {lat['before_ms']:.3g} ms -> {lat['after_ms']:.3g} ms "
                            f"({ratio(lat['before_ms'], lat['after_ms'])}) batch {lat['batch']}, "
                            f"{lat['provider']}, median of {lat['runs']}" + (
                                f"; {lat['after_folded_ms']:.3g} ms with "
                                "session.disable_quant_qdq=1 (weights dequantized at load)"
                                if lat.get("after_folded_ms") is not None else ""))
        if self.inversion:
            inv = self.inversion
            stopped = inv["gradient_stopped_at"]
            lines.append(f"invert  {inv['steps']} steps on {inv['batchnorms']} BatchNorms"
                         f"{' + class prior' if inv.get('class_prior') else ''}, "
                         f"{inv.get('groups', 1)} group(s), "
                         f"loss {inv['loss_start']:.3g} -> {inv['loss_end']:.3g} "
                         f"({inv['seconds']:.1f} s)" + (
                             f"; gradient stopped at {', '.join(stopped)}" if stopped else ""))
        if self.selection:
            sel = self.selection
            if sel["skipped"] and len(sel["candidates"]) == 1:
                lines.append(f"select  kept {sel['chosen']}: the candidates could not be "
                             f"compared ({sel['skipped']})")
            else:
                errors = ", ".join(
                    f"{c['method']} {c['error']:.3g}" if c["error"] is not None
                    else f"{c['method']} n/a" for c in sel["candidates"])
                lines.append(f"select  kept {sel['chosen']}, the least output drift on "
                             f"{sel['inputs']}: {errors}")
        comps = [x["compensation"] for x in self.layers if x.get("compensation")]
        method = self.config.get("method", {}).get("name")
        if comps:
            done = sum(1 for c in comps if c["compensated"])
            why = next((c["reason"] for c in comps if not c["compensated"]), "")
            lines.append(f"method  {method}: {done} of {len(comps)} pruned "
                         "layers compensated" + (f" (not: {why})" if why else ""))
        if self.moments and method == "udfc+":
            lines.append("moments " + _moments_note(self.moments))
        quants = [x["quantization"] for x in self.layers if x.get("quantization")] + \
            list(self.other_weights.values())
        if quants:
            scaled = sum(1 for q in quants if q["scale_compensated"])
            corrected = sum(1 for q in quants if q.get("bias_corrected"))
            repair = f"{scaled} with scale compensation" + (
                f", {corrected} bias-corrected" if corrected else "")
            widths = sorted({q["bits"] for q in quants})
            at = f" at {widths[0]} bits" if len(widths) == 1 else ": " + ", ".join(
                f"{sum(1 for q in quants if q['bits'] == b)} at {b} bits" for b in widths)
            lines.append(f"weights {len(quants)} layers{at} "
                         f"({quants[0]['quantizer']}, {quants[0]['granularity']}), {repair}")
        if self.flops_budget:
            lines.append(f"budget  FLOPs <= {self.config['prune']['budget_flops']:g}x: groups "
                         f"ranked by predicted error x {self.flops_budget['sensitivity']}")
        if self.mixed_precision:
            mp = self.mixed_precision
            counts = ", ".join(f"{n} {k}" for k, n in sorted(mp["counts"].items()))
            if mp.get("float_share") is not None:
                lines.append(f"share   {mp['counts'].get('float', 0)} layer(s) kept in float "
                             f"within --float-share {mp['float_share']:g}, by output drift "
                             f"per byte ({mp['sensitivity']})")
            else:
                lines.append(f"budget  size <= {mp['budget_size']:g}x: {counts} (predicted "
                             f"{mp['predicted_ratio']:.3f}x; {mp['sensitivity']})")
        if self.float_layers:
            lines.append(_float_note(self.float_layers))
        if self.duplicated_initializers:
            lines.append(_duplicated_note(self.duplicated_initializers))
        if self.unsupported:
            lines.append(f"left untouched: {len(self.unsupported)} node(s), e.g. "
                         f"{self.unsupported[0]['node']} ({self.unsupported[0]['reason']})")
        for f in self.fidelity or []:
            top1 = "" if f["top1_agreement"] is None else \
                f", top-1 agreement {100 * f['top1_agreement']:.1f}%"
            lines.append(f"fidelity[{f['output']}]: worst channel error "
                         f"{f.get('channel_error', 0.0):.3g} of its spread, max abs "
                         f"{f['max_abs']:.3g}, cosine {f['cosine']:.5f}{top1}")
        if self.guard and "holds" in self.guard:
            g = self.guard
            tries = len(g["attempts"])
            backed = f" after {tries} plans (kept: prune {g['attempts'][-1]['prune']}, bits " \
                f"{g['attempts'][-1]['bits']})" if tries > 1 else ""
            state = "ok" if g["holds"] else "LIKELY BROKEN"
            lines.append(f"guard   {state} on {g['inputs']} inputs{backed}: {g['verdict']}")
        elif self.guard is not None:
            lines.append("guard   not run (--no-verify): the output was not compared")
        if self.accuracy_before is not None:
            lines.append(f"accuracy {100 * self.accuracy_before:.2f}% -> "
                         f"{100 * self.accuracy_after:.2f}%")
        if self.timings:
            lines.append("time    " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
                         + f" (total {sum(self.timings.values()):.2f}s)")
        return "\n".join(lines)


def _storage_note(storage: dict[str, Any] | None) -> str:
    """`, qdq: 57 int8 weights, opset 17 -> 21` for the size line (nothing for float)."""
    if not storage or storage.get("format") != "qdq":
        return ""
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(storage["weights"].items())) or "no"
    opsets = f"opset {storage['opset_before']}" + (
        f" -> {storage['opset_after']}" if storage["opset_after"] != storage["opset_before"]
        else "")
    fixed = "".join(f"; output '{x['output']}' declared {x['declared']} but computed "
                    f"{x['computed']}: declared as computed for opset {storage['opset_after']}"
                    for x in storage.get("outputs_redeclared", []))
    return f", qdq: {kinds} weights, {opsets}{fixed}"


def _float_note(layers: list[dict[str, str]]) -> str:
    """`float   3 weight layers kept in float: fc, mm (reason); conv (reason)`, grouped by
    reason."""
    n = len(layers)
    by_reason: dict[str, list[str]] = {}
    for x in layers:
        by_reason.setdefault(x["reason"], []).append(x["node"])
    return f"float   {n} weight layer{'s' if n > 1 else ''} kept in float: " + "; ".join(
        f"{', '.join(nodes)} ({reason})" for reason, nodes in by_reason.items())


def _duplicated_note(copies: list[dict[str, Any]]) -> str:
    """`shared  1 shared initializer copied (readers keep different channels, +216 elements):
    w for left`."""
    n = len(copies)
    added = sum(c["elements"] for c in copies)
    return (f"shared  {n} shared initializer{'s' if n > 1 else ''} copied (readers keep "
            f"different channels, +{added:,} elements): "
            + ", ".join(f"{c['initializer']} for {', '.join(c['nodes'])}" for c in copies))


def _moments_note(moments: dict[str, Any]) -> str:
    """`sampled`, `proxy (fitted: model inversion, 10 steps)`, `sampled (with 128 proxy crops;
    fitted: model inversion, 10 steps)`, or
    `propagated (fallback in plan: sampled failed: <cause>)`."""
    notes = [f"fallback in {f['stage']}: {f['from']} failed: {_clip(f['cause'])}"
             for f in moments["fallbacks"]]
    fit = moments.get("fit")
    if fit:
        what = "model inversion" if fit["batchnorms"] else "class prior"
        notes.insert(0, f"fitted: {what}, {fit['steps']} steps")
    if moments.get("proxy_crops"):
        notes.insert(0, f"with {moments['proxy_crops']} proxy crops")
    return moments["used"] + (f" ({'; '.join(notes)})" if notes else "")


def _clip(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def build_report(*, config: dict[str, Any], analysis, plan, layers_before: list[LayerStats],
                 layers_after: list[LayerStats], params_before: int, params_after: int,
                 size_before: int, size_after: int, predicted_error: dict[str, float],
                 folded_bn: list[str], timings: dict[str, float],
                 compensation: dict[str, dict] | None = None,
                 quantization: dict[str, dict] | None = None) -> Report:
    groups = []
    for gp in plan.groups:
        g = gp.group
        groups.append({
            "id": g.id, "channels": g.size, "prunable": g.size - len(gp.fixed),
            "coupled": g.coupled, "removed": len(gp.removed), "kept": gp.kept,
            "ratio": gp.ratio, "producers": g.producers,
            "fixed_reasons": _reasons(gp.fixed),
        })
    after = {layer.name: layer for layer in layers_after}
    compensation, quantization = compensation or {}, quantization or {}
    layers = []
    for b in layers_before:
        a = after.get(b.name, b)
        comp, quant = compensation.get(b.name, {}), quantization.get(b.name, {})
        error = comp.get("predicted_error", predicted_error.get(b.name))
        layers.append({
            "name": b.name, "op": b.op,
            "in_channels_before": b.in_channels, "in_channels_after": a.in_channels,
            "out_channels_before": b.out_channels, "out_channels_after": a.out_channels,
            "params_before": b.params, "params_after": a.params,
            "macs_before": b.macs, "macs_after": a.macs,
            "bits": quant.get("bits"),
            "predicted_error": error,
            "compensation": comp or None,
            "quantization": quant or None,
        })
    in_table = {b.name for b in layers_before}
    return Report(
        config=config, params_before=params_before, params_after=params_after,
        macs_before=total_macs(layers_before), macs_after=total_macs(layers_after),
        size_before=size_before, size_after=size_after, groups=groups, layers=layers,
        unsupported=[{"node": n, "reason": r} for n, r in analysis.channels.unsupported],
        folded_batchnorm=folded_bn, timings=timings,
        other_weights={k: v for k, v in quantization.items() if k not in in_table})


def _reasons(fixed: dict[int, str]) -> list[str]:
    counts: dict[str, int] = {}
    for r in fixed.values():
        counts[r] = counts.get(r, 0) + 1
    return [f"{n}x {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])]


class Progress:
    """A one-line progress bar on a TTY (stderr); silent in pipes and with ``quiet``."""

    def __init__(self, stages: list[str], quiet: bool = False) -> None:
        self.stages = stages
        self.done = 0
        self.enabled = not quiet and sys.stderr.isatty()

    def __call__(self, name: str) -> None:
        if not self.enabled:
            return
        self.done = min(self.done + 1, len(self.stages))
        width = 24
        filled = width * self.done // len(self.stages)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {name:<12}")
        sys.stderr.flush()

    def detail(self, text: str) -> None:
        """Rewrite the current stage's label (``invert 120/300``) without advancing."""
        if not self.enabled:
            return
        width = 24
        filled = width * self.done // len(self.stages)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text:<20}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 44 + "\r")
            sys.stderr.flush()
