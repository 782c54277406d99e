"""How many pruned layers ``udfc+`` compensates, per model (issue 14: at least 90 % on every
third-party model and every zoo model), and why the others are not.

    python tools/bench_coverage.py --extra DIR/common.onnx \
        --md docs/results/coverage_udfc_plus.md

Each model is compressed with ``api.compress(path, prune=R, method="udfc+", target="fake")``
(default R 0.2); gzipped zoo fixtures are unpacked to a temporary folder first.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_udfc import api  # noqa: E402
from onnx_udfc.core.errors import UdfcError  # noqa: E402

TARGET = 0.9


def measure(path: Path, ratio: float) -> dict:
    start = time.perf_counter()
    try:
        _, report = api.compress(str(path), prune=ratio, method="udfc+", target="fake")
    except UdfcError as exc:
        return {"model": path.name, "error": str(exc)}
    comps = [x["compensation"] for x in report.layers if x.get("compensation")]
    reasons = collections.Counter(_generic(c.get("reason", "")) for c in comps
                                  if not c["compensated"])
    return {"model": path.name, "pruned": len(comps),
            "compensated": sum(1 for c in comps if c["compensated"]),
            "reasons": dict(reasons), "seconds": time.perf_counter() - start}


def _generic(reason: str) -> str:
    """The reason without node names, so that rows group."""
    import re

    return re.sub(r"'[^']*'", "'...'", reason)


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# udfc+ compensation coverage", "", f"Command: `{command}`.", "",
             "| model | compensated / pruned layers | share | >= 90 % | not compensated, why |",
             "|---|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | refused: {r['error']} | | | |")
            continue
        share = r["compensated"] / r["pruned"] if r["pruned"] else 1.0
        why = "; ".join(f"{n}x {k}" for k, n in r["reasons"].items())
        lines.append(f"| {r['model']} | {r['compensated']} / {r['pruned']} | {100 * share:.0f} % "
                     f"| {'yes' if share >= TARGET else '**no**'} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--zoo", type=Path, default=ROOT / "tests" / "fixtures" / "zoo")
    parser.add_argument("--extra", type=Path, nargs="*", default=[])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted((args.shared / "models" / "thirdparty").glob("*.onnx")) + list(args.extra)
        for gz in sorted(args.zoo.glob("*.onnx.gz")):
            plain = Path(tmp) / gz.name[:-3]
            with gzip.open(gz) as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            paths.append(plain)
        for path in paths:
            rows.append(measure(path, args.ratio))
            print(rows[-1], flush=True)
    if args.md:
        args.md.write_text(markdown(rows, "python tools/bench_coverage.py " + " ".join(
            sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
