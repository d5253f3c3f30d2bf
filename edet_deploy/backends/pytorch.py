"""PyTorch eager backend: the reference. Runs the same candidate graph as the export, then the CPU soft-NMS."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..nms import NmsSettings
from ..nms.settings import DEFAULT_PRE_NMS_TOP_K
from .base import Runner, register_runner

EAGER_MAX_BATCH = 1 << 16  # eager PyTorch takes any batch; the bound check_input holds it to


@register_runner
class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model_name: str, weights: Optional[str] = None, num_classes: Optional[int] = None,
                 image_size: Optional[int] = None, nms: Optional[NmsSettings] = NmsSettings(),
                 pre_nms_top_k: int = DEFAULT_PRE_NMS_TOP_K, class_names: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, model=None):
        import torch

        from ..contract import CANDIDATES, OUTPUTS
        from ..export.graph import CandidateGraph
        from ..metadata import build_metadata
        from ..model import create_model
        from ..model.weights import checkpoint_metadata

        if threads:
            torch.set_num_threads(int(threads))
        ckpt = checkpoint_metadata(weights) if weights else {}
        if model is None:
            # The class count: given, else the file's metadata, else its class head (an effdet .pth), else 90.
            model = create_model(model_name, num_classes=num_classes or ckpt.get("num_classes"),
                                 weights=weights, image_size=image_size or ckpt.get("image_size"))
        cfg = model.config
        self.graph = CandidateGraph(model.eval(), pre_nms_top_k).eval()
        self.nms = nms
        meta = build_metadata(variant=cfg.name, image_size=cfg.image_size, num_classes=cfg.num_classes,
                              class_names=list(class_names or ckpt.get("class_names") or []), mean=cfg.mean,
                              std=cfg.std, opset=None, batch=1, dynamic_batch=EAGER_MAX_BATCH,
                              outputs=OUTPUTS if nms is not None else CANDIDATES, nms=nms,
                              pre_nms_top_k=self.graph.top_k, weights=weights)
        super().__init__(meta.to_dict())

    def candidates(self, images: np.ndarray):
        """The candidate tensors (boxes, scores, classes) the soft-NMS step takes."""
        return self._candidates(self.check_input(images))

    def _candidates(self, images: np.ndarray):
        import torch

        with torch.inference_mode():
            boxes, scores, classes = self.graph(torch.from_numpy(images))
        return boxes.numpy(), scores.numpy(), classes.numpy()

    def infer_impl(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        from ..contract import CANDIDATES, OUTPUTS
        from ..nms.fast import batched_soft_nms

        boxes, scores, classes = self._candidates(images)
        if self.nms is None:
            return dict(zip(CANDIDATES, (boxes, scores, classes)))
        return dict(zip(OUTPUTS, batched_soft_nms(boxes, scores, classes, **self.nms.to_dict())))

    def release(self) -> None:
        del self.graph  # the model's weights
