"""Triton model `<name>_engine` for CPU targets with `--engine-backend onnxruntime`: the exported ONNX graph
in ONNX Runtime (soft-NMS inside, through onnxruntime-extensions)."""
from __future__ import annotations

from edet_deploy.triton.models.common import EngineModel


class TritonPythonModel(EngineModel):
    def make_runner(self, onnx_path: str, threads):
        from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
        return OnnxRuntimeRunner(onnx_path, threads=threads)
