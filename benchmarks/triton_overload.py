"""Overload with and without serve's bound on requests in flight, in one run, on the embedded CPU server:

  * "alone": tritonserver alone (gRPC straight to it): every request queues in the engine's dynamic batcher,
    however long,
  * "serve N": `edet-deploy serve --max-in-flight N` (gRPC through its front): at most N inference requests in
    flight, one more gets UNAVAILABLE at once, retryable; N = the default (configs.MAX_IN_FLIGHT) and 24.

The saturating concurrency and throughput are found on "alone" (the smallest of 1, 2, 4, 8 clients whose
throughput reaches 90% of the best). Both then get (real JPEG scenes):
  * closed loop at twice and four times the saturating concurrency (N clients, one request in flight each), and
  * open loop at twice the saturating throughput (requests sent at a fixed rate whatever the answers: the load
    a queue has to absorb, where an unbounded queue grows for as long as it lasts).
Reports p50/p99 of answered requests, the rejection rate and how long a rejection took, with the CPU pressure
(PSI) of each block: this machine is shared. Writes benchmarks/results/triton_overload.{json,md}.

    python benchmarks/triton_overload.py [--onnx graph.onnx] [--requests 30]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from edet_deploy.measure import CpuPressure, free_port, machine_info
from edet_deploy.triton.configs import MAX_IN_FLIGHT
from edet_deploy.triton.load import run_load
from serve_process import serve_process

MODEL = "efficientdet_d0"
WEIGHTS = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"


@contextlib.contextmanager
def grpc_endpoint(repo: Path, log: Path, bound: Optional[int]) -> Iterator[str]:
    """The gRPC address of tritonserver alone on `repo` (bound None), or of `edet-deploy serve --max-in-flight
    bound`'s front."""
    if bound is not None:
        with serve_process(repo, ["--open-api", "statistics", "--log-file", str(log), "--max-in-flight",
                                  str(bound)]) as served:
            yield f"127.0.0.1:{served.grpc_port}"
        return
    from edet_deploy.triton.server import TritonServer

    with TritonServer(repo, free_port(), free_port(), free_port(), log_file=log, open_apis=["statistics"]) as server:
        yield server.grpc_url


def loaded(url: str, blobs: list, plan: list, open_rate: float = 0.0, seconds: float = 10.0) -> dict:
    """Warm the server at `url`, run each (label, concurrencies, requests) of `plan`: {label: (rows, psi %)},
    then (open_rate > 0) the open-loop load: {"open": (summary, psi %)}."""
    out = {}
    run_load(url, blobs, MODEL, concurrencies=[2], requests_per_client=3)  # warm-up, not kept
    for label, conc, n in plan:
        with CpuPressure() as psi:
            rows = run_load(url, blobs, MODEL, concurrencies=conc, requests_per_client=n)
        out[label] = (rows, psi.pct)
    if open_rate:
        with CpuPressure() as psi:
            row = open_loop(url, blobs, open_rate, seconds)
        out["open"] = (row, psi.pct)
    return out


def open_loop(url: str, blobs: list, rate: float, seconds: float) -> dict:
    """Send `rate` requests per second for `seconds` (async gRPC, one image each), whatever the answers; wait for
    every answer. Latencies are from each request's own send time."""
    import threading
    import time

    import numpy as np
    import tritonclient.grpc as tg

    from edet_deploy import contract
    from edet_deploy.measure import percentiles

    client = tg.InferenceServerClient(url)
    done: list = []
    lock = threading.Condition()

    def answered(t0: float, _result, error) -> None:
        with lock:
            done.append((time.perf_counter() - t0, error is None, "" if error is None else error.message()))
            lock.notify()

    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        inp = tg.InferInput(contract.IMAGE, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[blobs[i % len(blobs)]]], dtype=object))
        t0 = time.perf_counter()
        client.async_infer(MODEL, [inp], lambda result, error, t0=t0: answered(t0, result, error))
    sent = time.perf_counter() - start
    with lock:
        lock.wait_for(lambda: len(done) == n, timeout=600)
    client.close()
    ok = [d[0] * 1000 for d in done if d[1]]
    refused = [d[0] * 1000 for d in done if not d[1]]
    pick = lambda v, k: round(percentiles(v)[k], 1) if v else None  # noqa: E731
    return {"rate_req_s": round(rate, 1), "seconds": seconds, "sent_in_s": round(sent, 1), "requests": n,
            "answered": len(ok), "rejected_pct": round(100.0 * len(refused) / n, 1) if n else 0.0,
            "p50_ms": pick(ok, "p50"), "p99_ms": pick(ok, "p99"), "max_ms": round(max(ok), 1) if ok else None,
            "rejection_p50_ms": pick(refused, "p50"), "rejection_p99_ms": pick(refused, "p99"),
            "errors": sorted({d[2].split(", ")[-1][:80] for d in done if not d[1]})}


def summary(row: dict) -> dict:
    n = row["requests"]
    return {"concurrency": row["concurrency"], "requests": n, "answered": n - row["errors"],
            "rejected_pct": round(100.0 * row["errors"] / n, 1) if n else 0.0,
            "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"], "outcome_p99_ms": row["outcome_p99_ms"],
            "throughput_img_s": row["throughput_img_s"],
            "rejection_p50_ms": row.get("error_p50_ms"), "rejection_p99_ms": row.get("error_p99_ms"),
            "first_error": row.get("first_error"),
            "engine_queue_ms": row["server"].get(f"{MODEL}_engine", {}).get("queue_ms")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", help="D0 graph with a dynamic batch >= 8 (default: export the bundled shapes D0)")
    ap.add_argument("--requests", type=int, default=40, help="requests per client (closed loop)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the open-loop load")
    ap.add_argument("--out", default="benchmarks/results/triton_overload")
    args = ap.parse_args(argv)

    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.tuning import default_tuning_images

    blobs = default_tuning_images(16)
    with tempfile.TemporaryDirectory(prefix="edet-overload-") as tmp:
        tmp = Path(tmp)
        onnx = args.onnx
        if not onnx:
            from edet_deploy.export import export_onnx
            onnx = str(export_onnx("d0", tmp / "export", weights=str(WEIGHTS), dynamic_batch=8).onnx_path)
        repo = generate_repository(tmp / "repo", onnx=onnx, target="cpu", max_batch_size=8, tuning_images=blobs[:2])
        variants = {"alone": None, f"serve {MAX_IN_FLIGHT}": MAX_IN_FLIGHT, "serve 24": 24}

        with grpc_endpoint(repo, tmp / "sweep.log", None) as url:
            sweep = loaded(url, blobs, [("sweep", [1, 2, 4, 8], args.requests)])
        rows = sweep["sweep"][0]
        best = max(r["throughput_img_s"] for r in rows)
        saturating = next(r["concurrency"] for r in rows if r["throughput_img_s"] >= 0.9 * best)
        overloads = [2 * saturating, 4 * saturating]
        rate = 2 * best
        result, opened = {}, {}
        for label, bound in variants.items():
            with grpc_endpoint(repo, tmp / f"{label.replace(' ', '_')}.log", bound) as url:
                got = loaded(url, blobs, [(f"{label} {k}", [k], args.requests) for k in overloads], open_rate=rate,
                             seconds=args.seconds)
            row, psi = got.pop("open")
            opened[label] = {**row, "cpu_pressure_pct": psi}
            result[label] = [{**summary(rows_[0]), "cpu_pressure_pct": psi} for rows_, psi in got.values()]
    report = {"machine": machine_info(None), "protocol": "grpc", "images": len(blobs),
              "variants": variants, "max_batch_size": 8,
              "sweep": [{"concurrency": r["concurrency"], "throughput_img_s": r["throughput_img_s"],
                         "p99_ms": r["p99_ms"]} for r in rows],
              "sweep_cpu_pressure_pct": sweep["sweep"][1], "saturating_concurrency": saturating,
              "overload_concurrencies": overloads, "results": result,
              "open_loop": opened}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = ["# Overload: tritonserver alone / behind serve's bound on requests in flight, CPU", "",
             "alone: gRPC straight to tritonserver; serve N: `edet-deploy serve --max-in-flight N`, gRPC through its "
             f"front (N = {MAX_IN_FLIGHT}, the default, and 24).", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, shared with other jobs (CPU pressure = PSI 'some' "
             f"share of each block's wall time); {len(blobs)} JPEG scenes, gRPC, closed loop, {args.requests} "
             "requests per client; every number from this one run.", "",
             f"Saturation sweep (tritonserver alone): " + ", ".join(f"c{r['concurrency']} {r['throughput_img_s']} img/s"
                                                           for r in rows)
             + f" (CPU pressure {sweep['sweep'][1]}%): saturating concurrency {saturating}; overload = "
             f"**{overloads[0]} clients** (2x) and {overloads[1]} (4x).", "",
             "p50/p99: answered requests; outcome p99: every request, answered or rejected (what a client waits for).",
             "",
             "| | clients | answered | rejected | p50 ms | p99 ms | outcome p99 ms | img/s | rejection p50 / p99 ms "
             "| engine queue ms | CPU pressure |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in ((label, r) for label in result for r in result[label]):
        rej = "-" if r["rejection_p50_ms"] is None else f"{r['rejection_p50_ms']} / {r['rejection_p99_ms']}"
        lines.append(f"| {label} | {r['concurrency']} | {r['answered']} | {r['rejected_pct']}% | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['outcome_p99_ms']} | {r['throughput_img_s']} | {rej} | "
                     f"{r['engine_queue_ms']} | {r['cpu_pressure_pct']}% |")
    lines += ["", f"Open loop: {rate:.1f} requests/s (twice the best throughput) for {args.seconds:.0f} s, each "
              "latency from its own send time:", "",
              "| | requests | answered | rejected | p50 ms | p99 ms | max ms | rejection p50 / p99 ms | errors "
              "| CPU pressure |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for label, r in opened.items():
        rej = "-" if r["rejection_p50_ms"] is None else f"{r['rejection_p50_ms']} / {r['rejection_p99_ms']}"
        lines.append(f"| {label} | {r['requests']} | {r['answered']} | {r['rejected_pct']}% | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['max_ms']} | {rej} | {'; '.join(r['errors']) or '-'} | "
                     f"{r['cpu_pressure_pct']}% |")
    first = next((r["first_error"] for rows in result.values() for r in rows if r["first_error"]), None)
    if first:
        lines += ["", f"A rejection reads: `{first}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
