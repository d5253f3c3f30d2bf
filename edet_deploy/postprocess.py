"""Map graph detections back to original image pixels and into plain records (numpy only, no torch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .contract import DETECTION_BOXES, DETECTION_CLASSES, DETECTION_SCORES, NUM_DETECTIONS


def to_original_pixels(boxes: np.ndarray, scales: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """boxes [B,K,4] x1,y1,x2,y2 in graph-input pixels -> original pixels, clipped to each image.
    scales [B] (from letterbox), sizes [B,2] (height, width)."""
    boxes = np.asarray(boxes, np.float32) / np.asarray(scales, np.float32).reshape(-1, 1, 1)
    sizes = np.asarray(sizes, np.float32).reshape(-1, 2)
    limit = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=1)[:, None, :]
    return np.clip(boxes, 0.0, limit).astype(np.float32)


@dataclass
class Detections:
    """One image's detections in original pixels, sorted by score."""

    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2
    scores: np.ndarray  # [n]
    classes: np.ndarray  # [n] int, 0-based
    class_names: Optional[Sequence[str]] = None

    def __len__(self) -> int:
        return len(self.scores)

    def label(self, i: int) -> str:
        c = int(self.classes[i])
        if self.class_names and 0 <= c < len(self.class_names):
            return str(self.class_names[c])
        return str(c)

    def to_records(self) -> List[Dict]:
        return [{"class_id": int(self.classes[i]), "label": self.label(i), "score": round(float(self.scores[i]), 6),
                 "box": [round(float(v), 2) for v in self.boxes[i]]} for i in range(len(self))]


def split_detections(outputs: Dict[str, np.ndarray], scales: Optional[np.ndarray], sizes: Optional[np.ndarray],
                     class_names: Optional[Sequence[str]] = None, min_score: float = 0.0) -> List[Detections]:
    """Turn the four batched graph outputs into per-image Detections in original pixels. scales and sizes
    None: the boxes are in original pixels already (the Triton ensemble's postprocess model mapped them)."""
    num = np.asarray(outputs[NUM_DETECTIONS]).reshape(-1)
    boxes = (np.asarray(outputs[DETECTION_BOXES], np.float32) if scales is None else
             to_original_pixels(outputs[DETECTION_BOXES], scales, sizes))
    result = []
    for i, n in enumerate(num):
        n = int(n)
        scores = np.asarray(outputs[DETECTION_SCORES][i, :n], np.float32)
        keep = scores >= min_score
        result.append(Detections(boxes[i, :n][keep], scores[keep],
                                 np.asarray(outputs[DETECTION_CLASSES][i, :n], np.int64)[keep], class_names))
    return result
