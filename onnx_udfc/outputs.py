"""All or nothing on disk: check every input and output path before any work, run the
pipeline, then write the model, the report and the plot together, only when every stage
succeeded. A failure anywhere leaves no new file behind."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_udfc import pipeline
from onnx_udfc.config import CompressConfig
from onnx_udfc.core import io
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.input_shapes import shape_lists, working_input_shapes
from onnx_udfc.core.ort import PROVIDERS, check_feed, make_inputs
from onnx_udfc.methods.mixed import BudgetUnreachable
from onnx_udfc.moments.comparison import guard_feeds
from onnx_udfc.moments.input_range import resolve_input_range
from onnx_udfc.report.fidelity import default_limit, verdict
from onnx_udfc.report.report import Progress, Report


@dataclass
class PendingOutputs:
    """Files written under a temporary folder beside each destination, moved into place by
    :meth:`commit`; :meth:`discard` (or leaving the ``with`` block on an error) removes them."""

    folders: dict[Path, Path] = field(default_factory=dict)  # destination dir -> temp dir
    files: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, final)

    def path_for(self, final: Path) -> Path:
        parent = final.parent
        if parent not in self.folders:
            try:
                self.folders[parent] = Path(tempfile.mkdtemp(prefix=".udfc-", dir=parent))
            except OSError as exc:
                raise UdfcError(f"{final}: cannot write to '{parent}' ({exc.strerror})") \
                    from None
        temporary = self.folders[parent] / final.name
        self.files.append((temporary, final))
        return temporary

    def commit(self) -> None:
        for temporary, final in self.files:
            companions = [temporary.with_name(temporary.name + ".data")]  # external data
            for extra in companions:
                if extra.exists():
                    os.replace(extra, final.with_name(extra.name))
            if temporary.exists():
                os.replace(temporary, final)
        self.discard()

    def discard(self) -> None:
        for folder in self.folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()

    def __enter__(self) -> PendingOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def check_destinations(source: str | os.PathLike, config: CompressConfig) -> dict[str, Path]:
    """Every output path: its folder exists and is writable, it is not a folder, not the
    input, and no two outputs share a path."""
    wanted = {"model": config.output.model, "report": config.output.report,
              "plot": config.output.plot}
    paths: dict[str, Path] = {}
    src = Path(source)
    for kind, value in wanted.items():
        if value is None:
            continue
        path = Path(value)
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise UdfcError(f"{path}: {kind} path is a directory")
        if not parent.is_dir():
            raise UdfcError(f"{path}: {kind} directory '{parent}' does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UdfcError(f"{path}: {kind} directory '{parent}' is not writable")
        if src.exists() and path.exists() and os.path.samefile(src, path):
            raise UdfcError(f"{path}: output path is the input model; choose another path")
        if any(p.resolve() == path.resolve() for p in paths.values()):
            raise UdfcError(f"{path}: two outputs share this path")
        paths[kind] = path
    if "model" not in paths:
        raise UdfcError("no output path: give -o OUT")
    return paths


def check_environment(config: CompressConfig) -> None:
    """Extras and execution providers the run will need."""
    if config.output.plot and importlib.util.find_spec("matplotlib") is None:
        raise UdfcError("--plot needs matplotlib: pip install 'onnx-udfc[plot]'")
    if config.check.verify or config.check.latency:
        import onnxruntime as ort

        if PROVIDERS[config.check.provider] not in ort.get_available_providers():
            raise UdfcError(f"provider '{config.check.provider}' is not available in this "
                            "onnxruntime (install onnxruntime-gpu and a CUDA driver)")


def check_data(model: onnx.ModelProto, config: CompressConfig) -> None:
    """``--data`` and ``--calibration``: readable, with the model's input names, ranks, static
    dims and a float dtype."""
    if config.check.data is not None and config.check.verify:
        make_inputs(model, data=config.check.data, limit=1)
    calibration = config.method.calibration
    if calibration is not None and config.method.name == "udfc+":
        if isinstance(calibration, str | os.PathLike):
            make_inputs(model, data=calibration, limit=1)
        else:
            from onnx_udfc.moments.measured import load_calibration

            check_feed(model, load_calibration(calibration, model), "calibration")


def compress_to_files(source: str | os.PathLike, config: CompressConfig,
                      quiet: bool = False) -> Report:
    """The command line's ``compress``: every check first, the pipeline, then save, verify
    (the fidelity guard, backing off the plan under ``--max-error``), time and write every
    output together. Returns the report (already written when asked)."""
    paths = check_destinations(source, config)
    check_environment(config)
    progress = Progress(pipeline.stage_names(config, with_outputs=True), quiet)
    try:
        with PendingOutputs() as pending:
            written = pending.path_for(paths["model"])
            report = _compress_guarded(source, config, written, progress)
            if config.check.latency:
                _timed(report, "latency", progress, lambda: _latency(source, written, config,
                                                                     report))
            progress("write")
            if "report" in paths:
                report.write(pending.path_for(paths["report"]))
            if "plot" in paths:
                from onnx_udfc.report.plot import plot_report

                plot_report(report.to_dict(), pending.path_for(paths["plot"]))
            pending.commit()
    finally:
        progress.close()
    return report


def _compress_guarded(source: str | os.PathLike, config: CompressConfig, written: Path,
                      progress: Progress) -> Report:
    """Run the pipeline and save; with verification, measure fidelity and, under
    ``--max-error``, try gentler plans until one holds."""
    plans = backoff_plans(config) if config.check.max_error is not None else [config]
    feeds: dict[str, dict[str, np.ndarray] | None] = {"data": None}
    attempts: list[dict] = []
    input_range = None  # of the first model read (every plan reads the same), measured once
    for plan in plans:
        model = io.load_model(source)
        shapes = shape_lists(working_input_shapes(model, config.graph.input_shapes))
        if input_range is None:
            input_range = resolve_input_range(model, config.graph.input_range, shapes)
        if not attempts and config.check.verify and not config.check.data:
            feeds = dict(guard_feeds(model, shapes, input_range=input_range))
        if not attempts:
            check_data(model, config)
        try:
            model, report = pipeline.run(plan, model, progress, check=False, copy=False,
                                         input_range=input_range)
        except BudgetUnreachable as exc:  # less pruning can leave a size budget out of reach
            if not attempts:
                raise
            attempts.append(_attempt(plan, False, str(exc)))
            continue
        _save(model, source, plan, report, written, progress)
        del model
        if not config.check.verify:
            report.guard = {"verified": False}
            return report
        by_inputs: dict[str, list[dict]] = {}
        _timed(report, "verify", progress, lambda r=report, p=plan, s=shapes, f=feeds,
               b=by_inputs: _verify(source, written, p, r, s, f, b))
        holds, sentence, limits = _verdicts(by_inputs, config.check.max_error)
        attempts.append(_attempt(plan, holds, sentence))
        report.guard = {"inputs": "+".join(by_inputs), "limit": limits, "holds": holds,
                        "verdict": sentence, "max_error": config.check.max_error,
                        "attempts": attempts,
                        "fidelity": {k: v for k, v in by_inputs.items() if k != "synthetic"}}
        if holds or config.check.max_error is None:
            return report
    raise GuardError(f"no plan keeps the outputs within --max-error {config.check.max_error} "
                     f"(the gentlest tried: {attempts[-1]['verdict']}); nothing written")


def _verdicts(by_inputs: dict[str, list[dict]], max_error: float | None
              ) -> tuple[bool, str, dict[str, float]]:
    """The guard's verdict over every kind of comparison input: it holds when it holds on
    each (``--max-error`` E: every channel within E; else the default limits of each kind)."""
    limits = {kind: max_error if max_error is not None else default_limit(kind)
              for kind in by_inputs}
    results = [(kind, *verdict(fidelity, limits[kind], None if max_error is not None else kind))
               for kind, fidelity in by_inputs.items()]
    failed = [f"{sentence} on the {kind} inputs" for kind, holds, sentence in results
              if not holds]
    if failed:
        return False, "; ".join(failed), limits
    return True, "; ".join(f"{sentence} on the {kind} inputs" for kind, _, sentence in results), \
        limits


def _attempt(plan: CompressConfig, holds: bool, sentence: str) -> dict:
    return {"prune": plan.prune.ratio, "budget_flops": plan.prune.budget_flops,
            "bits": plan.quant.bits, "budget_size": plan.quant.budget_size, "holds": holds,
            "verdict": sentence}


class GuardError(UdfcError):
    """The fidelity guard found no plan that holds: exit status 1, like a failed check."""

    exit_code = 1


def backoff_plans(config: CompressConfig) -> list[CompressConfig]:
    """The asked plan, then less pruning (3/4, 1/2, 1/4, none), then 8-bit weights (also in
    place of a size budget's 4-bit layers)."""
    plans: list[CompressConfig] = []
    seen: set[tuple] = set()
    budget = config.prune.budget_flops
    for share in (1.0, 0.75, 0.5, 0.25, 0.0):
        ratio = round(config.prune.ratio * share, 6)
        flops = None if budget is None else round(1.0 - (1.0 - budget) * share, 6)
        if flops is not None and flops >= 1.0:
            flops, ratio = None, 0.0
        plans.append(_variant(config, ratio, flops, config.quant.bits, config.quant.budget_size))
    if config.quant.bits is not None and (config.quant.bits < 8
                                          or config.quant.budget_size is not None):
        plans.append(_variant(config, 0.0, None, 8, None))
    unique = []
    for plan in plans:
        key = (plan.prune.ratio, plan.prune.budget_flops, plan.quant.bits,
               plan.quant.budget_size)
        if key not in seen:
            seen.add(key)
            unique.append(plan)
    return unique


def _variant(config: CompressConfig, ratio: float, budget: float | None,
             bits: int | None, size_budget: float | None) -> CompressConfig:
    variant = copy.deepcopy(config)
    variant.prune.ratio, variant.prune.budget_flops, variant.quant.bits = ratio, budget, bits
    variant.quant.budget_size = size_budget
    return variant


def _timed(report: Report, name: str, progress: Progress, work) -> None:
    progress(name)
    start = time.perf_counter()
    work()
    report.timings[name] = time.perf_counter() - start


def _save(model: onnx.ModelProto, source: str | os.PathLike, config: CompressConfig,
          report: Report, path: Path, progress: Progress) -> None:
    progress("save")
    start = time.perf_counter()
    io.save_model(model, path, external_data=config.storage.external_data or None, check=True)
    report.size_after = io.disk_size(path)
    report.size_before = io.disk_size(source)
    report.timings["save"] = time.perf_counter() - start


def _verify(source: str | os.PathLike, written: Path, config: CompressConfig,
            report: Report, input_shapes: dict[str, list[int]],
            feeds: dict[str, dict[str, np.ndarray] | None],
            by_inputs: dict[str, list[dict]]) -> None:
    """Compare on each kind of input (``data``: ``--data``, read by :func:`verify`), with one
    pair of sessions; the first kind's fidelity and accuracy are the report's."""
    from onnx_udfc.report.verify import verify

    first, *others = feeds
    result = verify(source, written, data=config.check.data, provider=config.check.provider,
                    input_shapes=input_shapes or None, feed=feeds[first],
                    extra_feeds={kind: feeds[kind] for kind in others})
    report.fidelity = [f.to_dict() for f in result.fidelity]
    report.accuracy_before, report.accuracy_after = result.accuracy_before, \
        result.accuracy_after
    by_inputs[first] = report.fidelity
    by_inputs.update({kind: [f.to_dict() for f in fid] for kind, fid in result.extra.items()})


def _latency(source: str | os.PathLike, written: Path, config: CompressConfig,
             report: Report) -> None:
    from onnx_udfc.report.latency import compare_latency

    shapes = {k: v["shape"] for k, v in report.input_shapes.items()}
    report.latency = compare_latency(source, written, provider=config.check.provider,
                                     qdq=config.storage.format == "qdq", input_shapes=shapes)
    report.latency["flops_ratio"] = report.flops_after / report.flops_before \
        if report.flops_before else None
