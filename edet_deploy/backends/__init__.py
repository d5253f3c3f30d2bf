"""Runtime backends behind one interface (`Runner`). Each runner module registers its runner on import and
imports its runtime (onnxruntime, openvino, torch, tensorrt) only when a runner is made."""
from __future__ import annotations

from typing import Dict, Optional

from ..errors import EdetError
from ..measure import BACKENDS  # the names every runner, bench row and report use, written once
from . import onnxrt, openvino, pytorch, tensorrt  # noqa: F401 - importing a runner module registers its runner
from .base import RUNNERS, Runner

# Runners of the exported ONNX graph on CPU.
CPU_GRAPH_BACKENDS = ("onnxruntime", "openvino")
# What detect / eval / demo and the Triton CPU engine use unless told otherwise: it passes parity with ONNX
# Runtime, is as fast in f32 within 5-17% either way, and its bf16 and INT8 paths are the CPU speed-ups
# (docs/cpu-backends.md).
DEFAULT_CPU_BACKEND = "openvino"
# The runner of a graph exactly as written, Q/DQ included (OpenVINO fuses them into int8 kernels that round
# differently): the parity reference, and what accuracy per precision is measured with.
REFERENCE_BACKEND = "onnxruntime"
# bf16 is a runtime setting on the FP32 graph, and only OpenVINO's CPU plugin has it (whether this CPU has the
# instructions is the runner's check: it needs OpenVINO's core).
BF16_BACKEND = "openvino"


def bf16_options(backend: str, flag: str = "bf16") -> Dict[str, str]:
    """The runner options that run the FP32 graph in bfloat16 on `backend`, or one EdetError line (naming
    `flag`, the option the user gave) when that backend has no bf16."""
    if backend != BF16_BACKEND:
        raise EdetError(f"{flag} runs on the {BF16_BACKEND} backend, not {backend} (bf16 is OpenVINO's: the FP32 "
                        f"graph run in bfloat16)")
    return {"inference_precision": "bf16"}


def precision_options(backend: str, bf16: Optional[bool], flag: str = "bf16") -> Dict[str, Optional[str]]:
    """The runner options for a precision choice: True = bf16 (refused where `backend` has none), False = f32,
    None = the backend's default (OpenVINO: bf16 on CPUs with bf16 instructions, openvino.default_precision)."""
    if bf16:
        return bf16_options(backend, flag)
    if backend != BF16_BACKEND:
        return {}
    return {"inference_precision": None if bf16 is None else "f32"}


def cpu_engine_precision(engine_backend: Optional[str], onnx: Optional[str] = None) -> Optional[str]:
    """The precision a CPU Triton repository runs when none is stated: bf16 for an FP32 graph (`onnx`, None: one
    exported from weights) on the OpenVINO engine where this CPU has bf16 instructions, else None (the graph's).
    The choice and the CPU are logged."""
    from ..log import logger
    from ..metadata import read_metadata
    from .openvino import default_precision, precision_note
    if (engine_backend or DEFAULT_CPU_BACKEND) != BF16_BACKEND:
        return None
    if onnx is not None and read_metadata(onnx).get("precision", "fp32") != "fp32":
        return None
    chosen = default_precision()
    logger.info(precision_note(chosen, stated=False))
    return "bf16" if chosen == "bf16" else None


def create_runner(backend: str, *, onnx_path: Optional[str] = None, engine_path: Optional[str] = None,
                  **options) -> Runner:
    """The runner registered as `backend`: `onnxruntime` / `openvino` need onnx_path, `tensorrt` engine_path,
    `torch` model_name; an option the runner does not take is refused in one line."""
    runner = RUNNERS.get(backend)
    if runner is None:
        raise EdetError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    artifacts = {k: v for k, v in (("onnx_path", onnx_path), ("engine_path", engine_path)) if v is not None}
    return runner.create(**artifacts, **options)


__all__ = ["Runner", "RUNNERS", "create_runner", "bf16_options", "precision_options", "cpu_engine_precision", "BACKENDS", "BF16_BACKEND", "CPU_GRAPH_BACKENDS",
           "DEFAULT_CPU_BACKEND", "REFERENCE_BACKEND"]
