"""Overload with and without the engine's queue policy, in one run, on the embedded CPU server:

  * "before": the engine's dynamic batching with no queue policy (every request queues, however long),
  * "after":  the default policy (edet_deploy/triton/configs.py: ENGINE_QUEUE_BATCHES full batches at most,
    ENGINE_QUEUE_TIMEOUT_US["cpu"], then a fast UNAVAILABLE rejection the client may retry).

The saturating concurrency is found on "before" (the smallest of 1, 2, 4, 8 whose throughput reaches 90% of the
best); both servers are then loaded at twice that, and at four times (closed loop, gRPC straight to Triton, real
JPEG scenes).
Reports p50/p99 of answered requests, the rejection rate and how long a rejection took, with the CPU pressure
(PSI) of each block: this machine is shared. Writes benchmarks/results/triton_overload.{json,md}.

    python benchmarks/triton_overload.py [--onnx graph.onnx] [--requests 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edet_deploy.measure import CpuPressure, free_port, machine_info
from edet_deploy.triton import configs
from edet_deploy.triton.load import run_load

MODEL = "efficientdet_d0"
WEIGHTS = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"


def loaded(repo: Path, log: Path, blobs: list, plan: list) -> dict:
    """Serve `repo`, warm it, run each (label, concurrencies, requests) of `plan`: {label: (rows, psi %)}."""
    from edet_deploy.triton.server import TritonServer

    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=log, open_apis=["statistics"]).start()
    out = {}
    try:
        run_load(server.grpc_url, blobs, MODEL, concurrencies=[2], requests_per_client=3)  # warm-up, not kept
        for label, conc, n in plan:
            with CpuPressure() as psi:
                rows = run_load(server.grpc_url, blobs, MODEL, concurrencies=conc, requests_per_client=n)
            out[label] = (rows, psi.pct)
    finally:
        server.stop()
    return out


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
    ap.add_argument("--requests", type=int, default=30, help="requests per client")
    ap.add_argument("--out", default="benchmarks/results/triton_overload")
    args = ap.parse_args(argv)

    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.tuning import default_tuning_images

    blobs = default_tuning_images(16)
    policy = configs.ENGINE_QUEUE_BATCHES
    with tempfile.TemporaryDirectory(prefix="edet-overload-") as tmp:
        tmp = Path(tmp)
        onnx = args.onnx
        if not onnx:
            from edet_deploy.export import export_onnx
            onnx = str(export_onnx("d0", tmp / "export", weights=str(WEIGHTS), dynamic_batch=8).onnx_path)
        repos = {}
        for label, batches in (("before", 0), ("after", policy)):
            configs.ENGINE_QUEUE_BATCHES = batches  # read when the configs are built
            repos[label] = generate_repository(tmp / label, onnx=onnx, target="cpu", max_batch_size=8,
                                               tuning_images=blobs[:2])
        configs.ENGINE_QUEUE_BATCHES = policy

        sweep = loaded(repos["before"], tmp / "sweep.log", blobs, [("sweep", [1, 2, 4, 8], args.requests)])
        rows = sweep["sweep"][0]
        best = max(r["throughput_img_s"] for r in rows)
        saturating = next(r["concurrency"] for r in rows if r["throughput_img_s"] >= 0.9 * best)
        overloads = [2 * saturating, 4 * saturating]
        result = {}
        for label in ("before", "after"):
            got = loaded(repos[label], tmp / f"{label}.log", blobs,
                         [(f"{label} {k}", [k], args.requests) for k in overloads])
            result[label] = [{**summary(rows_[0]), "cpu_pressure_pct": psi} for rows_, psi in got.values()]
    report = {"machine": machine_info(None), "protocol": "grpc", "images": len(blobs),
              "policy": {"max_queue_size": policy * 8, "default_timeout_us": configs.ENGINE_QUEUE_TIMEOUT_US["cpu"],
                         "max_batch_size": 8},
              "sweep": [{"concurrency": r["concurrency"], "throughput_img_s": r["throughput_img_s"],
                         "p99_ms": r["p99_ms"]} for r in rows],
              "sweep_cpu_pressure_pct": sweep["sweep"][1], "saturating_concurrency": saturating,
              "overload_concurrencies": overloads, "results": result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = ["# Overload: the engine's queue policy, before / after (embedded tritonserver on CPU)", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, shared with other jobs (CPU pressure = PSI 'some' "
             f"share of each block's wall time); {len(blobs)} JPEG scenes, gRPC, closed loop, {args.requests} "
             "requests per client; every number from this one run.", "",
             f"Saturation sweep (no policy): " + ", ".join(f"c{r['concurrency']} {r['throughput_img_s']} img/s"
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
    first = next((r["first_error"] for r in result["after"] if r["first_error"]), None)
    if first:
        lines += ["", f"A rejection reads: `{first}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
