"""Triton model `<name>_engine` for CPU targets with `--engine-backend onnxruntime`: the exported ONNX graph
in ONNX Runtime (soft-NMS inside, through onnxruntime-extensions)."""
from __future__ import annotations

import sys

from edet_deploy.triton.models.common import EngineModel

# The runner's options in the engine (benchmarks/triton_engines.py runs the in-process side with the same): its
# threads stop spinning when a run ends, since the ensemble's other processes need the cores between runs.
RUNNER_OPTIONS = {"spinning": False}


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
            return OnnxRuntimeRunner(onnx_path, threads=threads, **RUNNER_OPTIONS)
        finally:
            if blocked and sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
