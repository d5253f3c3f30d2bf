"""Ground floor of every measurement: percentiles, the machine a number was taken on, a free port for a server
under test, and the backends and precisions a benchmark row can name (in report order). Stdlib and numpy only,
so the Triton load test, the benchmarks and the tests can import it without pulling in the bench harness."""
from __future__ import annotations

import os
import platform
import socket
import time
from typing import Dict, Optional, Sequence

import numpy as np

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
# bf16: the FP32 graph run in bfloat16 by a runtime that offers it (OpenVINO on CPUs with bf16 instructions).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def percentiles(times_ms: Sequence[float]) -> Dict[str, float]:
    """p50/p90/p99/mean/n of latencies: the summary every benchmark reports, computed one way."""
    a = np.asarray(times_ms, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def machine_info(threads: Optional[int]) -> Dict:
    """CPU, cores, threads used, GPU, platform and library versions: a number means little without them."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for mod in ("torch", "onnxruntime", "openvino", "numpy", "onnx", "timm", "tensorrt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent optional libraries are simply not listed
            pass
    from . import __version__
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or os.cpu_count(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "edet_deploy": __version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by tests, benchmarks and the demo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
