"""Helpers shared by the Python-backend models (imported inside the Triton stub process)."""
from __future__ import annotations

import json
from typing import Dict

import numpy as np


def parameters(args: Dict) -> Dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def error_response(pb_utils, message: str):
    """A per-request 400-class error: the stub and the other requests carry on."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return str(value).encode()
