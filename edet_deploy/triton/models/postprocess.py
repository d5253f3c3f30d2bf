"""Triton model `<name>_postprocess`: boxes back to original pixels (clipped), class labels attached."""
from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from edet_deploy.contract import (CLASS_NAMES_PARAMETER, DETECTION_BOXES, DETECTION_CLASSES, DETECTION_LABELS,
                                  DETECTION_SCORES, NUM_DETECTIONS, ORIG_SIZE, SCALE, raw_output_name)
from edet_deploy.errors import EdetError
from edet_deploy.postprocess import to_original_pixels
from edet_deploy.triton.models.common import WatchedModel, error_response, parameters


def check_inputs(num: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, scale: np.ndarray,
                 orig_size: np.ndarray) -> None:
    """What this model receives is what the engine sends, unless a client calls it directly: shapes that agree
    ([B,1], [B,K,4], [B,K], [B,K], [B,1], [B,2]), 0 <= num_detections <= K, finite values, positive scales and
    sizes. Anything else is the caller's error (EdetError: a 400 for that request alone)."""
    b = num.shape[0] if num.ndim == 2 else -1
    k = boxes.shape[1] if boxes.ndim == 3 else -1
    if (b < 1 or num.shape != (b, 1) or boxes.shape != (b, k, 4) or scores.shape != (b, k)
            or classes.shape != (b, k) or scale.reshape(-1).shape != (b,) or orig_size.shape != (b, 2)):
        raise EdetError(f"inputs do not agree: num_detections {list(num.shape)}, boxes {list(boxes.shape)}, "
                        f"scores {list(scores.shape)}, classes {list(classes.shape)}, scale {list(scale.shape)}, "
                        f"orig_size {list(orig_size.shape)}")
    if ((num < 0) | (num > k)).any():
        raise EdetError(f"num_detections must be in 0..{k}, got {num.reshape(-1).tolist()[:8]}")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all() and np.isfinite(scale).all()):
        raise EdetError("boxes, scores and scale must be finite")
    if (scale <= 0).any() or (orig_size <= 0).any():
        raise EdetError("scale and orig_size must be positive")


class TritonPythonModel(WatchedModel):
    def initialize(self, args):
        names = json.loads(parameters(args).get(CLASS_NAMES_PARAMETER, "[]"))
        self.names = np.asarray([n.encode() for n in names] or [b""], dtype=object)
        self.with_labels = bool(names)

    def output_tensors(self, num: np.ndarray, raw_boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       scale: np.ndarray, orig_size: np.ndarray) -> list:
        """The engine's outputs for one request -> the ensemble's output tensors (boxes in original pixels)."""
        check_inputs(num, raw_boxes, scores, classes, scale, orig_size)
        boxes = to_original_pixels(raw_boxes, scale.reshape(-1), orig_size)
        out = [pb_utils.Tensor(NUM_DETECTIONS, num.astype(np.int32)),
               pb_utils.Tensor(DETECTION_BOXES, boxes),
               pb_utils.Tensor(DETECTION_SCORES, scores.astype(np.float32)),
               pb_utils.Tensor(DETECTION_CLASSES, classes.astype(np.int32))]
        if self.with_labels:
            idx = np.clip(classes, 0, len(self.names) - 1)
            labels = self.names[idx]
            labels[np.arange(classes.shape[1])[None, :] >= num.reshape(-1, 1)] = b""
            out.append(pb_utils.Tensor(DETECTION_LABELS, labels.astype(object)))
        return out

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
                out = self.output_tensors(*(get(raw_output_name(o)) for o in (NUM_DETECTIONS, DETECTION_BOXES,
                                                                              DETECTION_SCORES, DETECTION_CLASSES)),
                                          get(SCALE), get(ORIG_SIZE))
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except EdetError as e:
                responses.append(error_response(pb_utils, str(e)))
            except Exception as e:  # noqa: BLE001
                responses.append(error_response(pb_utils, f"postprocessing failed: {type(e).__name__}: {e}"))
        return responses
