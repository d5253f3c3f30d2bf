"""Triton model `<name>_engine` for CPU targets with `--engine-backend openvino`: the same ONNX graph, network
and candidate selection in OpenVINO, soft-NMS in our fast CPU implementation with the node's settings.
Compiled models go to the OpenVINO cache (parameter `cache_dir`, default ~/.cache/edet_deploy/openvino), so a
restart does not recompile. Repository precision bf16 (`triton-repo --precision bf16`) runs the FP32 graph's
network in bfloat16."""
from __future__ import annotations

from edet_deploy.triton.models.common import EngineModel, parameters


class TritonPythonModel(EngineModel):
    def initialize(self, args):
        params = parameters(args)
        self.cache_dir = params.get("cache_dir") or True
        self.precision = params.get("precision")
        super().initialize(args)

    def make_runner(self, onnx_path: str, threads):
        from edet_deploy.backends import precision_options
        from edet_deploy.backends.openvino import OpenVinoRunner, precision_note
        # The repository states the precision (triton-repo resolved the CPU default when it was written).
        extra = precision_options("openvino", self.precision == "bf16")
        runner = OpenVinoRunner(onnx_path, threads=threads, cache_dir=self.cache_dir, **extra)
        self.log(f"{precision_note(runner.inference_precision, stated=True)}; batch sizes "
                 f"{runner.compiled_batches} compiled at load in {runner.load_ms:.0f} ms")
        return runner
