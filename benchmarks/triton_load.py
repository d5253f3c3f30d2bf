"""Triton load test: starts the embedded server on a generated CPU repository (or uses --url), sends real
images (the shapes validation split) at concurrency 1, 2, 4, 8, 16, and compares with the in-process pipeline
on the same images. Writes JSON, CSV and markdown to benchmarks/results/triton_load.*

    python benchmarks/triton_load.py [--repo model_repository] [--url HOST:PORT] [--requests 20]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edet_deploy.bench import machine_info, percentiles  # noqa: E402
from edet_deploy.triton.load import perf_analyzer_command, run_load  # noqa: E402


def stub_memory() -> dict:
    """Resident memory (MB) of each Python-backend stub process, by model (one process per instance)."""
    import subprocess
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    mem: dict = {}
    for line in out:
        rss, _, cmd = line.strip().partition(" ")
        if "triton_python_backend_stub" in cmd:
            model = next((part.split("/")[-3] for part in cmd.split() if "/1/model.py" in part), "?")
            mem.setdefault(model, []).append(round(int(rss) / 1024, 1))
    return mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="model_repository")
    ap.add_argument("--url", help="use a running server (grpc host:port) instead of starting one")
    ap.add_argument("--images", default="build/shapes", help="COCO-format dataset whose val images are sent")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client per concurrency level")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--out", default="benchmarks/results/triton_load")
    args = ap.parse_args(argv)

    from edet_deploy.data import CocoDataset, generate_shapes
    from edet_deploy.detector import Detector
    from edet_deploy.triton.server import TritonServer, free_port

    if not Path(args.images).exists():
        generate_shapes(args.images, {"val": args.num_images}, progress=False)
    ds = CocoDataset(args.images, "val")
    blobs = [ds.image_path(i).read_bytes() for i in range(min(args.num_images, len(ds)))]
    conc = [int(c) for c in args.concurrency.split(",")]
    server = None
    if args.url is None:
        # The load test reads the statistics API (restricted by default): open it for this server only.
        server = TritonServer(args.repo, free_port(), free_port(), free_port(), open_apis=["statistics"]).start()
        url = server.grpc_url
    else:
        url = args.url
    try:
        # In-process reference on the same graph and images, measured in the same run.
        engine_dir = Path(args.repo) / "efficientdet_d0_engine" / "1"
        local = Detector.from_onnx(engine_dir / "model.onnx")
        for b in blobs[:3]:
            local.detect([b])
        times = []
        for i in range(max(40, len(blobs))):
            t = time.perf_counter()
            local.detect([blobs[i % len(blobs)]])
            times.append((time.perf_counter() - t) * 1000)
        inproc = percentiles(times)
        rows = run_load(url, blobs, concurrencies=conc, requests_per_client=args.requests)
        stubs = stub_memory()
    finally:
        if server:
            server.stop()
    c1 = next(r for r in rows if r["concurrency"] == 1)
    report = {"machine": machine_info(None), "url": url, "protocol": "grpc", "images": len(blobs),
              "in_process": {k: round(v, 2) for k, v in inproc.items()},
              "ensemble_vs_in_process_p50": round(c1["p50_ms"] / inproc["p50"], 3), "load": rows,
              "stub_rss_mb": stubs,
              "perf_analyzer_equivalent": perf_analyzer_command("efficientdet_d0", url, "grpc", conc)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concurrency", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "throughput_img_s",
                    "pre_queue_ms", "pre_compute_ms", "engine_queue_ms", "engine_compute_ms", "engine_mean_batch",
                    "post_queue_ms", "post_compute_ms"])
        for r in rows:
            s = r["server"]
            g = lambda m, k: s.get(f"efficientdet_d0_{m}", {}).get(k, "")  # noqa: E731
            w.writerow([r["concurrency"], r["requests"], r["errors"], r["p50_ms"], r["p90_ms"], r["p99_ms"],
                        r["throughput_img_s"], g("preprocess", "queue_ms"), g("preprocess", "compute_ms"),
                        g("engine", "queue_ms"), g("engine", "compute_ms"), g("engine", "mean_batch"),
                        g("postprocess", "queue_ms"), g("postprocess", "compute_ms")])
    m = report["machine"]
    lines = [f"# Triton load test (embedded tritonserver on CPU)\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; {m['date']}. Ensemble efficientdet_d0 over gRPC, "
             f"{len(blobs)} real images, closed loop, {args.requests} requests per client.\n",
             f"In-process pipeline (same graph, same images): p50 {inproc['p50']:.1f} ms. Ensemble at concurrency 1: "
             f"p50 {c1['p50_ms']:.1f} ms = **{report['ensemble_vs_in_process_p50']:.2f}x** in-process.\n",
             "| concurrency | requests | errors | p50 ms | p90 ms | p99 ms | img/s | engine queue ms | engine compute ms "
             "| engine mean batch | preprocess ms | postprocess ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["server"]
        e, p, q = (s.get(f"efficientdet_d0_{k}", {}) for k in ("engine", "preprocess", "postprocess"))
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p90_ms']} | "
                     f"{r['p99_ms']} | {r['throughput_img_s']} | {e.get('queue_ms', '')} | {e.get('compute_ms', '')} | "
                     f"{e.get('mean_batch', '')} | {p.get('compute_ms', '')} | {q.get('compute_ms', '')} |")
    lines += ["", "Resident memory of the Python-backend stubs (MB, one process per instance): " +
              "; ".join(f"{k}: {v}" for k, v in stubs.items()),
              "", f"Where perf_analyzer runs: `{report['perf_analyzer_equivalent']}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
