"""ONNX Runtime backend (CPU default). The `edet::soft_nms` node runs through onnxruntime-extensions, whose
Python ops live in the `ai.onnx.contrib` domain: the loader remaps the node's domain in memory, so the file
on disk stays exactly the graph TensorRT consumes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..contract import INPUT_NAME
from ..errors import EdetError
from ..io import load_onnx
from ..metadata import read_metadata
from ..nms import op as nms_op
from ..nms.graph import for_onnxruntime
from .base import Runner, register_runner, trim_heap

_registered = False


def register_soft_nms_op() -> str:
    """Register the Python implementation of `soft_nms` with onnxruntime-extensions (once per process) and
    return the path of the custom-op library to load into a session."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        from ..nms.fast import batched_soft_nms, warmup

        f, i32, i64, s = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
        kinds = {str: s, float: f, int: i64}

        @onnx_op(op_type=nms_op.OP_TYPE, inputs=[f, f, i32], outputs=[i32, f, f, i32],
                 attrs={k: kinds[t] for k, t in nms_op.ATTRIBUTE_TYPES.items()})
        def soft_nms_op(boxes, scores, classes, **attrs):
            attrs["class_agnostic"] = bool(attrs.get("class_agnostic", 0))
            return batched_soft_nms(boxes, scores, classes, **attrs)

        warmup()  # numba compile (or cache load) now, not inside the first request
        _registered = True
    return get_library_path()


def load_for_ort(path: str | os.PathLike):
    """Load an ONNX graph and map our custom op's domain onto the one onnxruntime-extensions serves."""
    return for_onnxruntime(load_onnx(path))


def session_options(threads: Optional[int] = None, spinning: bool = True):
    """`spinning` False: the intra-op threads sleep as soon as a run ends instead of spinning for more work.
    ONNX Runtime's default (spin) burnt 5-16 ms of a core in the 5-20 ms after each D0 run (2-core EPYC), cores
    that the Triton ensemble's other processes (preprocess, postprocess, tritonserver) need meanwhile."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


@register_runner
class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, threads: Optional[int] = None,
                 providers: Optional[list] = None, metadata: Optional[Dict] = None, spinning: bool = True):
        """`spinning`: see `session_options` (the Triton engine turns it off)."""
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise EdetError(f"ONNX graph not found: {path}")
        super().__init__(metadata or read_metadata(path))
        proto, uses_nms = load_for_ort(path)
        so = session_options(threads, spinning)
        if uses_nms:
            so.register_custom_ops_library(register_soft_nms_op())
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), so,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own types for malformed graphs
            raise EdetError(f"ONNX Runtime cannot load {path}: {e}") from None
        del proto  # ONNX Runtime holds its own copy of the graph
        trim_heap()
        self.path = path
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {INPUT_NAME: images})
        return dict(zip(self.output_names, outputs))

    def release(self) -> None:
        del self.session  # ONNX Runtime frees the session's memory with its last reference
