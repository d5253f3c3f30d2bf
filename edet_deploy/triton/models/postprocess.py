"""Triton model `<name>_postprocess`: boxes back to original pixels (clipped), class labels attached."""
from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from edet_deploy.contract import (CLASS_NAMES_PARAMETER, DETECTION_BOXES, DETECTION_CLASSES, DETECTION_LABELS,
                                  DETECTION_SCORES, NUM_DETECTIONS, ORIG_SIZE, SCALE, raw_output_name)
from edet_deploy.postprocess import to_original_pixels
from edet_deploy.triton.models.common import error_response, parameters


class TritonPythonModel:
    def initialize(self, args):
        names = json.loads(parameters(args).get(CLASS_NAMES_PARAMETER, "[]"))
        self.names = np.asarray([n.encode() for n in names] or [b""], dtype=object)
        self.with_labels = bool(names)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
                num = get(raw_output_name(NUM_DETECTIONS))
                classes = get(raw_output_name(DETECTION_CLASSES))
                boxes = to_original_pixels(get(raw_output_name(DETECTION_BOXES)), get(SCALE).reshape(-1),
                                           get(ORIG_SIZE))
                out = [pb_utils.Tensor(NUM_DETECTIONS, num.astype(np.int32)),
                       pb_utils.Tensor(DETECTION_BOXES, boxes),
                       pb_utils.Tensor(DETECTION_SCORES, get(raw_output_name(DETECTION_SCORES)).astype(np.float32)),
                       pb_utils.Tensor(DETECTION_CLASSES, classes.astype(np.int32))]
                if self.with_labels:
                    idx = np.clip(classes, 0, len(self.names) - 1)
                    labels = self.names[idx]
                    labels[np.arange(classes.shape[1])[None, :] >= num.reshape(-1, 1)] = b""
                    out.append(pb_utils.Tensor(DETECTION_LABELS, labels.astype(object)))
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except Exception as e:  # noqa: BLE001
                responses.append(error_response(pb_utils, f"postprocessing failed: {type(e).__name__}: {e}"))
        return responses
