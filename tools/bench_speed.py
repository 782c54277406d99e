"""Wall time and peak memory of ``onnx-udfc compress`` against the cost of reading and writing
the model, and against ONNX Runtime's own quantizer, measured side by side.

Every job is a whole process (interpreter start and imports included), run through
``/usr/bin/env`` and waited for with ``os.wait4``, whose resource usage gives that process's
peak resident memory. Jobs of one model run interleaved: each repeat runs every job once, in
a rotating order, so load from other processes on the shared machine spreads over all of
them. Per model the jobs are

* ``load+save``: ``onnx.load`` then ``onnx.save`` of the same file (the floor),
* ``ort quantize_dynamic``: ``onnxruntime.quantization.quantize_dynamic``, int8 per channel,
* ``fast``, ``balanced``, ``best``: ``onnx-udfc compress --preset P --prune 0.3`` (the default
  target, int8 QDQ, and verification, as a user runs it),
* ``int8``: ``onnx-udfc compress`` with every default (balanced, no pruning: int8 weights with
  udfc+ compensation), the job to compare with ``quantize_dynamic``,
* ``fast-int8``: ``onnx-udfc compress --preset fast`` (no pruning: int8 weights with udfc's
  closed-form compensation), the job of issue 17's "at most 1.5x ``quantize_dynamic``" (add
  ``--extra --no-verify`` to leave the verification out, as that goal does).

Bytecode: every job imports compiled bytecode, as an installed package does. A source
checkout run with ``PYTHONDONTWRITEBYTECODE`` set (this machine sets it), or without write
access to its ``__pycache__``, would recompile every ``onnx_udfc`` module in every run
(0.1-0.2 s of a 2 s job) while ``onnxruntime`` and ``onnx`` load the ``.pyc`` files pip
wrote, which measures the checkout rather than the tool. So each child runs without
``PYTHONDONTWRITEBYTECODE`` and with ``PYTHONPYCACHEPREFIX`` set to one temporary cache folder
under ``--work`` (every job's modules, third-party ones included, are compiled there, never
into the source tree), and every job runs once untimed before the timed rounds to fill it.

The compress jobs write a report; its ``verify`` timing gives the ``w/o verify`` column (the
pipeline and the save, in the same process run). ``--code NAME=DIR`` runs the compress jobs
once per source tree (``PYTHONPATH=DIR``), e.g. the code before and after a change, in the
same interleaved rounds.

Usage (models are generated into ``--models`` with ``tools/make_resnet50.py`` and
``tools/make_big_model.py`` when missing; never into the repository)::

    python tools/bench_speed.py --skip-big                      # ResNet-18/50/101, 3 repeats
    python tools/bench_speed.py --depths 50 --presets balanced int8 --code before=/tmp/old \\
        --code after=.                                          # before/after on ResNet-50
    python tools/bench_speed.py --depths --presets int8 fast --repeats 1   # 2 GiB model only
    python tools/bench_speed.py --md bench_out/speed.md --json bench_out/speed.json

The compress jobs' reports also give a table of seconds per pipeline stage (their
``timings``, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET_ARGS = {
    "fast": ["--preset", "fast", "--prune", "0.3"],
    "balanced": ["--preset", "balanced", "--prune", "0.3"],
    "best": ["--preset", "best", "--prune", "0.3"],
    "int8": [],
    "fast-int8": ["--preset", "fast"],
}
LOAD_SAVE = """
import sys, onnx
model = onnx.load(sys.argv[1])
big = sum(len(t.raw_data) for t in model.graph.initializer) > (1 << 31) - (1 << 26)
onnx.save(model, sys.argv[2], save_as_external_data=big)
"""
QUANTIZE_DYNAMIC = """
import sys, os
from onnxruntime.quantization import QuantType, quantize_dynamic
big = sum(os.path.getsize(p) for p in (sys.argv[1], sys.argv[1] + ".data")
          if os.path.exists(p)) > (1 << 31)
quantize_dynamic(sys.argv[1], sys.argv[2], per_channel=True, weight_type=QuantType.QInt8,
                 use_external_data_format=big)
"""


@dataclass
class Job:
    name: str
    command: list[str]
    env: dict[str, str]
    report: Path | None = None
    cwd: Path | None = None
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # bytes
    verify: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)  # the report's timings
    failed: str | None = None


def child_env(job_env: dict[str, str], pycache: Path) -> dict[str, str]:
    """The environment of a job: this one, bytecode written to and read from ``pycache``
    (see the module docstring), then the job's own variables."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(pycache), **job_env}


def run_job(job: Job, pycache: Path, warmup: bool = False) -> None:
    """One run of ``job``: wall time, peak RSS (``os.wait4``), the report's verify time;
    ``warmup``: a run that only fills the bytecode cache (nothing recorded but a failure)."""
    env = child_env(job.env, pycache)
    with tempfile.TemporaryFile() as err:  # a pipe could fill up and block the child
        start = time.perf_counter()
        # cwd: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH
        proc = subprocess.Popen(job.command, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                cwd=job.cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        last = err.read().decode(errors="replace").strip().splitlines()[-1:]
    if proc.returncode != 0:
        job.failed = f"exit {proc.returncode}: {' '.join(last)}"
        return
    if warmup:
        return
    job.walls.append(wall)
    job.rss.append(usage.ru_maxrss * 1024)
    if job.report is not None:
        timings = json.loads(job.report.read_text()).get("timings", {})
        job.verify.append(float(timings.get("verify", 0.0)))
        job.stages.append({k: float(v) for k, v in timings.items()})


def model_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def ensure_models(args) -> list[Path]:
    args.models.mkdir(parents=True, exist_ok=True)
    paths = []
    for depth in args.depths:
        path = args.models / f"resnet{depth}_bn.onnx"
        if not path.exists():
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_resnet50.py"),
                            "--depth", str(depth), "--out", str(args.models)], check=True)
        paths.append(path)
    if not args.skip_big:
        path = args.models / "big_mlp.onnx"
        if not path.exists():
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_big_model.py"),
                            "--out", str(path)], check=True)
        paths.append(path)
    return paths


def jobs_for(model: Path, args, work: Path) -> list[Job]:
    py = sys.executable
    jobs = [Job("load+save", [py, "-c", LOAD_SAVE, str(model), str(work / "ls.onnx")], {}),
            Job("ort quantize_dynamic", [py, "-c", QUANTIZE_DYNAMIC, str(model),
                                         str(work / "qd.onnx")], {})]
    for preset in args.presets:
        for name, code in args.code:
            report = work / f"{preset}-{name}.json"
            label = preset if len(args.code) == 1 else f"{preset} ({name})"
            cmd = [py, "-m", "onnx_udfc", "compress", str(model), "-o",
                   str(work / f"{preset}-{name}.onnx"), "--report", str(report), "-q",
                   *PRESET_ARGS[preset], *args.extra]
            jobs.append(Job(label, cmd, {"PYTHONPATH": str(Path(code).resolve())}, report,
                            work))
    return jobs


def bench_model(model: Path, args, pycache: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_speed-", dir=args.work) as tmp:
        jobs = jobs_for(model, args, Path(tmp))
        for job in jobs:  # untimed: compiles every job's modules into the bytecode cache
            run_job(job, pycache, warmup=True)
        for r in range(args.repeats):
            order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
            for job in order:
                if job.failed is None:
                    run_job(job, pycache)
                    print(f"  {model.stem} {job.name}: "
                          + (f"{job.walls[-1]:.2f} s, {job.rss[-1] / 2**20:.0f} MiB"
                             if job.failed is None else job.failed), flush=True)
    rows = {}
    for job in jobs:
        rows[job.name] = {"failed": job.failed, "walls": job.walls, "rss": job.rss,
                          "verify": job.verify, "command": shlex.join(
                              [Path(c).name if c == sys.executable else c
                               for c in job.command if c != LOAD_SAVE and c != QUANTIZE_DYNAMIC])}
        if job.walls:
            rows[job.name].update(
                wall=statistics.median(job.walls), peak_rss=statistics.median(job.rss),
                no_verify=statistics.median([w - v for w, v in zip(job.walls, job.verify,
                                                                   strict=True)])
                if job.verify else None,
                stages={s: statistics.median(t.get(s, 0.0) for t in job.stages)
                        for s in dict.fromkeys(k for t in job.stages for k in t)})
    return {"model": str(model), "size": model_size(model), "jobs": rows}


def markdown(results: list[dict], args, load: tuple[float, float]) -> str:
    lines = [
        "# Speed and memory of `onnx-udfc compress`",
        "",
        "Generated by `python tools/bench_speed.py " + " ".join(args.argv) + "`; "
        f"{args.repeats} interleaved repeats per job, medians, after one untimed run per job. "
        "Every job is a whole process (imports included, from cached bytecode as an installed "
        "package imports: `PYTHONPYCACHEPREFIX`, see the script's docstring); peak memory "
        "is that process's maximum resident set (`os.wait4`). `w/o verify` subtracts the "
        "report's `verify` time (the fidelity guard's ONNX Runtime comparison, run after the "
        "file is saved) from the same run. "
        "Ratios divide medians measured in the same run.",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"shared with other jobs: load average {load[0]:.2f} before, {load[1]:.2f} after.",
        ""]
    for res in results:
        size = res["size"]
        jobs = res["jobs"]
        floor = jobs["load+save"].get("wall")
        ort_q = jobs["ort quantize_dynamic"].get("wall")
        lines += [f"## {Path(res['model']).name} ({size / 2**20:.0f} MiB)", "",
                  "| job | wall | w/o verify | peak memory | x file size | x load+save "
                  "| x quantize_dynamic |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in jobs.items():
            if "wall" not in row:
                lines.append(f"| {name} | failed: {row['failed']} | | | | | |")
                continue
            nv = row["no_verify"]
            nv_text = f"{nv:.2f} s" if nv is not None else ""
            def ratio(base: float | None, row=row, nv=nv) -> str:
                if not base:
                    return ""
                text = f"{row['wall'] / base:.1f}x"
                return text + (f" ({nv / base:.1f}x)" if nv is not None else "")
            lines.append(f"| {name} | {row['wall']:.2f} s | {nv_text} | "
                         f"{row['peak_rss'] / 2**20:.0f} MiB | {row['peak_rss'] / size:.2f}x | "
                         f"{ratio(floor)} | {ratio(ort_q)} |")
        lines += ["", "Ratios in parentheses: without the verify step.", ""]
        lines += stage_table(jobs)
        lines += ["Commands (`MODEL` above, outputs in a temporary folder):", ""]
        lines += [f"- {name}: `{row['command']}`" for name, row in jobs.items()
                  if name not in ("load+save", "ort quantize_dynamic")]
        lines.append("")
    return "\n".join(lines)


def stage_table(jobs: dict[str, dict]) -> list[str]:
    """Median seconds per pipeline stage (the reports' ``timings``) of the compress jobs."""
    timed = {name: row["stages"] for name, row in jobs.items() if row.get("stages")}
    stages = list(dict.fromkeys(s for t in timed.values() for s in t))
    if not timed:
        return []
    lines = ["Seconds per stage (medians of the reports' `timings`; the rest of the wall time "
             "is interpreter start, imports and the CLI):", "",
             "| job | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    lines += [f"| {name} | " + " | ".join(f"{t.get(s, 0.0):.2f}" for s in stages) + " |"
              for name, t in timed.items()]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + next(
        para for para in __doc__.split("\n\n") if para.startswith("Bytecode:")),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "bench_out" / "models",
                   help="where the benchmark models are read, or generated when missing")
    p.add_argument("--depths", type=int, nargs="*", default=[18, 50, 101],
                   help="ResNet depths (none: only the 2 GiB model)")
    p.add_argument("--skip-big", action="store_true",
                   help="leave out the 2 GiB external-data MLP (slow)")
    p.add_argument("--presets", nargs="+", default=list(PRESET_ARGS), choices=list(PRESET_ARGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                   help="run the compress jobs with PYTHONPATH=DIR (repeatable; default: "
                   "this checkout)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more compress options, after everything else")
    p.add_argument("--work", default=None, help="folder for the temporary outputs and the "
                   "bytecode cache every job imports from (see above; default: the system's "
                   "temporary folder)")
    p.add_argument("--md", type=Path, help="write the markdown tables here")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.code = [tuple(c.split("=", 1)) for c in args.code] or [("this", str(ROOT))]
    models = ensure_models(args)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_speed-pycache-", dir=args.work) as pycache:
        results = [bench_model(m, args, Path(pycache)) for m in models]
    text = markdown(results, args, (load_before, os.getloadavg()[0]))
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
