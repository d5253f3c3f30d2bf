"""The `tensorrt` backend: deserialize a plan, bind torch CUDA buffers, execute_async_v3 on the runner's stream.
TensorRT and torch are imported when a runner is made; building engines and the plugin live in `trt/`.

One execution context (an optimization profile belongs to one context at a time) with buffers per batch
size. With `cuda_graph=True` each batch size gets its own CUDA graph, captured after the context's input shape
and tensor addresses were set for that size; a replay needs nothing of the context's current shape (the
graph holds the kernels' shapes and addresses; the context's device memory is allocated once, for the
largest profile shape), so graphs of different sizes can alternate. Replays run on the runner's stream.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from ..contract import INPUT_NAME
from ..errors import EdetError
from ..io import existing_file
from ..metadata import read_metadata
from .base import Runner, register_runner


@register_runner
class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, cuda_graph: bool = False, verbose: bool = False):
        from ..trt import require_tensorrt
        from ..trt.builder import check_plan_matches_machine, trt_logger
        from ..trt.plugin import register

        trt = require_tensorrt()
        import torch

        path = existing_file(engine_path, "engine")
        if not torch.cuda.is_available():
            raise EdetError("the tensorrt backend needs a CUDA GPU")
        meta = read_metadata(path)
        check_plan_matches_machine(meta)
        super().__init__(meta)
        # An AOT engine needs no registered creator; registering keeps engines built with the JIT
        # implementation (debugging) loadable too.
        register()
        self.torch, self.trt = torch, trt
        self.logger = trt_logger(trt, verbose)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EdetError(f"TensorRT could not deserialize {path} (see the log above)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.use_cuda_graph = cuda_graph
        self._buffers: Dict[int, Dict[str, Any]] = {}
        self._graphs: Dict[int, Any] = {}
        self._bound = 0  # the batch size the context's shape and addresses are set for
        self._dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                        trt.uint8: torch.uint8, trt.int64: torch.int64}

    @property
    def batch_profile(self) -> tuple:
        lo, opt, hi = (self.metadata.get("tensorrt") or {}).get("batch_profile") or (1, self.max_batch, self.max_batch)
        return int(lo), int(opt), int(hi)

    def _bind(self, batch: int) -> Dict[str, Any]:
        """Set the context's input shape and tensor addresses for `batch` (buffers made once per size)."""
        torch, s = self.torch, self.image_size
        if not self.context.set_input_shape(INPUT_NAME, (batch, s, s, 3)):
            lo, _, hi = self.batch_profile
            raise EdetError(f"batch {batch} is outside the engine's optimization profile {lo}..{hi}; rebuild with "
                            f"`edet-deploy build --batch MIN:OPT:MAX`")
        bufs = self._buffers.get(batch)
        if bufs is None:
            bufs = {INPUT_NAME: torch.empty((batch, s, s, 3), dtype=torch.uint8, device="cuda")}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                bufs[name] = torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)],
                                         device="cuda")
            self._buffers[batch] = bufs
        for name, t in bufs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self._bound = batch
        return bufs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EdetError("TensorRT execution failed (see the log above)")

    def _run(self, batch: int) -> None:
        """Run the engine on the buffers of `batch` (already filled), on the runner's stream."""
        torch = self.torch
        if not self.use_cuda_graph:
            if self._bound != batch:
                self._bind(batch)
            self._execute()
            return
        graph = self._graphs.get(batch)
        if graph is None:
            self._bind(batch)
            self._execute()  # warm-up outside capture: lazy allocations, plugin setup
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._execute()
            self._graphs[batch] = graph
        graph.replay()

    def _input(self, images: np.ndarray) -> Dict[str, Any]:
        """Copy a checked batch into the input buffer of its size."""
        b = images.shape[0]
        bufs = self._buffers.get(b) or self._bind(b)
        bufs[INPUT_NAME].copy_(self.torch.from_numpy(images))
        return bufs

    def infer_impl(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            bufs = self._input(images)
            self._run(images.shape[0])
            result = {name: (bufs[name].float() if bufs[name].dtype == torch.float16 else bufs[name]).cpu()
                      for name in self.outputs}
        self.stream.synchronize()
        return {name: t.numpy() for name, t in result.items()}

    def gpu_time_ms(self, images: np.ndarray, iters: int = 50) -> list:
        """GPU-only time per inference: CUDA events around the engine (or its graph) alone, inputs on device."""
        torch = self.torch
        times = []
        with torch.cuda.stream(self.stream):
            self._input(self.check_input(images))
            self._run(images.shape[0])  # captures the graph first when graphs are on
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                self._run(images.shape[0])
                end.record(self.stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
        return times

    def release(self) -> None:
        # The captured graphs and device buffers first, then the context before the engine it came from.
        self._graphs.clear()
        self._buffers.clear()
        del self.context, self.engine

    def plugin_layers(self) -> list:
        """The engine inspector's entries for plugin layers (needs a plan built with detailed profiling)."""
        import json
        self.check_open()
        inspector = self.engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(self.trt.LayerInformationFormat.JSON))
        layers = [json.loads(x) if isinstance(x, str) else x for x in info.get("Layers", [])]
        return [layer for layer in layers if "plugin" in json.dumps(layer).lower()]
