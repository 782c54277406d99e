"""``tools/bench_speed.py``: every job imports cached bytecode, filled by an untimed run."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers import tool_module

PROBE = """
import sys
assert not sys.flags.dont_write_bytecode, "bytecode writing is off"
print(sys.pycache_prefix, file=open(sys.argv[1], "a"))
"""


def test_jobs_import_bytecode_cached_outside_the_tree_after_an_untimed_run(tmp_path: Path,
                                                                         monkeypatch) -> None:
    bench = tool_module("bench_speed")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as on the shared machine
    seen, cache = tmp_path / "seen.txt", tmp_path / "pycache"
    job = bench.Job("probe", [sys.executable, "-c", PROBE, str(seen)], {})
    bench.run_job(job, cache, warmup=True)
    assert job.failed is None and job.walls == [] and job.rss == []  # the warm-up is not timed
    bench.run_job(job, cache)
    assert job.failed is None and len(job.walls) == 1 and job.rss[0] > 0
    assert seen.read_text().split() == [str(cache)] * 2
    assert "fast-int8" in bench.PRESET_ARGS and bench.PRESET_ARGS["fast-int8"] == [
        "--preset", "fast"]
