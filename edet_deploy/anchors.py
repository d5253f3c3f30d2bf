"""Anchor boxes in the automl / effdet convention (numpy; no torch import).

Levels P3..P7 (P8 for d7x); per location `num_scales` octave scales 2^(i/num_scales) times the aspect ratios
(octave outer, aspect inner: 9 anchors); base size anchor_scale * stride * octave; centres at stride/2 + k*stride.
Order: level, then row, then column, then anchor - the order of the heads' outputs after permute/reshape.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def level_sizes(image_size: int, min_level: int, max_level: int) -> list[int]:
    """Feature-map side length per level (TF 'same' stride-2 rounding, as the network computes them)."""
    size, sizes = image_size, {}
    for level in range(1, max_level + 1):
        size = (size - 1) // 2 + 1
        sizes[level] = size
    return [sizes[level] for level in range(min_level, max_level + 1)]


def generate_anchors(image_size: int, min_level: int = 3, max_level: int = 7, num_scales: int = 3,
                     aspect_ratios: Sequence[Tuple[float, float]] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)),
                     anchor_scale: float = 4.0) -> np.ndarray:
    """All anchors as float32 (N, 4) x1, y1, x2, y2 in input pixels."""
    per_level = []
    for feat in level_sizes(image_size, min_level, max_level):
        stride = image_size / feat
        centers = np.arange(stride / 2, image_size, stride, dtype=np.float64)
        cy, cx = np.meshgrid(centers, centers, indexing="ij")  # (feat, feat), row-major locations
        half = []
        for octave in range(num_scales):
            base = anchor_scale * stride * 2.0 ** (octave / num_scales)
            for ax, ay in aspect_ratios:
                half.append((base * ax / 2.0, base * ay / 2.0))
        hw = np.asarray(half)[None, :, :]  # (1, A, 2): half width, half height
        c = np.stack([cx.reshape(-1), cy.reshape(-1)], axis=1)[:, None, :]  # (HW, 1, 2)
        per_level.append(np.concatenate([c - hw, c + hw], axis=2).reshape(-1, 4))
    return np.concatenate(per_level).astype(np.float32)


def anchors_for(config) -> np.ndarray:
    """Anchors of a VariantConfig at its image size."""
    return generate_anchors(config.image_size, config.min_level, config.max_level, config.num_scales,
                            config.aspect_ratios, config.anchor_scale)
