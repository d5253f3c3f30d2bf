"""Triton model `<name>_preprocess`: encoded image bytes -> letterboxed uint8 tensor, scale, original size."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from edet_deploy.errors import EdetError
from edet_deploy.preprocess import (MAX_ENCODED_BYTES, MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, check_request_pixels,
                                   letterbox, open_image, to_rgb)
from edet_deploy.triton.models.common import as_bytes, error_response, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.size = int(params["image_size"])
        self.max_pixels = int(params.get("max_pixels", MAX_IMAGE_PIXELS))
        self.max_request_pixels = int(params.get("max_request_pixels", MAX_REQUEST_PIXELS))
        self.max_request_bytes = int(params.get("max_request_bytes", MAX_ENCODED_BYTES))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
                total = sum(len(as_bytes(b)) for b in blobs)
                if total > self.max_request_bytes:
                    raise EdetError(f"request too large: {total} bytes of images; the limit is "
                                    f"{self.max_request_bytes}")
                # Every header first: the request's pixel budget is checked before anything is decoded.
                opened = [open_image(as_bytes(b), self.max_pixels, name=f"IMAGE[{i}]") for i, b in enumerate(blobs)]
                check_request_pixels(opened, self.max_request_pixels)
                images, scales, sizes = [], [], []
                for i, pil in enumerate(opened):
                    img = to_rgb(pil, f"IMAGE[{i}]")
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
