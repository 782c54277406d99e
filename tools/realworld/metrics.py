"""Pure scoring helpers of the real-world benchmark: box IoU, NMS and matching, CTC collapse,
character error rate, rank correlation. numpy and scipy only, no model needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr


def pairwise_iou(a: np.ndarray, b: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (x1, y1, x2, y2):
    [N, M]. ``pixel_offset=1`` counts both end pixels, as ddddocr's (YOLOX's) NMS does."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(width + pixel_offset, 0, None) * np.clip(height + pixel_offset, 0, None)

    def area(x: np.ndarray) -> np.ndarray:
        return (x[:, 2] - x[:, 0] + pixel_offset) * (x[:, 3] - x[:, 1] + pixel_offset)

    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy single-class NMS, highest score first; drops a box whose IoU with a kept one is
    above ``iou_threshold`` (ddddocr's rule, end pixels counted). Indices of the kept boxes."""
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    iou = pairwise_iou(boxes, boxes, pixel_offset=1.0)
    keep: list[int] = []
    while order:
        best, rest = order[0], np.array(order[1:], dtype=int)
        keep.append(int(best))
        order = [int(i) for i in rest[iou[best, rest] <= iou_threshold]]
    return keep


def match_boxes(reference: np.ndarray, candidate: np.ndarray,
                iou_threshold: float = 0.5) -> int:
    """How many ``reference`` boxes find a ``candidate`` box with IoU >= ``iou_threshold``,
    each candidate used once (greedy, highest IoU pair first)."""
    iou = pairwise_iou(reference, candidate)
    matched = 0
    while iou.size and iou.max() >= iou_threshold:
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        iou[i, :] = -1.0
        iou[:, j] = -1.0
        matched += 1
    return matched


def ctc_collapse(ids: Sequence[int], blank: int = 0) -> list[int]:
    """Greedy CTC decoding of per-step class ids: merge repeats, then drop the blank."""
    out, previous = [], None
    for i in ids:
        i = int(i)
        if i != previous and i != blank:
            out.append(i)
        previous = i
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def cer(predictions: Sequence[str], truths: Sequence[str]) -> float:
    """Character error rate over a set: total edit distance / total reference length."""
    edits = sum(edit_distance(p, t) for p, t in zip(predictions, truths, strict=True))
    return edits / max(1, sum(len(t) for t in truths))


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of paired values; NaN with fewer than 3 pairs or a constant side."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def f1(recall: float, precision: float) -> float:
    """The harmonic mean of recall and precision (0 when both are 0)."""
    return 2 * recall * precision / max(1e-12, recall + precision)


def db_boxes(probability: np.ndarray, mask_threshold: float = 0.3,
             box_threshold: float = 0.5, min_side: int = 3) -> np.ndarray:
    """DBNet's boxes of a ``[H, W]`` text probability map, as PaddleOCR's DBPostProcess in
    its "fast" mode without the polygon unclip: the map > ``mask_threshold`` dilated 2x2,
    one axis-aligned ``x1 y1 x2 y2`` box per connected region, kept when its sides are at
    least ``min_side`` and the mean probability inside it at least ``box_threshold``."""
    from scipy import ndimage

    # origin -1: the region grows to the right and down, as OpenCV's 2x2 dilate does
    mask = ndimage.binary_dilation(probability > mask_threshold, np.ones((2, 2)), origin=-1)
    found = []
    for rows, cols in ndimage.find_objects(ndimage.label(mask)[0]):
        if rows.stop - rows.start < min_side or cols.stop - cols.start < min_side:
            continue
        if probability[rows, cols].mean() >= box_threshold:
            found.append((cols.start, rows.start, cols.stop, rows.stop))
    return np.asarray(found, np.float64).reshape(-1, 4)
