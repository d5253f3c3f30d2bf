"""Box arithmetic on (x1, y1, x2, y2) arrays: one home for area and IoU (numpy).

The reference soft-NMS, training's anchor matching and the tests use these; the numba and GPU kernels keep
their own in-kernel copy of the same float32 arithmetic (tests/test_nms.py checks it against `box_iou`)."""
from __future__ import annotations

import numpy as np


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Area of each box [..., 4] (0 for degenerate boxes), in the boxes' dtype."""
    b = np.asarray(boxes)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Pairwise IoU [N, M] of boxes a [N, 4] and b [M, 4]; 0 where the union is empty.

    Computed in `dtype`: float32 does the kernels' operations in their order (intersection, area + area -
    intersection, one division), so float32 callers agree with them bit for bit."""
    a, b = np.asarray(a, dtype), np.asarray(b, dtype)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(dtype, copy=False)
