"""Ground floor of every measurement: percentiles, the machine a number was taken on, a free port for a server
under test, and the backends and precisions a benchmark row can name (in report order). Stdlib and numpy only,
so the Triton load test, the benchmarks and the tests can import it without pulling in the bench harness."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
# bf16: the FP32 graph run in bfloat16 by a runtime that offers it (OpenVINO on CPUs with bf16 instructions).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def percentiles(times_ms: Sequence[float]) -> Dict[str, float]:
    """p50/p90/p99/mean/n of latencies: the summary every benchmark reports, computed one way."""
    a = np.asarray(times_ms, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Time a block without the measuring process's own garbage collector in it (what timeit does): a client
    thread's gen-2 collection stops every thread of the process for 40-280 ms (measured in the Triton load test,
    growing with the heap), and that lands on whichever requests are in flight as a p99 the server never caused.
    Collect first, freeze what survives, restore afterwards."""
    enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()



def alternating_blocks(sides: Dict[str, Callable[[list], Any]], inputs: Sequence, calls: int,
                       rounds: int = 6) -> Dict[str, List[float]]:
    """ms per call of each side (called with [one input]), `calls` calls each in `rounds` blocks per side, the
    sides' order reversed every other round, the collector paused: a shared CPU's drift (30% between blocks a
    minute apart on a cloud VM) falls on every side alike. Blocks, not call by call: runtimes keep their worker
    threads spinning for a moment after a call, which would slow whichever side ran next."""
    times: Dict[str, List[float]] = {k: [] for k in sides}
    size = max(1, calls // rounds)
    with gc_paused():
        for r in range(rounds):
            for key in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                for i in range(size):
                    t = time.perf_counter()
                    sides[key]([inputs[i % len(inputs)]])
                    times[key].append((time.perf_counter() - t) * 1000)
    return times

# Share of a run's wall time during which some runnable task waited for a CPU (Linux PSI "some") above which
# its numbers are marked as measured under load: a quiet machine stays near 0, a competing process on a
# 2-core machine pushes it past 50.
LOADED_PSI_PCT = 10.0


def cpu_pressure_total() -> Optional[float]:
    """Microseconds some task has waited for a CPU since boot (/proc/pressure/cpu "some total"); None where the
    kernel has no PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return float(next(x for x in some if x.startswith("total=")).split("=", 1)[1])
    except (OSError, StopIteration, ValueError):
        return None


class CpuPressure:
    """`with CpuPressure() as p: ...` then `p.pct`: the PSI "some" share (%) of the block's wall time, None
    without PSI. Read beside every timing so a number taken on a busy machine says so."""

    def __enter__(self) -> "CpuPressure":
        self.pct: Optional[float] = None
        self._t0, self._p0 = time.monotonic(), cpu_pressure_total()
        return self

    def __exit__(self, *exc) -> None:
        p1, wall = cpu_pressure_total(), time.monotonic() - self._t0
        if self._p0 is not None and p1 is not None and wall > 0:
            self.pct = round(min(100.0, (p1 - self._p0) / 1e4 / wall), 1)


def cpu_flags() -> str:
    """The instruction-set flags a CPU figure depends on (AVX2, AVX-512, VNNI, bf16, AMX), as lscpu names them."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in wanted if f in flags)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(threads: Optional[int]) -> Dict:
    """CPU, cores, threads used, GPU, platform and library versions: a number means little without them."""
    cpu = cpu_name()
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
    return {"cpu": cpu, "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": threads or os.cpu_count(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "edet_deploy": __version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by tests, benchmarks and the demo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
