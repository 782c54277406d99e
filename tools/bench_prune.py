"""Benchmark the ``onnx-udfc compress`` CLI the way a user runs it (wall time + peak RSS).

For every model file, the command

    onnx-udfc compress MODEL -o OUT --target fake --method prune --prune 0.5 --report REPORT.json

is run ``--repeat`` times (default 5), each time as a fresh subprocess (``subprocess.Popen`` +
``os.wait4``), recording the wall-clock time (``time.perf_counter``) and that subprocess's
own peak resident set size (``ru_maxrss`` from ``wait4``, KiB on Linux; it covers the process
and any children it reaped, and is *not* the cumulative ``RUSAGE_CHILDREN`` of this script).
``--target fake --method prune --prune 0.5`` can be replaced with ``--args "..."``. Per model
it reports file size, median / min / max wall seconds, median peak RSS and RSS / file-size
ratio, params and FLOPs before/after (``params_before``, ``params_after``, ``flops_before``,
``flops_after`` from the report JSON), the output file size and the report's per-stage
``timings`` (median over runs).
In the same run it measures the peak RSS of ``python -c pass``, ``python -c "import onnx,
onnxruntime, numpy"`` and ``python -c "import onnx_udfc.cli"`` (interpreter + import overhead).

Caveat (Linux): a child's ``ru_maxrss`` can never be lower than the peak RSS of the process
that spawned it (the kernel carries the parent's high-water mark over ``exec``), so this
script imports only the standard library and reports its own peak RSS as ``rss_floor_mib``.

Prerequisites (from the repository root)::

    pip install -e .                      # puts onnx-udfc on PATH
    python tools/make_resnet50.py         # writes bench_out/resnet50_{bn,folded}.onnx

Usage::

    python tools/bench_prune.py                                   # both ResNet-50 files, 5 runs
    python tools/bench_prune.py --json bench_out/bench.json       # also write JSON
    python tools/bench_prune.py -n 3 --args "--target fake --prune 0.3 --bits 6 --method udfc"
    python tools/bench_prune.py bench_out/resnet50_folded.onnx -n 1 --keep --workdir /tmp/b
    # timing/RSS machinery only, against a stand-in that loads and re-saves the model with onnx:
    python tools/bench_prune.py --standin -n 3
    # any command; {python} {model} {out} {report} {args} are substituted in each token:
    python tools/bench_prune.py --cmd "{python} -c 'import onnx,sys;onnx.load(sys.argv[1])' {model}"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("bench_out/resnet50_bn.onnx", "bench_out/resnet50_folded.onnx")
# explicit settings, not the preset defaults: plain 50 % pruning, float weights
DEFAULT_ARGS = "--target fake --method prune --prune 0.5"
REPORT_KEYS = ("params_before", "params_after", "flops_before", "flops_after")
MIB = 2**20

# Stand-in for the CLI: a lower bound for any tool that must load + save the model.
STANDIN_CODE = """
import json, sys, time
t0 = time.perf_counter()
import onnx
from onnx import numpy_helper
t1 = time.perf_counter()
model_path, out_path, report_path = sys.argv[1:4]
m = onnx.load(model_path)
t2 = time.perf_counter()
n = sum(numpy_helper.to_array(t).size for t in m.graph.initializer)
t3 = time.perf_counter()
onnx.save(m, out_path)
t4 = time.perf_counter()
report = {"params_before": int(n), "params_after": int(n),
          "timings": {"import": t1 - t0, "load": t2 - t1, "to_numpy": t3 - t2, "save": t4 - t3}}
with open(report_path, "w") as f:
    json.dump(report, f)
"""


@dataclass
class Run:
    """One subprocess execution."""

    wall_s: float
    maxrss_kib: int
    returncode: int
    stderr_tail: str = ""


@dataclass
class ModelResult:
    model: str
    file_bytes: int
    command: list[str]
    runs: list[Run] = field(default_factory=list)
    ok: bool = True
    error: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    out_bytes: int | None = None
    stage_timings_median_s: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def self_peak_rss_kib() -> int:
    """Peak RSS (VmHWM) of this process in KiB; the floor for every child's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_measured(cmd: list[str], timeout: float, cwd: str | None = None) -> Run:
    """Run ``cmd`` as a fresh subprocess; return wall time and its own peak RSS.

    stdout is discarded, stderr goes to a temporary file (no pipes, so nothing can block
    while we sit in ``wait4``). On timeout the process group is killed.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd, start_new_session=True
        )
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, _kill)
        timer.start()
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        err.seek(0)
        tail = err.read()[-4000:].decode("utf-8", "replace")
    if timed_out.is_set():
        tail = f"[killed after {timeout:.0f} s timeout]\n{tail}"
    # ru_maxrss: KiB on Linux, bytes on macOS.
    maxrss = rusage.ru_maxrss // 1024 if sys.platform == "darwin" else rusage.ru_maxrss
    return Run(wall_s=wall, maxrss_kib=int(maxrss), returncode=proc.returncode, stderr_tail=tail)


def find_key(obj: Any, key: str) -> Any:
    """First value stored under ``key`` in a nested dict/list (breadth-first)."""
    queue = [obj]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            if key in cur:
                return cur[key]
            queue.extend(cur.values())
        elif isinstance(cur, list):
            queue.extend(cur)
    return None


def interpreter_of(exe: str) -> str | None:
    """Interpreter from a console-script shebang (``#!/path/python``), if any."""
    try:
        with open(exe, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode("utf-8", "replace").split()
    if not parts:
        return None
    if Path(parts[0]).name == "env" and len(parts) > 1:
        return shutil.which(parts[1])
    return parts[0] if "python" in Path(parts[0]).name else None


def resolve_cli(exe: str | None, python: str) -> list[str]:
    """argv prefix for the CLI: the console script if found, else ``python -c`` on main()."""
    if exe:
        return shlex.split(exe)
    found = shutil.which("onnx-udfc")
    if found:
        return [found]
    print(
        "note: onnx-udfc not on PATH (run `pip install -e .`); "
        "falling back to python -c 'from onnx_udfc.cli import main'",
        file=sys.stderr,
    )
    return [python, "-c", "import sys; from onnx_udfc.cli import main; sys.exit(main())"]


def build_command(
    args: argparse.Namespace, cli: list[str], python: str, model: Path, out: Path, report: Path
) -> list[str]:
    if args.cmd:
        subs = {
            "python": python,
            "model": str(model),
            "out": str(out),
            "report": str(report),
            "args": args.args,
        }
        toks = shlex.split(args.cmd)
        for key, val in subs.items():  # plain replace: tokens may contain other braces
            toks = [t.replace("{" + key + "}", val) for t in toks]
        return toks
    return [
        *cli,
        "compress",
        str(model),
        "-o",
        str(out),
        *shlex.split(args.args),
        "--report",
        str(report),
    ]


def mib(kib_or_bytes: float, *, kib: bool = False) -> float:
    return kib_or_bytes / 1024 if kib else kib_or_bytes / MIB


def bench_model(
    args: argparse.Namespace, cli: list[str], python: str, model: Path, work: Path
) -> ModelResult:
    stem = model.name.removesuffix(".onnx")
    out = work / f"{stem}.compressed.onnx"
    report = work / f"{stem}.report.json"
    cmd = build_command(args, cli, python, model, out, report)
    res = ModelResult(model=str(model), file_bytes=model.stat().st_size, command=cmd)
    stage_runs: dict[str, list[float]] = {}
    total = args.warmup + args.repeat
    for i in range(total):
        for p in (out, report):
            if p.exists():
                p.unlink()
        # Drop any external-data side files from a previous run.
        for p in work.glob(f"{stem}.compressed.onnx*"):
            p.unlink()
        run = run_measured(cmd, args.timeout)
        warm = i < args.warmup
        tag = "warmup" if warm else f"run {i - args.warmup + 1}/{args.repeat}"
        print(
            f"  {model.name} {tag}: {run.wall_s:7.2f} s, "
            f"peak RSS {mib(run.maxrss_kib, kib=True):8.1f} MiB, rc={run.returncode}",
            file=sys.stderr,
        )
        if run.returncode != 0:
            res.ok = False
            res.error = f"exit code {run.returncode}:\n{run.stderr_tail}"
            res.runs.append(run)
            print(f"  FAILED: {shlex.join(cmd)}\n{run.stderr_tail}", file=sys.stderr)
            break
        if warm:
            continue
        res.runs.append(run)
        if report.exists():
            try:
                res.report = json.loads(report.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                res.report = {"_error": f"unreadable report: {exc}"}
            timings = find_key(res.report, "timings")
            if isinstance(timings, dict):
                for k, v in timings.items():
                    if isinstance(v, int | float):
                        stage_runs.setdefault(str(k), []).append(float(v))
        if out.exists():
            # Count external data written next to the output too.
            res.out_bytes = sum(p.stat().st_size for p in work.glob(f"{stem}.compressed.onnx*"))
    res.stage_timings_median_s = {k: statistics.median(v) for k, v in stage_runs.items()}
    res.summary = summarize(res)
    return res


def summarize(res: ModelResult) -> dict[str, Any]:
    good = [r for r in res.runs if r.returncode == 0]
    s: dict[str, Any] = {"file_mib": mib(res.file_bytes), "n_ok": len(good)}
    if good:
        walls = [r.wall_s for r in good]
        rss = statistics.median(r.maxrss_kib for r in good)
        s.update(
            wall_median_s=statistics.median(walls),
            wall_min_s=min(walls),
            wall_max_s=max(walls),
            rss_median_mib=mib(rss, kib=True),
            rss_max_mib=mib(max(r.maxrss_kib for r in good), kib=True),
            rss_over_file=mib(rss, kib=True) / mib(res.file_bytes),
        )
    for k in REPORT_KEYS:
        s[k] = find_key(res.report, k)
    s["out_mib"] = mib(res.out_bytes) if res.out_bytes is not None else None
    return s


def bench_baselines(python: str, repeat: int, timeout: float) -> dict[str, dict[str, Any]]:
    snippets = {
        "python -c pass": "pass",
        "import onnx, onnxruntime, numpy": "import onnx, onnxruntime, numpy",
        "import onnx_udfc.cli": "import onnx_udfc.cli",
    }
    out: dict[str, dict[str, Any]] = {}
    for label, code in snippets.items():
        runs = [run_measured([python, "-c", code], timeout) for _ in range(repeat)]
        ok = [r for r in runs if r.returncode == 0]
        entry: dict[str, Any] = {"command": [python, "-c", code], "n_ok": len(ok)}
        if ok:
            entry["rss_median_mib"] = mib(statistics.median(r.maxrss_kib for r in ok), kib=True)
            entry["wall_median_s"] = statistics.median(r.wall_s for r in ok)
        else:
            entry["error"] = runs[-1].stderr_tail.strip().splitlines()[-1:] or ["failed"]
        out[label] = entry
        print(f"  baseline {label}: {entry}", file=sys.stderr)
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fmt_pair(a: Any, b: Any) -> str:
    if a is None and b is None:
        return "-"
    text = f"{fmt(a)} → {fmt(b)}"
    if isinstance(a, int | float) and isinstance(b, int | float) and a:
        text += f" ({100.0 * b / a:.1f}%)"
    return text


def markdown(results: list[ModelResult], baselines: dict[str, dict[str, Any]], meta: dict) -> str:
    lines = [
        f"Command: `{meta['command_template']}`  ",
        f"Runs per model: {meta['repeat']} (+{meta['warmup']} warmup), "
        f"host: {meta['host']}, RSS floor (this script's peak): {meta['rss_floor_mib']:.1f} MiB",
        "",
        "| model | file MiB | ok runs | wall median s | wall min s | wall max s "
        "| peak RSS median MiB | RSS / file | params before → after "
        "| FLOPs before → after | out MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        s = r.summary
        lines.append(
            f"| {Path(r.model).name} | {s['file_mib']:.1f} | {s['n_ok']}"
            f"{'' if r.ok else ' (FAILED)'} | {fmt(s.get('wall_median_s'))} "
            f"| {fmt(s.get('wall_min_s'))} | {fmt(s.get('wall_max_s'))} "
            f"| {fmt(s.get('rss_median_mib'), '.1f')} | {fmt(s.get('rss_over_file'))} "
            f"| {fmt_pair(s['params_before'], s['params_after'])} "
            f"| {fmt_pair(s['flops_before'], s['flops_after'])} | {fmt(s['out_mib'], '.1f')} |"
        )
    stages: list[str] = []
    for r in results:
        stages += [k for k in r.stage_timings_median_s if k not in stages]
    if stages:
        lines += [
            "",
            "Per-stage timings from the report (median s over runs):",
            "",
            "| model | " + " | ".join(stages) + " |",
            "|---|" + "---:|" * len(stages),
        ]
        for r in results:
            vals = [fmt(r.stage_timings_median_s.get(k), ".3f") for k in stages]
            lines.append(f"| {Path(r.model).name} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "Baselines (fresh interpreter, same Python):",
        "",
        "| command | peak RSS median MiB | wall median s |",
        "|---|---:|---:|",
    ]
    for label, b in baselines.items():
        rss = fmt(b.get("rss_median_mib"), ".1f") if b["n_ok"] else f"failed: {b['error'][0]}"
        lines.append(f"| `{label}` | {rss} | {fmt(b.get('wall_median_s'))} |")
    for r in results:
        if not r.ok:
            lines += ["", f"**{Path(r.model).name} failed**: `{shlex.join(r.command)}`", "```"]
            lines += [r.error.rstrip()[-2000:], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark `onnx-udfc compress`: wall time and per-subprocess peak RSS.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("models", nargs="*", type=Path, default=[Path(p) for p in DEFAULT_MODELS])
    ap.add_argument("-n", "--repeat", type=int, default=5, help="timed runs per model")
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs per model first")
    ap.add_argument(
        "--args", default=DEFAULT_ARGS, help=f"compress options (default: {DEFAULT_ARGS!r})"
    )
    ap.add_argument("--exe", help="CLI command (default: onnx-udfc from PATH)")
    ap.add_argument(
        "--python", help="interpreter for baselines (default: the CLI's shebang, else this one)"
    )
    ap.add_argument(
        "--cmd",
        help="full command template instead of the CLI; tokens may use "
        "{python} {model} {out} {report} {args}",
    )
    ap.add_argument(
        "--standin",
        action="store_true",
        help="use a built-in stand-in (onnx.load + onnx.save + fake report) instead of the CLI",
    )
    ap.add_argument("--workdir", type=Path, help="where outputs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the last run")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--baseline-repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write full results as JSON here")
    args = ap.parse_args(argv)

    if args.standin:
        if args.cmd:
            ap.error("--standin and --cmd are mutually exclusive")
        args.cmd = f"{{python}} -c {shlex.quote(STANDIN_CODE)} {{model}} {{out}} {{report}}"
    missing = [str(m) for m in args.models if not m.is_file()]
    if missing:
        ap.error(f"model file(s) not found: {missing} (run tools/make_resnet50.py first?)")

    cli = [] if args.cmd else resolve_cli(args.exe, args.python or sys.executable)
    python = args.python or (interpreter_of(cli[0]) if cli else None) or sys.executable

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work, is_tmp = args.workdir, False
    else:
        work, is_tmp = Path(tempfile.mkdtemp(prefix="bench_prune_")), True

    template = "built-in stand-in: onnx.load + onnx.save + fake report" if args.standin else None
    template = (
        template
        or args.cmd
        or shlex.join([*cli, "compress", "MODEL", "-o", "OUT"])
        + (f" {args.args} --report REPORT.json")
    )
    meta: dict[str, Any] = {
        "command_template": template,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "python": python,
        "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }
    try:
        print("baselines:", file=sys.stderr)
        baselines = bench_baselines(python, args.baseline_repeat, args.timeout)
        results: list[ModelResult] = []
        for model in args.models:
            print(f"{model}:", file=sys.stderr)
            results.append(bench_model(args, cli, python, model, work))
    finally:
        if is_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"outputs kept in {work}", file=sys.stderr)
    meta["rss_floor_mib"] = mib(self_peak_rss_kib(), kib=True)

    print(markdown(results, baselines, meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "baselines": baselines, "models": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
