"""Triton model `<name>_preprocess`: encoded image bytes -> letterboxed uint8 tensor, scale, original size.
With the parameter input_format=decoded (`<name>_preprocess_decoded`) the input is an RGB uint8 [H, W, 3]
image the client decoded already: only the letterbox runs here. Either way the request's byte and pixel
budgets are checked before any decoding (headers only for encoded images)."""
from __future__ import annotations

import json
from typing import Tuple

import numpy as np
import triton_python_backend_utils as pb_utils

from edet_deploy.contract import FILL_PARAMETER, IMAGE, INPUT_NAME, ORIG_SIZE, SCALE
from edet_deploy.errors import EdetError
from edet_deploy.preprocess import (MAX_ENCODED_BYTES, MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, check_request_pixels,
                                   decode_image, letterbox, open_image, to_rgb)
from edet_deploy.triton.models.common import WatchedModel, as_bytes, error_response, parameters


class TritonPythonModel(WatchedModel):
    def initialize(self, args):
        params = parameters(args)
        self.size = int(params["image_size"])
        self.fill = json.loads(params[FILL_PARAMETER])  # the variant's mean colour, from the graph metadata
        self.max_pixels = int(params.get("max_pixels", MAX_IMAGE_PIXELS))
        self.max_request_pixels = int(params.get("max_request_pixels", MAX_REQUEST_PIXELS))
        self.max_request_bytes = int(params.get("max_request_bytes", MAX_ENCODED_BYTES))
        self.decoded = params.get("input_format", "encoded") == "decoded"

    def _decoded(self, tensor: np.ndarray) -> list:
        """A batch of same-sized RGB images [B, H, W, 3], budgets checked on the shape alone."""
        if tensor.ndim != 4 or tensor.shape[-1] != 3 or tensor.shape[0] < 1:
            raise EdetError(f"{IMAGE} must be uint8 [B, H, W, 3], got {list(tensor.shape)}")
        b, h, w, _ = tensor.shape
        if h * w > self.max_pixels:
            raise EdetError(f"{IMAGE}: {h}x{w} is too large (limit {self.max_pixels} pixels per image)")
        if b * h * w > self.max_request_pixels:
            raise EdetError(f"request too large: {b * h * w} pixels; the limit is {self.max_request_pixels}")
        return [decode_image(item, self.max_pixels, name=f"{IMAGE}[{i}]") for i, item in enumerate(tensor)]

    def _encoded(self, tensor: np.ndarray) -> list:
        if tensor.ndim != 2 or tensor.shape[1] != 1 or tensor.shape[0] < 1:
            raise EdetError(f"{IMAGE} must be BYTES [B, 1] with B >= 1 (one encoded image per row), "
                            f"got {list(tensor.shape)}")
        blobs = [as_bytes(b) for b in tensor.reshape(-1)]
        total = sum(len(b) for b in blobs)
        if total > self.max_request_bytes:
            raise EdetError(f"request too large: {total} bytes of images; the limit is {self.max_request_bytes}")
        # Every header first: the request's pixel budget is checked before anything is decoded.
        opened = [open_image(b, self.max_pixels, name=f"{IMAGE}[{i}]") for i, b in enumerate(blobs)]
        check_request_pixels(opened, self.max_request_pixels)
        return [to_rgb(pil, f"{IMAGE}[{i}]") for i, pil in enumerate(opened)]

    def prepare(self, tensor: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One request's IMAGE tensor -> (letterboxed images [B,S,S,3] uint8, scales [B,1], sizes [B,2])."""
        images, scales, sizes = [], [], []
        for img in (self._decoded(tensor) if self.decoded else self._encoded(tensor)):
            boxed, scale = letterbox(img, self.size, self.fill)
            images.append(boxed)
            scales.append([scale])
            sizes.append(img.shape[:2])
        return np.stack(images), np.asarray(scales, np.float32), np.asarray(sizes, np.int32)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images, scales, sizes = self.prepare(pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy())
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(INPUT_NAME, images), pb_utils.Tensor(SCALE, scales),
                    pb_utils.Tensor(ORIG_SIZE, sizes)]))
            except EdetError as e:
                responses.append(error_response(pb_utils, str(e)))
            except Exception as e:  # noqa: BLE001 - never let one request kill the stub
                responses.append(error_response(pb_utils, f"preprocessing failed: {type(e).__name__}: {e}"))
        return responses
