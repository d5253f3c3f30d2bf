"""Triton model `<name>_engine` for CPU targets with `--engine-backend openvino`: the same ONNX graph, network
and candidate selection in OpenVINO, soft-NMS in our fast CPU implementation with the node's settings.
Compiled models go to the OpenVINO cache (parameter `cache_dir`, default ~/.cache/edet_deploy/openvino), so a
restart does not recompile."""
from __future__ import annotations

from edet_deploy.triton.models.common import EngineModel, parameters


class TritonPythonModel(EngineModel):
    def initialize(self, args):
        self.cache_dir = parameters(args).get("cache_dir") or True
        super().initialize(args)

    def make_runner(self, onnx_path: str, threads):
        from edet_deploy.backends.openvino import OpenVinoRunner
        return OpenVinoRunner(onnx_path, threads=threads, cache_dir=self.cache_dir)
