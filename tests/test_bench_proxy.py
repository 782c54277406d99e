"""``tools/bench_proxy.py --merge``: earlier runs' points join the data-free tables."""

from __future__ import annotations

from tests.helpers import tool_module


def _run(argv: list[str], sources: list[str], points: list[tuple[str, float, float]]) -> dict:
    return {"config": {"sources": list(sources), "ratios": [0.3, 0.5], "bits": 4,
                       "seeds": [0, 1], "calibration": 256, "argv": argv},
            "models": [{"file": "m.onnx", "batchnorm": "kept", "original": 92.0,
                        "points": [{"source": s, "ratio": r, "seed": 0, "top1": t,
                                    "compress_s": 1.0} for s, r, t in points]}]}


def test_merged_runs_add_their_columns_and_commands():
    bench = tool_module("bench_proxy")
    now = _run(["--sources", "sampled"], ["sampled"], [("sampled", 0.3, 80.0),
                                                        ("sampled", 0.5, 60.0)])
    earlier = _run(["--sources", "auto"], ["auto"], [("auto", 0.3, 85.0), ("auto", 0.5, 70.0),
                                                     ("auto", 0.4, 1.0), ("sampled", 0.3, 1.0)])
    other = _run(["--model", "x"], ["auto"], [("auto", 0.3, 5.0)])
    other["models"][0]["file"] = "other.onnx"  # not in this run: left out
    result = bench.merged(now, [earlier, other])
    assert result["config"]["sources"] == ["sampled", "auto"]
    # neither the 0.4 point (not a ratio of this run) nor an earlier 'sampled' (measured now)
    assert len(result["models"][0]["points"]) == 4
    text = bench.markdown(result)
    assert "| m.onnx | kept | 30% | 92.00 | 80.00 | 85.00 |" in text
    assert "with the points of `python tools/bench_proxy.py --sources auto`" in text
