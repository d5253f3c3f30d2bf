"""TensorRT backend: deserialize a plan, bind torch CUDA buffers, execute_async_v3 on the runner's stream.

With `cuda_graph=True` each batch size gets its own execution context, buffers and CUDA graph, captured with
that context's input shape set (a graph bakes shapes and addresses in; one context per size keeps them
true), and replayed on the runner's stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ..errors import EdetError
from ..metadata import read_metadata
from .base import Runner


@dataclass
class _Slot:
    """One execution context bound to buffers of one batch size (and its CUDA graph, once captured)."""
    context: Any
    buffers: Dict[str, Any]
    graph: Any = None


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, cuda_graph: bool = False, verbose: bool = False):
        from ..trt import require_tensorrt
        from ..trt.builder import _Logger, check_plan_matches_machine
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
        # An AOT engine needs no registered creator; registering keeps engines built with the JIT
        # implementation (debugging) loadable too.
        register()
        self.torch, self.trt = torch, trt
        self.logger = _Logger(trt, verbose)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EdetError(f"TensorRT could not deserialize {path} (see the log above)")
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.use_cuda_graph = cuda_graph
        self._slots: Dict[int, _Slot] = {}
        self._dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                        trt.uint8: torch.uint8, trt.int64: torch.int64}

    def _slot(self, batch: int) -> _Slot:
        """The context for `batch`: one per size with CUDA graphs, else one shared and reshaped per call."""
        key = batch if self.use_cuda_graph else 0
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(self.engine.create_execution_context(), {})
        if slot.buffers.get("images") is None or slot.buffers["images"].shape[0] != batch:
            torch, s = self.torch, self.image_size
            slot.context.set_input_shape("images", (batch, s, s, 3))
            bufs = {"images": torch.empty((batch, s, s, 3), dtype=torch.uint8, device="cuda")}
            for name in self.outputs:
                shape = tuple(slot.context.get_tensor_shape(name))
                bufs[name] = torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)],
                                         device="cuda")
            for name, t in bufs.items():
                slot.context.set_tensor_address(name, t.data_ptr())
            slot.buffers, slot.graph = bufs, None
        return slot

    def _execute(self, slot: _Slot) -> None:
        if not slot.context.execute_async_v3(self.stream.cuda_stream):
            raise EdetError("TensorRT execution failed (see the log above)")

    def infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        torch = self.torch
        images = self.check_input(images)
        slot = self._slot(images.shape[0])
        with torch.cuda.stream(self.stream):
            slot.buffers["images"].copy_(torch.from_numpy(images), non_blocking=False)
            if self.use_cuda_graph:
                if slot.graph is None:
                    self._execute(slot)  # warm-up outside capture: lazy allocations, plugin setup
                    self.stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                        self._execute(slot)
                    slot.graph = graph
                slot.graph.replay()
            else:
                self._execute(slot)
            result = {name: slot.buffers[name].float() if slot.buffers[name].dtype == torch.float16
                      else slot.buffers[name] for name in self.outputs}
            result = {name: t.cpu() for name, t in result.items()}
        self.stream.synchronize()
        return {name: t.numpy() for name, t in result.items()}

    def gpu_time_ms(self, images: np.ndarray, iters: int = 50) -> list:
        """GPU-only time per inference (CUDA events around the engine alone, inputs already on the device)."""
        torch = self.torch
        images = self.check_input(images)
        slot = self._slot(images.shape[0])
        slot.buffers["images"].copy_(torch.from_numpy(images))
        times = []
        with torch.cuda.stream(self.stream):
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                if self.use_cuda_graph and slot.graph is not None:
                    slot.graph.replay()
                else:
                    self._execute(slot)
                end.record(self.stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
        return times

    def plugin_layers(self) -> list:
        """The engine inspector's entries for plugin layers (needs a plan built with detailed profiling)."""
        import json
        inspector = self.engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(self.trt.LayerInformationFormat.JSON))
        layers = [json.loads(x) if isinstance(x, str) else x for x in info.get("Layers", [])]
        return [layer for layer in layers if "plugin" in json.dumps(layer).lower()]
