"""TensorRT backend: deserialize a plan, bind torch CUDA buffers, execute_async_v3; optional CUDA graph."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from ..errors import EdetError
from ..metadata import read_metadata
from .base import Runner


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, cuda_graph: bool = False):
        from ..trt import require_tensorrt
        from ..trt.builder import check_plan_matches_machine
        from ..trt.plugin import register

        trt = require_tensorrt()
        import torch

        path = Path(engine_path)
        if not path.is_file():
            raise EdetError(f"engine not found: {path}")
        if not torch.cuda.is_available():
            raise EdetError("the tensorrt backend needs a CUDA GPU")
        meta = read_metadata(path)
        check_plan_matches_machine(meta)
        super().__init__(meta)
        register()  # plugin creators must exist before deserialization
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EdetError(f"TensorRT could not deserialize {path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.trt = trt
        self.use_cuda_graph = cuda_graph
        self._graphs: Dict[int, tuple] = {}

    def _buffers(self, batch: int):
        torch = self.torch
        dtypes = {self.trt.float32: torch.float32, self.trt.float16: torch.float16, self.trt.int32: torch.int32,
                  self.trt.uint8: torch.uint8, self.trt.int64: torch.int64}
        s = self.image_size
        self.context.set_input_shape("images", (batch, s, s, 3))
        bufs = {"images": torch.empty((batch, s, s, 3), dtype=torch.uint8, device="cuda")}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            bufs[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
        for name, t in bufs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        return bufs

    def infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        torch = self.torch
        images = self.check_input(images)
        b = images.shape[0]
        if self.use_cuda_graph:
            if b not in self._graphs:
                bufs = self._buffers(b)
                self.context.execute_async_v3(self.stream.cuda_stream)  # warm-up outside capture
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
                self._graphs[b] = (graph, bufs)
            graph, bufs = self._graphs[b]
            bufs["images"].copy_(torch.from_numpy(images), non_blocking=False)
            graph.replay()
        else:
            bufs = self._buffers(b)
            bufs["images"].copy_(torch.from_numpy(images))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EdetError("TensorRT execution failed")
        self.stream.synchronize()
        return {name: bufs[name].float().cpu().numpy() if bufs[name].dtype == torch.float16 else bufs[name].cpu().numpy()
                for name in self.outputs}
