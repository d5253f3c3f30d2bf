"""Triton model `<name>_engine` for CPU targets with `--engine-backend onnxruntime`: the exported ONNX graph
in ONNX Runtime (soft-NMS inside, through onnxruntime-extensions)."""
from __future__ import annotations

import sys

from edet_deploy.triton.models.common import EngineModel


class TritonPythonModel(EngineModel):
    def make_runner(self, onnx_path: str, threads):
        from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
        # onnxruntime-extensions tries `import torch` (for converters the engine never uses): torch and its CUDA
        # libraries were 220 MB of this stub's memory (smaps, benchmarks/triton_engines.py). Refused while the
        # runner imports it; nothing in the stub needs torch.
        blocked = "torch" not in sys.modules
        if blocked:
            sys.modules["torch"] = None  # type: ignore[assignment] - makes `import torch` raise ImportError
        try:
            return OnnxRuntimeRunner(onnx_path, threads=threads)
        finally:
            if blocked and sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
