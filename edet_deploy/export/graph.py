"""The detection graph as a torch module: uint8 NHWC images in, decoded pre-NMS candidates out.

Cast, normalisation and NCHW transpose are inside (4x fewer bytes from preprocessing to the engine), then the
network, sigmoid, TopK candidate selection over anchors x classes and box decoding against constant anchors.
The soft-NMS node is appended to the exported ONNX graph afterwards (export/onnx_export.py); the torch
reference path runs the same module followed by the CPU soft-NMS.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from ..anchors import anchors_for, level_sizes
from ..box_coding import decode_boxes
from ..errors import EdetError
from ..nms.settings import DEFAULT_PRE_NMS_TOP_K, TRT_MAX_TOPK  # noqa: F401 (re-exported)


class CandidateGraph(nn.Module):
    def __init__(self, model: nn.Module, pre_nms_top_k: int = DEFAULT_PRE_NMS_TOP_K):
        super().__init__()
        cfg = model.config
        self.model = model
        self.num_classes = cfg.num_classes
        sizes = level_sizes(cfg.image_size, cfg.min_level, cfg.max_level)
        # Static per-level sizes: reshapes get constant shapes even with a dynamic batch dimension.
        self.level_anchors = [s * s * cfg.num_anchors for s in sizes]
        if not 1 <= pre_nms_top_k:
            raise EdetError(f"pre_nms_top_k must be >= 1, got {pre_nms_top_k}")
        # k_anchors * C must hold top_k pairs: with top_k <= total anchors that always holds
        self.top_k = int(min(pre_nms_top_k, sum(self.level_anchors)))
        self.register_buffer("anchors", torch.from_numpy(anchors_for(cfg)), persistent=False)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 1, 1, 3), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(cfg.std, dtype=torch.float32).view(1, 1, 1, 3),
                             persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW, the network's input."""
        return ((images.to(torch.float32) - self.mean) * self.inv_std).permute(0, 3, 1, 2)

    def head_outputs(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class logits [B, A, C] and box codes [B, A, 4] over all anchors, in the anchors' order."""
        cls_out, box_out = self.model(self.normalize(images))
        return flatten_levels(cls_out, self.level_anchors, self.num_classes), flatten_levels(
            box_out, self.level_anchors, 4)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, codes = self.head_outputs(images)
        c = self.num_classes
        # Two-stage selection, exactly the top-K (anchor, class) pairs of one TopK over all A*C logits, at a
        # fraction of the cost (A*C is 10M at D2): an anchor holding one of the top-K pairs has its best class
        # logit >= the K-th largest pair, and at most K anchors can have that, so the top-K anchors by best
        # logit contain every winner.
        k_anchors = min(self.top_k, logits.shape[1])
        _, top_anchor = torch.topk(logits.amax(dim=2), k_anchors, dim=1)  # [B, K]
        sub = torch.gather(logits, 1, top_anchor.unsqueeze(-1).expand(-1, -1, c)).reshape(-1, k_anchors * c)
        top_logits, top_index = torch.topk(sub, self.top_k, dim=1)
        slot = torch.div(top_index, c, rounding_mode="trunc")  # indices >= 0: plain integer Div
        classes = top_index - slot * c
        anchor_index = torch.gather(top_anchor, 1, slot)
        codes = torch.gather(codes, 1, anchor_index.unsqueeze(-1).expand(-1, -1, 4))
        boxes = decode_boxes(codes, self.anchors[anchor_index])
        return boxes, torch.sigmoid(top_logits), classes.to(torch.int32)


def flatten_levels(outputs, anchors_per_level, width: int) -> torch.Tensor:
    """Per-level head maps (B, A_l*width, H, W) -> (B, sum A_l, width) in (level, row, column, anchor) order.
    Reshapes use constant sizes so that the exported graph keeps static shapes with a dynamic batch."""
    return torch.cat([o.permute(0, 2, 3, 1).reshape(-1, n, width) for o, n in zip(outputs, anchors_per_level)],
                     dim=1)
