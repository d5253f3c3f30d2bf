"""Triton model `<name>_preprocess`: encoded image bytes -> letterboxed uint8 tensor, scale, original size.
With the parameter input_format=decoded (`<name>_preprocess_decoded`) the input is an RGB uint8 [H, W, 3]
image the client decoded already: only the letterbox runs here."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from edet_deploy.errors import EdetError
from edet_deploy.preprocess import MAX_IMAGE_PIXELS, decode_image, letterbox
from edet_deploy.triton.models.common import as_bytes, error_response, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.size = int(params["image_size"])
        self.max_pixels = int(params.get("max_pixels", MAX_IMAGE_PIXELS))
        self.decoded = params.get("input_format", "encoded") == "decoded"

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                # decoded: a batch of same-sized images [B, H, W, 3]; encoded: B byte strings
                items = list(tensor) if self.decoded else [as_bytes(b) for b in tensor.reshape(-1)]
                images, scales, sizes = [], [], []
                for i, item in enumerate(items):
                    if self.decoded and item.size > self.max_pixels * 3:
                        raise EdetError(f"IMAGE[{i}]: {item.shape[0]}x{item.shape[1]} is too large")
                    img = decode_image(item, self.max_pixels, name=f"IMAGE[{i}]")
                    boxed, scale = letterbox(img, self.size)
                    images.append(boxed)
                    scales.append([scale])
                    sizes.append(img.shape[:2])
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("images", np.stack(images)),
                    pb_utils.Tensor("scale", np.asarray(scales, np.float32)),
                    pb_utils.Tensor("orig_size", np.asarray(sizes, np.int32))]))
            except EdetError as e:
                responses.append(error_response(pb_utils, str(e)))
            except Exception as e:  # noqa: BLE001 - never let one request kill the stub
                responses.append(error_response(pb_utils, f"preprocessing failed: {type(e).__name__}: {e}"))
        return responses
