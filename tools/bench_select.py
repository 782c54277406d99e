"""Which data-free comparison picks the fit that wins on the task? (``--select-method``)

For each model and pruning ratio, compresses with ``udfc``, the one-shot ``udfc+`` and the
sequential ``udfc+`` (``--select-method`` off), scores each on its task, and measures each
one's mean per-channel output error on the selection's data-free inputs (pink noise and
photographs, :class:`onnx_udfc.methods.select.Judge`). Then, for five ways of combining the
two errors, which of the two ``udfc+`` fits each picks and how many task points that loses
against the better one; the same with ``udfc`` as a third candidate; and the ``best`` preset
itself (selection on), to check that it keeps what the table says.

Models: the four third-party models of ``tools/bench_realworld.py`` (int8, 10 and 20 % and
``--budget-flops 0.85``; task metric minus 100 x the drop of that benchmark) and the shared
CIFAR ResNets (int4, 30 and 50 %; top-1 on the shared test images).

    nice python tools/bench_select.py                       # everything, about 40 min
    python tools/bench_select.py --models resnet20_cifar10_folded --ratios 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_udfc import (  # noqa: E402
    DEFAULT_SHARED,
    evaluate,
    input_name,
    load_data,
    load_manifest,
    manifest_entry,
)
from realworld.tasks import TASKS  # noqa: E402

from onnx_udfc import api  # noqa: E402
from onnx_udfc.config import CompressConfig  # noqa: E402
from onnx_udfc.core.input_shapes import shape_lists, working_input_shapes  # noqa: E402
from onnx_udfc.methods.select import Judge  # noqa: E402
from onnx_udfc.moments.input_range import resolve_input_range  # noqa: E402

CIFAR = ("resnet56_cifar10_nm_bn", "resnet20_cifar10_folded", "resnet56_cifar10_nm_folded")
THIRD_PARTY = tuple(TASKS)
CANDIDATES = {"udfc": {"method": "udfc"}, "udfc+": {"method": "udfc+"},
              "udfc+ --sequential": {"method": "udfc+", "sequential": True}}
USED = ("udfc+", "udfc+ --sequential")  # the candidates of --select-method
COMBINATIONS = {
    "pink noise": lambda e: e["synthetic"],
    "photographs": lambda e: e.get("photos", e["synthetic"]),
    "sum": lambda e: sum(e.values()),
    "geometric mean (used)": lambda e: math.exp(sum(math.log(max(v, 1e-12))
                                                    for v in e.values()) / len(e)),
    "max": lambda e: max(e.values()),
}
COUNTS = {"orientation": 240, "detector": 30, "ocr-detector": 40, "recogniser": 200}


class CifarTask:
    """Top-1 on the shared CIFAR-10 images, as a task of the same shape as realworld's."""

    def __init__(self, name: str, shared: Path) -> None:
        self.key = name
        self.model = shared / "models" / f"{name}.onnx"
        entry = manifest_entry(load_manifest(shared), f"{name}.onnx")
        self.x, self.labels, _ = load_data(shared, entry)
        self.compress_args: tuple[str, ...] = ()

    def metric(self, path: Path) -> float:
        model = onnx.load(str(path))
        return evaluate(model, input_name(model), self.x, self.labels)[0]


def judge_for(path: Path, shapes: dict[str, list[int]]) -> Judge:
    original = onnx.load(str(path))
    working = shape_lists(working_input_shapes(original, shapes))
    input_range = resolve_input_range(original, "auto", working)
    return Judge(original, working, input_range, CompressConfig().method.seed)


def given_shapes(args: tuple[str, ...]) -> dict[str, list[int]]:
    if not args:
        return {}
    name, dims = args[1].split(":")
    return {name: [int(d) for d in dims.split("x")]}


def pruning(case: str) -> dict[str, float]:
    """``0.3`` is ``--prune 0.3``; ``flops0.85`` is ``--budget-flops 0.85``."""
    if case.startswith("flops"):
        return {"budget_flops": float(case[len("flops"):])}
    return {"prune": float(case)}


def run_model(key: str, ratios: list[str], shared: Path, cache: Path) -> list[dict[str, Any]]:
    if key in CIFAR:
        task: Any = CifarTask(key, shared)
        target = "int4"

        def metric(path: Path) -> float:
            return task.metric(path)
    else:
        task = TASKS[key]()
        task.prepare(cache, COUNTS[key], 0)
        reference = task.predict(task.model)
        reference_scores = task.score(reference, reference)
        target = "int8"

        def metric(path: Path) -> float:
            return -100.0 * task.drop(task.score(task.predict(path), reference),
                                      reference_scores)
    shapes = given_shapes(task.compress_args)
    judge = judge_for(task.model, shapes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="select-") as tmp:
        out = Path(tmp) / "m.onnx"
        for ratio in ratios:
            row: dict[str, Any] = {"model": key, "ratio": ratio, "target": target,
                                   "candidates": {}}
            for label, options in CANDIDATES.items():
                start = time.perf_counter()
                model, _ = api.compress(str(task.model), target=target, **pruning(ratio),
                                        input_shapes=shapes, select=False, **options)
                onnx.save(model, str(out))
                row["candidates"][label] = {"metric": metric(out),
                                            "errors": judge.errors(model),
                                            "seconds": time.perf_counter() - start}
            model, report = api.compress(str(task.model), preset="best", target=target,
                                         **pruning(ratio), input_shapes=shapes)
            onnx.save(model, str(out))
            row["best_preset"] = {"metric": metric(out), "kept": report.selection["chosen"],
                                  "errors": report.selection["candidates"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _pick(cands: dict[str, dict[str, Any]], names: tuple[str, ...], combine) -> str:
    pick = min(names, key=lambda k: combine(cands[k]["errors"]))
    winner = max(cands[k]["metric"] for k in names)
    loss = winner - cands[pick]["metric"]
    return pick + (f" (-{loss:.1f})" if loss > 0.05 else ""), loss


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["# Choosing the fit data-free (`--select-method`)", "",
             f"Generated by `{command}` (raw rows in [select.json](select.json)). Task metric: "
             "top-1 % on the shared CIFAR-10 images (int4), or minus 100 x the drop of "
             "`tools/bench_realworld.py` for the third-party models (int8). Each way of "
             "combining a candidate's mean per-channel output errors on pink noise and on the "
             "built-in photographs picks, of the two `udfc+` fits (one-shot, sequential), the "
             "one with the least; the cell is its pick and the task points it loses against "
             "the better fit. The next column lets `udfc` compete too (against the best of "
             "all three); the last is the `best` preset itself (selection on, its own "
             "comparison inputs).", "",
             "| model | ratio | udfc / udfc+ / sequential | " + " | ".join(COMBINATIONS)
             + " | geometric mean, udfc too | best preset kept |",
             "|---|---|---|" + "---|" * len(COMBINATIONS) + "---|---|"]
    lost = dict.fromkeys([*COMBINATIONS, "with udfc"], 0.0)
    for row in rows:
        cands = row["candidates"]
        cells = []
        for name, combine in COMBINATIONS.items():
            cell, loss = _pick(cands, USED, combine)
            lost[name] += loss
            cells.append(cell)
        cell, loss = _pick(cands, tuple(cands), COMBINATIONS["geometric mean (used)"])
        lost["with udfc"] += loss
        cells.append(cell)
        best = row["best_preset"]
        metrics = " / ".join(f"{c['metric']:.1f}" for c in cands.values())
        lines.append(f"| {row['model']} | {row['ratio']} | {metrics} | " + " | ".join(cells)
                     + f" | {best['kept']}: {best['metric']:.1f} |")
    lines.append("| points lost in all | | | " + " | ".join(f"{v:.1f}" for v in lost.values())
                 + " | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(THIRD_PARTY + CIFAR))
    parser.add_argument("--ratios", default=None,
                        help="comma-separated --prune ratios or flopsB for --budget-flops B "
                        "(default 0.1,0.2,flops0.85 third-party, 0.3,0.5 CIFAR)")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "cache")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "results" / "select.md")
    parser.add_argument("--append", type=Path, default=None,
                        help="rows of an earlier run (its .json, or its printed JSON lines) to "
                        "put first in the table")
    args = parser.parse_args(argv)
    rows = []
    if args.append is not None:
        text = args.append.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.startswith("{")]
    for key in args.models.split(","):
        ratios = args.ratios.split(",") if args.ratios else (
            ["0.3", "0.5"] if key in CIFAR else ["0.1", "0.2", "flops0.85"])
        rows += run_model(key, ratios, args.shared, args.cache)
    command = "python tools/bench_select.py" + (f" {' '.join(argv or sys.argv[1:])}"
                                                if (argv or sys.argv[1:]) else "")
    args.md.write_text(markdown(rows, command))
    args.md.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
