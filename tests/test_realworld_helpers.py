"""The pure scoring helpers of ``tools/bench_realworld.py`` (``tools/realworld/metrics.py``):
box IoU, NMS and matching, CTC collapse, CER. No model is loaded."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "tools" / "realworld" / "metrics.py"
SPEC = importlib.util.spec_from_file_location("realworld_metrics", PATH)
metrics = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(metrics)


def test_iou_of_known_boxes():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert metrics.pairwise_iou(a, b)[0].tolist() == pytest.approx([50 / 150, 0.0, 1.0])
    # counting both end pixels: 6 x 11 overlap of two 11 x 11 boxes
    assert metrics.pairwise_iou(a, b[:1], pixel_offset=1.0)[0, 0] == pytest.approx(
        66 / (121 + 121 - 66))


def test_nms_keeps_the_best_of_each_cluster():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9]])
    scores = np.array([0.5, 0.9, 0.8, 0.3])
    assert metrics.nms(boxes, scores, 0.45) == [1, 2]
    assert sorted(metrics.nms(boxes, scores, 1.0)) == [0, 1, 2, 3]


def test_matching_uses_each_candidate_once():
    reference = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [100, 100, 110, 110]])
    candidate = np.array([[0, 0, 10, 10], [300, 300, 310, 310]])
    assert metrics.match_boxes(reference, candidate) == 1
    assert metrics.match_boxes(reference, reference) == 3
    assert metrics.match_boxes(reference, np.zeros((0, 4))) == 0
    assert metrics.match_boxes(reference, [[0, 0, 10, 4]]) == 0   # IoU 0.4


def test_ctc_collapse_merges_repeats_and_drops_blanks():
    assert metrics.ctc_collapse([0, 3, 3, 0, 3, 5, 5, 5, 0, 0]) == [3, 3, 5]
    assert metrics.ctc_collapse(np.array([7, 7, 7])) == [7]
    assert metrics.ctc_collapse([]) == []


def test_edit_distance_and_cer():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance("", "abc") == 3
    assert metrics.edit_distance("abc", "abc") == 0
    assert metrics.cer(["abcd", "xy"], ["abce", "xyz"]) == pytest.approx(2 / 7)


def test_rank_correlation():
    assert metrics.rank_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert math.isnan(metrics.rank_correlation([1, 2], [3, 4]))
    assert math.isnan(metrics.rank_correlation([1, 2, 3], [5, 5, 5]))


def test_db_boxes_keep_confident_regions():
    probability = np.zeros((40, 60))
    probability[5:15, 10:40] = 0.9   # a text line
    probability[25:35, 5:20] = 0.35  # above the mask threshold, below the box threshold
    probability[30, 50] = 0.9        # a speck smaller than min_side
    boxes = metrics.db_boxes(probability)
    # the 2x2 dilation grows the region by one pixel at its far sides
    assert boxes.tolist() == [[10.0, 5.0, 41.0, 16.0]]


def test_f1_of_recall_and_precision():
    assert metrics.f1(1.0, 0.5) == pytest.approx(2 / 3)
    assert metrics.f1(0.0, 0.0) == 0.0


def test_update_replaces_rows_of_the_same_model_and_config(tmp_path):
    from tests.helpers import tool_module

    bench = tool_module("bench_realworld")
    earlier = {"command": "python tools/bench_realworld.py", "minutes": 80.0, "rows": [
        {"model": "a", "config": "original", "drop": 0.0},
        {"model": "a", "config": "default", "drop": 0.5},
        {"model": "b", "config": "original", "drop": 0.0},
        {"model": "b", "config": "default", "drop": 0.7}]}
    path = tmp_path / "realworld.json"
    path.write_text(json.dumps(earlier))
    measured = [{"model": "a", "config": "default", "drop": 0.1},
                {"model": "a", "config": "budget", "drop": 0.2}]
    rows, command, minutes = bench.updated(path, measured, "python tools/x.py --update", 5.0)
    assert [(r["model"], r["config"], r["drop"]) for r in rows] == [
        ("a", "original", 0.0), ("a", "default", 0.1), ("a", "budget", 0.2),
        ("b", "original", 0.0), ("b", "default", 0.7)]
    assert command == "python tools/bench_realworld.py`, then `python tools/x.py --update"
    assert minutes == 85.0


def test_the_guard_is_judged_again_from_stored_reports(tmp_path):
    """``bench_guard_realworld``: the current verdict over each row's stored fidelity, set
    against the row's task drop; rows without a report or a drop are left out."""
    from tests.helpers import tool_module

    tool = tool_module("bench_guard_realworld")
    dense = {"output": "y", "channel_error": 2.8, "worst_channel": 0, "top1_agreement": None}
    reports = tmp_path / "reports.jsonl"
    reports.write_text("\n".join(json.dumps(r) for r in [
        {"model": "det", "config": "pruned", "exit": 0, "fidelity": {
            "synthetic": [dict(dense, channel_correlation=0.05)],
            "photos": [dict(dense, channel_error=0.4, channel_correlation=0.92)]}},
        {"model": "det", "config": "int8", "exit": 0, "fidelity": {
            "synthetic": [dict(dense, channel_error=0.04, channel_correlation=0.999)]}},
        {"model": "det", "config": "refused", "exit": 2},
    ]))
    realworld = tmp_path / "realworld.json"
    realworld.write_text(json.dumps({"rows": [
        {"model": "det", "config": "pruned", "drop": 0.93},
        {"model": "det", "config": "int8", "drop": 0.01},
        {"model": "det", "config": "refused", "drop": 0.5}]}))
    rows = tool.judged(reports, realworld)
    assert [(r["config"], r["flagged"]) for r in rows] == [("pruned", True), ("int8", False)]
    assert "correlation with the original fell to 0.05" in rows[0]["why"]
    text = tool.markdown(rows, "cmd")
    assert "1 of the 1 that lost more than 5 task points" in text
    assert "0 of the 1 within 2 points" in text
