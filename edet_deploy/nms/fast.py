"""The fast CPU soft-NMS (numba), used by the ONNX Runtime custom op and by Triton postprocessing.

One pass over the surviving candidates per kept box does the decay, drops boxes that fell below the score
threshold (compacting the arrays, so later passes get shorter) and finds the next maximum. Float32 arithmetic
in the reference's order; candidates stay in index order so ties resolve to the lowest index as in the reference.
"""
from __future__ import annotations

import numpy as np
from ..contract import point_numba_cache

point_numba_cache()
from numba import njit  # noqa: E402 - after its cache is chosen

from .settings import NmsSettings, check_boxes_scores


@njit(cache=True, nogil=True)
def _soft_nms_one(boxes, scores, classes, method, sigma, iou_thr, score_thr, max_det, agnostic,
                  out_index, out_score):
    n = scores.shape[0]
    idx = np.empty(n, np.int64)
    s = np.empty(n, np.float32)
    bx = np.empty((n, 4), np.float32)
    area = np.empty(n, np.float32)
    cls = np.empty(n, np.int64)
    m = 0
    best = -1
    best_score = np.float32(-np.inf)
    for i in range(n):  # drop what is below the threshold from the start; it can never be selected
        if scores[i] >= score_thr:
            idx[m] = i
            s[m] = scores[i]
            for c in range(4):
                bx[m, c] = boxes[i, c]
            area[m] = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            cls[m] = classes[i]
            if s[m] > best_score:
                best_score = s[m]
                best = m
            m += 1
    kept = 0
    zero = np.float32(0.0)
    one = np.float32(1.0)
    while kept < max_det and best >= 0 and best_score >= score_thr:
        out_index[kept] = idx[best]
        out_score[kept] = best_score
        kept += 1
        bx1, by1, bx2, by2 = bx[best, 0], bx[best, 1], bx[best, 2], bx[best, 3]
        barea = area[best]
        bcls = cls[best]
        w = 0
        nxt = -1
        nxt_score = np.float32(-np.inf)
        for j in range(m):
            if j == best:
                continue
            sj = s[j]
            if agnostic or cls[j] == bcls:
                iw = max(min(bx2, bx[j, 2]) - max(bx1, bx[j, 0]), zero)
                ih = max(min(by2, bx[j, 3]) - max(by1, bx[j, 1]), zero)
                inter = iw * ih
                union = barea + area[j] - inter
                iou = inter / union if union > zero else zero
                if method == 2:  # gaussian
                    sj = sj * np.exp(-(iou * iou) / sigma)
                elif method == 1:  # linear
                    if iou > iou_thr:
                        sj = sj * (one - iou)
                elif iou > iou_thr:  # hard
                    continue
                if sj < score_thr:
                    continue
            idx[w] = idx[j]
            s[w] = sj
            for c in range(4):
                bx[w, c] = bx[j, c]
            area[w] = area[j]
            cls[w] = cls[j]
            if sj > nxt_score:
                nxt_score = sj
                nxt = w
            w += 1
        m = w
        best = nxt
        best_score = nxt_score
    return kept


@njit(cache=True, nogil=True)
def _batched(boxes, scores, classes, method, sigma, iou_thr, score_thr, max_det, agnostic,
             num, out_boxes, out_scores, out_classes):
    index = np.empty(max_det, np.int64)
    for b in range(scores.shape[0]):
        k = _soft_nms_one(boxes[b], scores[b], classes[b], method, sigma, iou_thr, score_thr, max_det, agnostic,
                          index, out_scores[b])
        num[b, 0] = k
        for t in range(k):
            for c in range(4):
                out_boxes[b, t, c] = boxes[b, index[t], c]
            out_classes[b, t] = classes[b, index[t]]


def batched_soft_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, *, method: str = "gaussian",
                     sigma: float = 0.5, iou_threshold: float = 0.3, score_threshold: float = 0.001,
                     max_detections: int = 100, class_agnostic: bool = False):
    """Batched soft-NMS: boxes [B,N,4] x1,y1,x2,y2, scores [B,N], classes [B,N] ->
    (num_detections [B,1] int32, detection_boxes [B,K,4] float32, detection_scores [B,K] float32 (decayed),
    detection_classes [B,K] int32), sorted by score, zeros past num_detections."""
    cfg = NmsSettings(method, sigma, iou_threshold, score_threshold, max_detections, class_agnostic)
    boxes, scores = check_boxes_scores(boxes, scores, batched=True)
    classes = np.ascontiguousarray(classes, dtype=np.int64)
    if classes.shape != scores.shape:
        from ..errors import EdetError
        raise EdetError(f"classes must have shape {list(scores.shape)}, got {list(classes.shape)}")
    b, k = scores.shape[0], cfg.max_detections
    num = np.zeros((b, 1), np.int32)
    out_boxes = np.zeros((b, k, 4), np.float32)
    out_scores = np.zeros((b, k), np.float32)
    out_classes = np.zeros((b, k), np.int32)
    _batched(boxes, scores, classes, cfg.method_id, np.float32(cfg.sigma), np.float32(cfg.iou_threshold),
             np.float32(cfg.score_threshold), k, cfg.class_agnostic, num, out_boxes, out_scores, out_classes)
    return num, out_boxes, out_scores, out_classes


def warmup() -> None:
    """Compile (or load from numba's cache) ahead of the first real call."""
    batched_soft_nms(np.zeros((1, 1, 4), np.float32), np.ones((1, 1), np.float32), np.zeros((1, 1), np.int64))
