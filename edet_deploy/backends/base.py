"""One small interface for every runtime: load a detection graph, run a batch of preprocessed images."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict

import numpy as np

from ..errors import EdetError


class Runner(ABC):
    """Runs the detection graph: uint8 [B,S,S,3] in; num_detections, detection_boxes (input pixels),
    detection_scores, detection_classes out (or the candidate tensors for a graph exported with --nms none)."""

    name: str = "base"

    def __init__(self, metadata: Dict[str, Any]):
        self.metadata = metadata

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def max_batch(self) -> int:
        batch = self.metadata.get("batch") or {}
        return int(batch.get("max", 1))

    @property
    def dynamic_batch(self) -> bool:
        return bool((self.metadata.get("batch") or {}).get("dynamic"))

    def check_input(self, images: np.ndarray) -> np.ndarray:
        s = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise EdetError(f"{self.name}: expected uint8 images [B, {s}, {s}, 3], got {images.dtype} "
                            f"{list(images.shape)}")
        b = images.shape[0]
        if self.dynamic_batch and not 1 <= b <= self.max_batch:
            raise EdetError(f"{self.name}: batch {b} outside the graph's range 1..{self.max_batch}")
        if not self.dynamic_batch and b != self.max_batch:
            raise EdetError(f"{self.name}: the graph has a fixed batch of {self.max_batch}, got {b}")
        return np.ascontiguousarray(images)

    @abstractmethod
    def infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Run one batch (already letterboxed) and return the graph outputs by name."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
