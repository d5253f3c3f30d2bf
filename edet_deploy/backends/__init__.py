"""Runtime backends behind one interface (`Runner`). Heavy dependencies are imported by `create_runner`."""
from __future__ import annotations

from typing import Optional

from ..errors import EdetError
from ..measure import BACKENDS  # the names every runner, bench row and report use, written once
from .base import Runner

# Runners of the exported ONNX graph on CPU.
CPU_GRAPH_BACKENDS = ("onnxruntime", "openvino")
# What detect / eval / demo and the Triton CPU engine use unless told otherwise: it passes parity with ONNX
# Runtime, is as fast in f32 within 5-17% either way, and its bf16 and INT8 paths are the CPU speed-ups
# (docs/cpu-backends.md).
DEFAULT_CPU_BACKEND = "openvino"
# The runner of a graph exactly as written, Q/DQ included (OpenVINO fuses them into int8 kernels that round
# differently): the parity reference, and what accuracy per precision is measured with.
REFERENCE_BACKEND = "onnxruntime"


def create_runner(backend: str, *, onnx_path: Optional[str] = None, engine_path: Optional[str] = None,
                  **kwargs) -> Runner:
    """`onnxruntime` / `openvino` (need onnx_path), `torch` (model name / weights kwargs), `tensorrt` (needs
    engine_path)."""
    if backend == "onnxruntime":
        if not onnx_path:
            raise EdetError("the onnxruntime backend needs an ONNX graph (--onnx, or export one first)")
        from .onnxrt import OnnxRuntimeRunner
        return OnnxRuntimeRunner(onnx_path, threads=kwargs.get("threads"))
    if backend == "openvino":
        if not onnx_path:
            raise EdetError("the openvino backend needs an ONNX graph (--onnx, or export one first)")
        from .openvino import OpenVinoRunner
        return OpenVinoRunner(onnx_path, threads=kwargs.get("threads"),
                              **{k: v for k, v in kwargs.items() if k in ("cache_dir", "hint", "inference_precision")})
    if backend == "torch":
        from .pytorch import TorchRunner
        return TorchRunner(**kwargs)
    if backend == "tensorrt":
        if not engine_path:
            raise EdetError("the tensorrt backend needs an engine (--engine, built with `edet-deploy build`)")
        from ..trt.runner import TensorRTRunner
        return TensorRTRunner(engine_path, **{k: v for k, v in kwargs.items() if k in ("cuda_graph", "verbose")})
    raise EdetError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["Runner", "create_runner", "BACKENDS", "CPU_GRAPH_BACKENDS", "DEFAULT_CPU_BACKEND", "REFERENCE_BACKEND"]
