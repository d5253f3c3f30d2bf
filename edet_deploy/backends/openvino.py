"""OpenVINO backend (CPU). Runs the same exported detection graph as every other runtime: the graph is cut in
memory at the inputs of its `edet::soft_nms` node, the network and candidate selection run in OpenVINO, and
the soft-NMS step runs in our fast CPU implementation with the settings read from that node. The file on disk
stays exactly the graph TensorRT consumes.

Nothing compiles inside a request: a dynamic-batch graph is compiled at load as a static batch-1 model (the
latency path; 8-20% faster at batch 1 than the dynamic model) and one model with a bounded dynamic batch
2..max, which runs every other size once at load so its per-shape preparation is done too. Measured on a 2-core
AMD EPYC (docs/cpu-backends.md): this takes about 1 s and half the memory of one static model per size 1..8
(3-5 s, 640 MB), at equal speed from batch 4 up. With a cache directory the compiled models go to disk."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import EdetError, EdetRuntimeError
from ..io import existing_file, load_onnx
from ..log import logger
from ..metadata import read_metadata
from ..nms import op as nms_op
from ..nms.graph import cut_at_nms
from .base import MAX_THREADS, Runner, check_number, register_runner, trim_heap

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# What the network runs in: f32 (the parity reference) or bf16. OpenVINO itself picks bf16 by default on CPUs
# with bf16 instructions (AVX512_BF16, AMX); we ask for it by name so a run's numerics never depend on the CPU.
INFERENCE_PRECISIONS = ("f32", "bf16")
NO_BF16_CPU = "this CPU has no bf16 instructions (AVX512_BF16 or AMX)"


def default_cache_dir() -> Path:
    """Compiled-model cache beside the exports (EDET_DEPLOY_CACHE, else ~/.cache/edet_deploy)."""
    from ..contract import cache_dir
    return cache_dir() / "openvino"


def import_openvino():
    """The openvino module, or one line: not installed, or unable to start here (its import looks the home folder
    up: none for a container's arbitrary uid without HOME)."""
    try:
        import openvino as ov
    except ImportError:
        raise EdetError("the openvino backend needs OpenVINO: pip install openvino") from None
    except RuntimeError as e:
        raise EdetRuntimeError(f"OpenVINO cannot start here: {e} (set HOME to a folder)") from None
    return ov


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (it lists BF16 among its optimization capabilities)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return False
    ov = import_openvino()
    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def default_precision(core=None) -> str:
    """What the network runs in unless told: bf16 on CPUs with bf16 instructions, else f32. bf16 kept the
    accuracy (bundled D0, shapes val 300, AMD EPYC: 0.7538 vs 0.7535 mAP, benchmarks/results/accuracy) and runs
    1.3-1.8x faster; f32 stays the parity reference, asked for by name."""
    return "bf16" if cpu_has_bf16(core) else "f32"


def precision_note(precision: str, stated: bool) -> str:
    """One line naming the precision OpenVINO runs, why, and the CPU (printed once per runner)."""
    from ..measure import cpu_flags, cpu_name
    bf16_flags = [f for f in cpu_flags().split() if "bf16" in f]
    if stated:
        why = "as asked"
    elif precision == "bf16":
        why = f"the default on CPUs with bf16 instructions: {', '.join(bf16_flags) or 'OpenVINO reports BF16'}; " \
              f"ask for f32 for the parity reference"
    else:
        why = f"the default: {NO_BF16_CPU}"
    return f"OpenVINO runs the network in {precision} ({why}) on {cpu_name()}"


@register_runner
class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, onnx_path: str | os.PathLike, threads: Optional[int] = None,
                 cache_dir: Optional[str | os.PathLike] | bool = True, hint: str = "LATENCY",
                 metadata: Optional[Dict] = None, inference_precision: Optional[str] = "f32"):
        """`cache_dir`: True = the default cache, False/None = no cache, or a directory. `threads` sets
        INFERENCE_NUM_THREADS (default: OpenVINO's choice, every core). `inference_precision` "bf16" runs the
        network in bfloat16 (the graph file stays FP32); it needs a CPU with bf16 instructions. None: this
        CPU's default (`default_precision`), as detect / eval run unless told; the choice is logged."""
        ov = import_openvino()
        path = existing_file(onnx_path, "ONNX graph")
        if hint not in HINTS:
            raise EdetError(f"unknown OpenVINO performance hint {hint!r}; choose one of {', '.join(HINTS)}")
        if threads is not None:
            threads = check_number(threads, "threads", 1, MAX_THREADS, integer=True)
        if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
            raise EdetError(f"unknown OpenVINO inference precision {inference_precision!r}; choose one of "
                            f"{', '.join(INFERENCE_PRECISIONS)}")
        super().__init__(metadata or read_metadata(path))
        t0 = time.perf_counter()
        candidate, self.nms, self.candidate_names = cut_at_nms(load_onnx(path))
        self.core = ov.Core()
        stated = inference_precision is not None
        inference_precision = inference_precision or default_precision(self.core)
        if inference_precision == "bf16" and not cpu_has_bf16(self.core):
            raise EdetError(f"bf16: {NO_BF16_CPU} (OpenVINO reports none): run f32 instead")
        logger.info(precision_note(inference_precision, stated))
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
        del candidate  # the ONNX protobuf: OpenVINO has its own copy now
        self.config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": inference_precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.path = path
        self.compile_count = 0  # compile_model calls (cache loads included): all made here, none per request
        self._compiled: Dict[int, tuple] = {}
        self._lock = threading.Lock()
        if self.nms is not None:
            from ..nms.fast import warmup
            warmup()  # numba compile (or cache load) now, not inside the first request
        self._compile_all()
        # Every size is compiled: the source model (its own copy of the weights, 23 MB for D0) is not needed
        # again, and what compiling freed goes back to the OS.
        del self.model
        trim_heap()
        self.load_ms = (time.perf_counter() - t0) * 1000

    def _compile(self, batch):
        """One compiled model and its infer request for `batch` (an int, or an ov.Dimension range)."""
        model = self.model.clone()
        s = self.image_size
        model.reshape({model.inputs[0]: [batch, s, s, 3]})
        self.compile_count += 1
        try:
            compiled = self.core.compile_model(model, "CPU", self.config)
        except Exception as e:  # noqa: BLE001
            raise EdetError(f"OpenVINO cannot compile {self.path}: {e}") from None
        return compiled, compiled.create_infer_request()

    def _compile_all(self) -> None:
        """Every batch size the runner accepts, ready now: a fixed-batch graph as it is; a dynamic one as a static
        batch-1 model plus one bounded-dynamic model for 2..max, each of those sizes run once (zeros) so that
        OpenVINO's per-shape preparation (30-60 ms a size) is not paid by a live request either."""
        if not self.dynamic_batch:
            self._compiled[self.max_batch] = self._compile(self.max_batch)
            return
        self._compiled[1] = self._compile(1)
        if self.max_batch < 2:
            return
        ov = import_openvino()
        shared = self._compile(ov.Dimension(2, self.max_batch))
        s = self.image_size
        for b in range(2, self.max_batch + 1):
            shared[1].infer({0: np.zeros((b, s, s, 3), np.uint8)})
            self._compiled[b] = shared

    def _request(self, batch: int):
        """The compiled model and infer request for a batch size (check_input has bounded it)."""
        self.check_open()  # property() comes here without check_input
        return self._compiled[batch]

    @property
    def compiled_batches(self) -> List[int]:
        """The batch sizes ready to run (all of them, from load on)."""
        return sorted(self._compiled)

    @property
    def static_batches(self) -> List[int]:
        """The batch sizes with a static compiled model of their own (the rest share the bounded-dynamic one)."""
        return [b for b, (c, _) in self._compiled.items() if c.inputs[0].get_partial_shape().is_static]

    def property(self, name: str, batch: int = 1):
        """A property of the compiled model for `batch` (e.g. INFERENCE_NUM_THREADS, PERFORMANCE_HINT)."""
        return self._request(batch)[0].get_property(name)

    def candidates(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """The soft_nms node's inputs (or, for a --nms none graph, its outputs), by name."""
        return self._candidates(self.check_input(images))

    def _candidates(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        compiled, request = self._request(images.shape[0])
        # One infer request per compiled model: serialise callers (Triton's model instance already is one caller).
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

    def release(self) -> None:
        self._compiled.clear()
