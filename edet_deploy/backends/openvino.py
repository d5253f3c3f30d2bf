"""OpenVINO backend (CPU). Runs the same exported detection graph as every other runtime: the graph is cut in
memory at the inputs of its `edet::soft_nms` node, the network and candidate selection run in OpenVINO, and
the soft-NMS step runs in our fast CPU implementation with the settings read from that node. The file on disk
stays exactly the graph TensorRT consumes.

OpenVINO is fastest with static shapes: a dynamic-batch graph is compiled once per batch size it meets
(batch 1 up front), each compilation kept for the life of the runner and, with a cache directory, on disk."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import EdetError
from ..io import load_onnx
from ..metadata import read_metadata
from ..nms import op as nms_op
from ..nms.graph import cut_at_nms
from .base import Runner, register_runner

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# What the network runs in: f32 (the parity reference) or bf16. OpenVINO itself picks bf16 by default on CPUs
# with bf16 instructions (AVX512_BF16, AMX); we ask for it by name so a run's numerics never depend on the CPU.
INFERENCE_PRECISIONS = ("f32", "bf16")
NO_BF16_CPU = "this CPU has no bf16 instructions (AVX512_BF16 or AMX)"


def default_cache_dir() -> Path:
    """Compiled-model cache beside the exports (EDET_DEPLOY_CACHE, else ~/.cache/edet_deploy)."""
    from ..contract import cache_dir
    return cache_dir() / "openvino"


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (it lists BF16 among its optimization capabilities)."""
    try:
        import openvino as ov
    except ImportError:
        return False
    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@register_runner
class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, onnx_path: str | os.PathLike, threads: Optional[int] = None,
                 cache_dir: Optional[str | os.PathLike] | bool = True, hint: str = "LATENCY",
                 metadata: Optional[Dict] = None, inference_precision: str = "f32"):
        """`cache_dir`: True = the default cache, False/None = no cache, or a directory. `threads` sets
        INFERENCE_NUM_THREADS (default: OpenVINO's choice, every core). `inference_precision` "bf16" runs the
        network in bfloat16 (the graph file stays FP32); it needs a CPU with bf16 instructions."""
        try:
            import openvino as ov
        except ImportError:
            raise EdetError("the openvino backend needs OpenVINO: pip install openvino") from None
        path = Path(onnx_path)
        if not path.is_file():
            raise EdetError(f"ONNX graph not found: {path}")
        if hint not in HINTS:
            raise EdetError(f"unknown OpenVINO performance hint {hint!r}; choose one of {', '.join(HINTS)}")
        if threads is not None and int(threads) < 1:
            raise EdetError(f"threads must be >= 1, got {threads}")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise EdetError(f"unknown OpenVINO inference precision {inference_precision!r}; choose one of "
                            f"{', '.join(INFERENCE_PRECISIONS)}")
        super().__init__(metadata or read_metadata(path))
        t0 = time.perf_counter()
        candidate, self.nms, self.candidate_names = cut_at_nms(load_onnx(path))
        self.core = ov.Core()
        if inference_precision == "bf16" and not cpu_has_bf16(self.core):
            raise EdetError(f"bf16: {NO_BF16_CPU} (OpenVINO reports none): run f32 instead")
        self.inference_precision = inference_precision
        if cache_dir is True:
            cache_dir = default_cache_dir()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(self.cache_dir)})
        try:
            self.model = self.core.read_model(candidate.SerializeToString())
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError for graphs it cannot take
            raise EdetError(f"OpenVINO cannot read {path}: {e}") from None
        self.config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": inference_precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.path = path
        self._compiled: Dict[int, tuple] = {}
        self._lock = threading.Lock()
        if self.nms is not None:
            from ..nms.fast import warmup
            warmup()  # numba compile (or cache load) now, not inside the first request
        self._request(1 if self.dynamic_batch else self.max_batch)
        self.load_ms = (time.perf_counter() - t0) * 1000

    def _request(self, batch: int):
        """The compiled model and infer request for a batch size (static shapes compile to faster code)."""
        entry = self._compiled.get(batch)
        if entry is None:
            with self._lock:
                entry = self._compiled.get(batch)
                if entry is None:
                    model = self.model.clone()
                    s = self.image_size
                    model.reshape({model.inputs[0]: [batch, s, s, 3]})
                    try:
                        compiled = self.core.compile_model(model, "CPU", self.config)
                    except Exception as e:  # noqa: BLE001
                        raise EdetError(f"OpenVINO cannot compile {self.path}: {e}") from None
                    entry = (compiled, compiled.create_infer_request())
                    self._compiled[batch] = entry
        return entry

    @property
    def compiled_batches(self) -> List[int]:
        return sorted(self._compiled)

    def property(self, name: str, batch: int = 1):
        """A property of the compiled model for `batch` (e.g. INFERENCE_NUM_THREADS, PERFORMANCE_HINT)."""
        return self._request(batch)[0].get_property(name)

    def candidates(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """The soft_nms node's inputs (or, for a --nms none graph, its outputs), by name."""
        return self._candidates(self.check_input(images))

    def _candidates(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        compiled, request = self._request(images.shape[0])
        # One infer request per batch size: serialise callers (Triton's model instance already is one caller).
        with self._lock:
            result = request.infer({0: images}, share_inputs=True)
            outs = [result[compiled.outputs[i]] for i in range(len(self.candidate_names))]  # copies
        return dict(zip(self.candidate_names, outs))

    def infer_impl(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        cands = self._candidates(images)
        if self.nms is None:
            return cands
        from ..nms.fast import batched_soft_nms
        boxes, scores, classes = (cands[n] for n in self.candidate_names)
        return dict(zip(nms_op.OUTPUTS, batched_soft_nms(boxes, scores, classes, **self.nms.to_dict())))

    def close(self) -> None:
        self._compiled.clear()
