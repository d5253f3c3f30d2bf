"""Triton model `<name>_engine` for CPU targets: the exported ONNX graph in ONNX Runtime (soft-NMS inside).
Requests arriving together (dynamic batching) run as one ONNX Runtime batch."""
from __future__ import annotations

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
from edet_deploy.nms.op import OUTPUTS
from edet_deploy.triton.models.common import error_response, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("threads", "0")) or None
        self.runner = OnnxRuntimeRunner(os.path.join(version_dir, params.get("onnx_file", "model.onnx")),
                                        threads=threads)

    def execute(self, requests):
        batches, counts, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
            batches.append(images)
            counts.append(len(images))
        try:
            merged = np.concatenate(batches)
            chunks = []
            step = self.runner.max_batch
            for s in range(0, len(merged), step):
                chunks.append(self.runner.infer(merged[s:s + step]))
            outputs = {k: np.concatenate([c[k] for c in chunks]) for k in OUTPUTS}
        except Exception as e:  # noqa: BLE001 - fail these requests, keep the stub alive
            return [error_response(pb_utils, f"inference failed: {type(e).__name__}: {e}") for _ in requests]
        start = 0
        for i, n in enumerate(counts):
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(k, np.ascontiguousarray(outputs[k][start:start + n])) for k in OUTPUTS])
            start += n
        return responses
