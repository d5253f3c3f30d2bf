"""Soft-NMS settings and input checks shared by every implementation (reference, CPU, GPU kernel, plugin)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np

from ..errors import EdetError

METHODS = ("hard", "linear", "gaussian")
METHOD_IDS = {name: i for i, name in enumerate(METHODS)}  # integer codes used by kernels and graph attributes
# Candidates kept by TopK before NMS (here, not in export/graph.py, so the CLI builds without torch).
TRT_MAX_TOPK = 3840  # TensorRT's TopK limit
DEFAULT_PRE_NMS_TOP_K = 1000


@dataclass(frozen=True)
class NmsSettings:
    """Defaults follow automl's EfficientDet post-processing: gaussian soft-NMS with the paper's sigma."""

    method: str = "gaussian"
    sigma: float = 0.5
    iou_threshold: float = 0.3
    score_threshold: float = 0.001
    max_detections: int = 100
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EdetError(f"unknown soft-NMS method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.sigma > 0:
            raise EdetError(f"soft-NMS sigma must be > 0, got {self.sigma}")
        if not 0 <= self.iou_threshold <= 1:
            raise EdetError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if not self.score_threshold >= 0:
            raise EdetError(f"score_threshold must be >= 0, got {self.score_threshold}")
        if int(self.max_detections) != self.max_detections or self.max_detections < 0:
            raise EdetError(f"max_detections must be a non-negative integer, got {self.max_detections}")

    @property
    def method_id(self) -> int:
        return METHOD_IDS[self.method]

    def to_dict(self) -> dict:
        return asdict(self)


def check_boxes_scores(boxes: np.ndarray, scores: np.ndarray, batched: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Validate shapes and values; return float32 C-contiguous copies-or-views.

    NaN scores or boxes, and boxes with x2 < x1 or y2 < y1, are rejected with an EdetError: soft-NMS has no
    meaningful answer for them and they would otherwise poison every decay they take part in."""
    boxes = np.ascontiguousarray(boxes, dtype=np.float32)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    lead = scores.shape
    if scores.ndim != (2 if batched else 1):
        raise EdetError(f"scores must have shape {'[B, N]' if batched else '[N]'}, got {list(scores.shape)}")
    if boxes.shape != (*lead, 4):
        raise EdetError(f"boxes must have shape {[*lead, 4]} to match scores, got {list(boxes.shape)}")
    if np.isnan(scores).any():
        raise EdetError("scores contain NaN")
    if np.isnan(boxes).any():
        raise EdetError("boxes contain NaN")
    if boxes.size and ((boxes[..., 2] < boxes[..., 0]).any() or (boxes[..., 3] < boxes[..., 1]).any()):
        raise EdetError("boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
    return boxes, scores
