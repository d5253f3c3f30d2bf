"""Helpers shared by the Python-backend models (imported inside the Triton stub process)."""
from __future__ import annotations

import json
from typing import Dict

import numpy as np

from edet_deploy.contract import INPUT_NAME


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


class EngineModel:
    """The `<name>_engine` Python model of CPU repositories: the exported ONNX graph (soft-NMS inside) in one
    of our CPU runners. Requests arriving together (dynamic batching) run as one batch. Subclasses say which
    runner (`make_runner`); the Triton module is imported lazily so that this file imports anywhere."""

    def make_runner(self, onnx_path: str, threads):  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def log(message: str) -> None:
        """One line in tritonserver's log (the stub's Logger), or on stderr outside the stub."""
        try:
            import triton_python_backend_utils as pb_utils
            pb_utils.Logger.log_info(message)
        except (ImportError, AttributeError):
            import sys
            print(message, file=sys.stderr)

    def initialize(self, args):
        import os
        params = parameters(args)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("threads", "0")) or None
        self.runner = self.make_runner(os.path.join(version_dir, params.get("onnx_file", "model.onnx")), threads)

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """The graph's outputs for `images` [B,S,S,3] uint8, in chunks of at most the runner's batch."""
        from edet_deploy.nms.op import OUTPUTS

        step = self.runner.max_batch
        chunks = [self.runner.infer(images[s:s + step]) for s in range(0, len(images), step)]
        return {k: np.concatenate([c[k] for c in chunks]) for k in OUTPUTS}

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from edet_deploy.nms.op import OUTPUTS

        batches, counts = [], []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            batches.append(images)
            counts.append(len(images))
        try:
            outputs = self.run(np.concatenate(batches))
        except Exception as e:  # noqa: BLE001 - fail these requests, keep the stub alive
            return [error_response(pb_utils, f"inference failed: {type(e).__name__}: {e}") for _ in requests]
        responses, start = [], 0
        for n in counts:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(k, np.ascontiguousarray(outputs[k][start:start + n])) for k in OUTPUTS]))
            start += n
        return responses

    def finalize(self):
        self.runner.close()
