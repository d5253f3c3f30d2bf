"""Closed-loop load test of a running Triton ensemble (for machines where perf_analyzer cannot run): a
concurrency sweep with real images, client-side p50/p90/p99 and throughput, errors, and the server-side split
(queue / compute per composing model) from Triton's statistics API."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..contract import member_names
from ..errors import EdetError
from ..measure import gc_paused, percentiles


def _stats(client, models: Sequence[str]) -> Dict[str, Dict[str, int]]:
    out = {}
    for m in models:
        s = client.get_inference_statistics(m)
        st = s["model_stats"][0] if isinstance(s, dict) else s.model_stats[0]
        get = (lambda d, k: int(d[k]["ns"])) if isinstance(s, dict) else (lambda d, k: int(getattr(d, k).ns))
        inf = st["inference_stats"] if isinstance(st, dict) else st.inference_stats
        count = int(st["inference_count"] if isinstance(st, dict) else st.inference_count)
        execs = int(st["execution_count"] if isinstance(st, dict) else st.execution_count)
        out[m] = {"count": count, "executions": execs, "success_ns": get(inf, "success"), "queue_ns": get(inf, "queue"),
                  "compute_input_ns": get(inf, "compute_input"), "compute_infer_ns": get(inf, "compute_infer"),
                  "compute_output_ns": get(inf, "compute_output")}
    return out


def server_split(before: Dict, after: Dict) -> Dict[str, Dict[str, float]]:
    """Per model: mean time in the server, queue and compute time (ms) per request, and the mean batch executed."""
    split = {}
    for m in after:
        n = after[m]["count"] - before[m]["count"]
        e = after[m]["executions"] - before[m]["executions"]
        if n <= 0:
            continue
        d = {k: (after[m][k] - before[m][k]) / n / 1e6 for k in after[m] if k.endswith("_ns")}
        split[m] = {"request_ms": round(d["success_ns"], 3), "queue_ms": round(d["queue_ns"], 3),
                    "compute_ms": round(d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"], 3),
                    "mean_batch": round(n / e, 2) if e else 0.0}
    return split


def run_load(url: str, images: Sequence, model: str = "efficientdet_d0", protocol: str = "grpc",
             concurrencies: Sequence[int] = (1, 2, 4, 8, 16), requests_per_client: int = 20,
             composing: Optional[Sequence[str]] = None, input_format: str = "encoded") -> List[Dict]:
    """images: encoded bytes, or (input_format="decoded") uint8 RGB arrays decoded beforehand."""
    from .client import TritonDetectorClient

    if not images:
        raise EdetError("no images to send")
    probe = TritonDetectorClient(url, model, protocol)
    if not probe.server_ready():
        raise EdetError(f"no ready Triton server at {url} ({protocol})")
    composing = list(composing or member_names(model))
    rows = []
    for conc in concurrencies:
        before = _stats(probe.client, [model, *composing])
        latencies: List[float] = []
        errors: List[str] = []
        error_ms: List[float] = []  # how long a failed request took: a queue-full rejection should be quick
        lock = threading.Lock()

        def worker(k: int) -> None:
            client = TritonDetectorClient(url, model, protocol, input_format=input_format)
            try:
                for i in range(requests_per_client):
                    blob = images[(k * 7 + i) % len(images)]
                    t = time.perf_counter()
                    try:
                        client.detect([blob])
                        with lock:
                            latencies.append((time.perf_counter() - t) * 1000)
                    except EdetError as e:
                        with lock:
                            errors.append(str(e))
                            error_ms.append((time.perf_counter() - t) * 1000)
            finally:
                client.close()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(conc)]
        with gc_paused():
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        after = _stats(probe.client, [model, *composing])
        p = percentiles(latencies) if latencies else {"p50": 0, "p90": 0, "p99": 0, "mean": 0, "n": 0}
        rows.append({"concurrency": conc, "requests": len(latencies) + len(errors), "errors": len(errors),
                     "p50_ms": round(p["p50"], 2), "p90_ms": round(p["p90"], 2), "p99_ms": round(p["p99"], 2),
                     "mean_ms": round(p["mean"], 2), "throughput_img_s": round(len(latencies) / wall, 2),
                     "server": server_split(before, after),
                     # every outcome, answered or refused: what a client waits for either way
                     "outcome_p99_ms": (round(percentiles(latencies + error_ms)["p99"], 2)
                                        if latencies or error_ms else 0),
                     **({"error_p50_ms": round(percentiles(error_ms)["p50"], 2),
                         "error_p99_ms": round(percentiles(error_ms)["p99"], 2), "first_error": errors[0][:200]}
                        if errors else {})})
    probe.close()
    return rows


def perf_analyzer_command(model: str, url: str, protocol: str, concurrencies: Sequence[int],
                          input_data: str | Path = "model_repository/efficientdet_d0.perf_input.json") -> str:
    """The equivalent perf_analyzer run; `input_data` is the JSON `triton-repo` writes beside the models. No -b:
    the ensemble declares max_batch_size 0 and the input data's shapes carry the batch ([1, 1]), so perf_analyzer
    must keep its default batch of 1 (and needs no --shape: every entry states its shape)."""
    return (f"perf_analyzer -m {model} -u {url} -i {protocol} --input-data {input_data} "
            f"--concurrency-range {min(concurrencies)}:{max(concurrencies)}:2 --percentile=99 "
            f"--collect-metrics -f perf.csv")
