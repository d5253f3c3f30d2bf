"""The reference soft-NMS: a direct transcription of the definition, written to be read, not to be fast.

Every faster implementation (numba CPU path, GPU kernel) is tested against this one. Arithmetic is float32 in
the same order as the kernels, so results agree bit-for-bit where the math libraries agree.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..box_ops import box_iou
from .settings import NmsSettings, check_boxes_scores


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1,y1,x2,y2 box with many (float32, the kernels' arithmetic); 0 where the union is 0."""
    return box_iou(np.asarray(box)[None], boxes, np.float32)[0]


def soft_nms(boxes: np.ndarray, scores: np.ndarray, *, method: str = "gaussian", sigma: float = 0.5,
             iou_threshold: float = 0.3, score_threshold: float = 0.001,
             max_detections: int = 100, classes: np.ndarray | None = None) -> Tuple[np.ndarray, np.ndarray]:
    """Soft-NMS over one set of boxes. Returns (keep, kept_scores): int64 indices in selection order and the
    decayed scores they had when selected.

    If `classes` is given, boxes of different classes never suppress each other (class-aware)."""
    cfg = NmsSettings(method, sigma, iou_threshold, score_threshold, max_detections)
    boxes, scores = check_boxes_scores(boxes, scores, batched=False)
    labels = np.zeros(len(scores), np.int64) if classes is None else np.asarray(classes, np.int64)
    current = scores.copy()
    alive = np.ones(len(scores), bool)
    keep, kept_scores = [], []
    thr = np.float32(cfg.score_threshold)
    while len(keep) < cfg.max_detections and alive.any():
        candidates = np.flatnonzero(alive)
        best = candidates[np.argmax(current[candidates])]  # argmax: first (lowest index) among ties
        if current[best] < thr:
            break
        keep.append(best)
        kept_scores.append(current[best])
        alive[best] = False
        others = np.flatnonzero(alive & (labels == labels[best]))
        iou = iou_one_to_many(boxes[best], boxes[others])
        if cfg.method == "gaussian":
            current[others] = current[others] * np.exp(-(iou * iou) / np.float32(cfg.sigma))
        elif cfg.method == "linear":
            over = iou > np.float32(cfg.iou_threshold)
            current[others[over]] = current[others[over]] * (np.float32(1) - iou[over])
        else:  # hard
            alive[others[iou > np.float32(cfg.iou_threshold)]] = False
        alive[others[current[others] < thr]] = False
    return np.asarray(keep, np.int64), np.asarray(kept_scores, np.float32)


def batched_soft_nms_reference(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, *,
                               method: str = "gaussian", sigma: float = 0.5, iou_threshold: float = 0.3,
                               score_threshold: float = 0.001, max_detections: int = 100,
                               class_agnostic: bool = False):
    """Batched, class-aware soft-NMS built from `soft_nms`, in the TensorRT NMS-plugin output convention:
    (num_detections [B,1] int32, boxes [B,K,4] float32, scores [B,K] float32, classes [B,K] int32)."""
    cfg = NmsSettings(method, sigma, iou_threshold, score_threshold, max_detections, class_agnostic)
    boxes, scores = check_boxes_scores(boxes, scores, batched=True)
    classes = np.asarray(classes).astype(np.int64).reshape(scores.shape)
    b, k = scores.shape[0], cfg.max_detections
    out = (np.zeros((b, 1), np.int32), np.zeros((b, k, 4), np.float32), np.zeros((b, k), np.float32),
           np.zeros((b, k), np.int32))
    for i in range(b):
        keep, kept = soft_nms(boxes[i], scores[i], method=method, sigma=sigma, iou_threshold=iou_threshold,
                              score_threshold=score_threshold, max_detections=max_detections,
                              classes=None if class_agnostic else classes[i])
        n = len(keep)
        out[0][i, 0] = n
        out[1][i, :n] = boxes[i, keep]
        out[2][i, :n] = kept
        out[3][i, :n] = classes[i, keep]
    return out
