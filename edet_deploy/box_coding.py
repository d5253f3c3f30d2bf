"""Box (de)coding relative to anchors, for numpy arrays and torch tensors alike.

Codes are (ty, tx, th, tw) as the EfficientDet box head predicts them (yxyx order, automl/effdet);
boxes are x1, y1, x2, y2 in input pixels.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# Largest log-scale accepted when decoding (torchvision's convention): keeps exp() finite in FP16 graphs.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _stack(parts, like):
    if _is_torch(like):
        import torch
        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def decode_boxes(codes, anchors):
    """codes (..., 4) ty, tx, th, tw; anchors (..., 4) x1, y1, x2, y2 -> boxes (..., 4) x1, y1, x2, y2."""
    wa = anchors[..., 2] - anchors[..., 0]
    ha = anchors[..., 3] - anchors[..., 1]
    xa = (anchors[..., 0] + anchors[..., 2]) / 2
    ya = (anchors[..., 1] + anchors[..., 3]) / 2
    ty, tx, th, tw = codes[..., 0], codes[..., 1], codes[..., 2], codes[..., 3]
    if _is_torch(codes):
        w = wa * tw.clamp(max=MAX_LOG_SCALE).exp()
        h = ha * th.clamp(max=MAX_LOG_SCALE).exp()
    else:
        w = wa * np.exp(np.minimum(tw, MAX_LOG_SCALE))
        h = ha * np.exp(np.minimum(th, MAX_LOG_SCALE))
    x = xa + tx * wa
    y = ya + ty * ha
    return _stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], codes)


def encode_boxes(boxes, anchors, eps: float = 1e-8):
    """Inverse of decode_boxes: boxes and anchors (..., 4) x1, y1, x2, y2 -> codes (ty, tx, th, tw)."""
    wa = anchors[..., 2] - anchors[..., 0]
    ha = anchors[..., 3] - anchors[..., 1]
    xa = anchors[..., 0] + 0.5 * wa
    ya = anchors[..., 1] + 0.5 * ha
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    x = boxes[..., 0] + 0.5 * w
    y = boxes[..., 1] + 0.5 * h
    if _is_torch(boxes):
        log = lambda v: v.clamp(min=eps).log()  # noqa: E731
    else:
        log = lambda v: np.log(np.maximum(v, eps))  # noqa: E731
    return _stack([(y - ya) / ha, (x - xa) / wa, log(h / ha), log(w / wa)], boxes)
