"""Synthetic soft-NMS inputs for tests and benchmarks: clusters of jittered boxes (realistic overlaps)."""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np

from .settings import METHODS


def clustered_case(rng: np.random.Generator, batch: int, n: int, num_classes: int, size: float = 512.0,
                   ties: bool = False, zero_area: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes [B,N,4], scores [B,N], classes [B,N]; optional exact score ties and zero-area boxes."""
    k = max(1, n // 6)
    centers = rng.uniform(0, size, (batch, k, 2))
    wh = rng.uniform(8, 150, (batch, k, 2))
    pick = rng.integers(0, k, (batch, n))
    c = np.take_along_axis(centers, pick[..., None].repeat(2, -1), 1) + rng.normal(0, 6, (batch, n, 2))
    s = np.take_along_axis(wh, pick[..., None].repeat(2, -1), 1) * rng.uniform(0.7, 1.3, (batch, n, 2))
    boxes = np.concatenate([c - s / 2, c + s / 2], -1).astype(np.float32)
    scores = rng.uniform(0, 1, (batch, n)).astype(np.float32)
    if ties and n > 2:
        scores[:, 1::3] = scores[:, 0:1]  # many exact ties
    if zero_area and n > 2:
        boxes[:, ::5, 2] = boxes[:, ::5, 0]
    classes = rng.integers(0, num_classes, (batch, n)).astype(np.int32)
    return boxes, scores, classes


def random_cases(seed: int, count: int, max_n: int, batches=(1, 2, 3), num_classes=(1, 2, 3),
                 max_detections: int = 40) -> Iterator[Tuple[Tuple[np.ndarray, ...], Dict]]:
    """`count` cases cycling through every method, class-aware and agnostic, random thresholds and sizes
    (including 0, 1 and 2 candidates), ties and zero-area boxes."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.choice([0, 1, 2, rng.integers(3, max_n + 1)]))
        opts = dict(method=METHODS[i % 3], sigma=float(rng.uniform(0.1, 1.0)),
                    iou_threshold=float(rng.uniform(0.1, 0.7)),
                    score_threshold=float(rng.choice([0.001, 0.05, 0.5, 0.99])),
                    max_detections=int(rng.integers(1, max_detections)), class_agnostic=bool(i % 2))
        case = clustered_case(rng, int(rng.choice(batches)), n, int(rng.choice(num_classes)), ties=i % 4 == 0,
                              zero_area=i % 5 == 0)
        yield case, opts
