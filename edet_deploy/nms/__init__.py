"""Soft-NMS: one definition (see `reference`), a fast CPU path (`fast`) and the GPU kernel in kernels/.

Semantics: boxes x1,y1,x2,y2 (continuous, no +1); IoU = intersection / union (0 if the union is 0);
methods hard (drop if IoU > iou_threshold), linear (score *= 1 - IoU if IoU > iou_threshold), gaussian
(score *= exp(-IoU^2 / sigma), the paper's sigma). Greedy: take the highest score (ties: lowest index), stop
below score_threshold or at max_detections, decay the rest, drop what falls below score_threshold.
"""
from .reference import batched_soft_nms_reference, iou_one_to_many, soft_nms
from .settings import METHODS, NmsSettings


def batched_soft_nms(*args, **kwargs):
    """Fast CPU batched soft-NMS (numba; imported on first use). See `edet_deploy.nms.fast.batched_soft_nms`."""
    from .fast import batched_soft_nms as impl
    return impl(*args, **kwargs)


__all__ = ["soft_nms", "batched_soft_nms", "batched_soft_nms_reference", "iou_one_to_many", "NmsSettings",
           "METHODS"]
