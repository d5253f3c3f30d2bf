"""Triton load test, all in one run: the in-process pipeline, then the embedded server on CPU with

  * "before": preferred_batch_size [1, 2, 4, 8] with a 500 us window on the engine and on pre/post, the
    configuration the default is compared against,
  * "after":  no preferred sizes, the engine's window swept over --delays (the default marked), pre/post 0 us,

each at concurrency 1, 2, 4, 8, 16 with real images (the shapes validation split), reporting the mean engine
batch per concurrency; then, on the default "after" configuration, the decoded-image input (client decodes,
server only letterboxes) against JPEG-in at concurrency 1 and 16. Writes benchmarks/results/triton_load.*

    python benchmarks/triton_load.py [--repo model_repository] [--requests 20] [--delays 0,1000,2000,4000]

The ONNX graph is the one `make repo` puts in model_repository/efficientdet_d0_engine/1/.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from edet_deploy.measure import machine_info, percentiles
from edet_deploy.triton.load import perf_analyzer_command, run_load
from edet_deploy.triton.configs import ENGINE_QUEUE_DELAY_US
from edet_deploy.triton.tuning import perf_input_path

DEFAULT_DELAY_US = ENGINE_QUEUE_DELAY_US["cpu"]  # this benchmark serves the CPU repository

MODEL = "efficientdet_d0"


def stub_memory(repo: Path) -> dict:
    """Resident memory (MB) of each Python-backend stub process of `repo`'s server (other servers on a shared
    machine excluded), by model (one process per instance)."""
    import subprocess
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    mem: dict = {}
    for line in out:
        rss, _, cmd = line.strip().partition(" ")
        if "triton_python_backend_stub" in cmd and str(Path(repo).resolve()) in cmd:
            model = next((part.split("/")[-3] for part in cmd.split() if "/1/model.py" in part), "?")
            mem.setdefault(model, []).append(round(int(rss) / 1024, 1))
    return mem


def in_process_p50(local, blobs, n: int = 30) -> dict:
    times = []
    for i in range(n):
        t = time.perf_counter()
        local.detect([blobs[i % len(blobs)]])
        times.append((time.perf_counter() - t) * 1000)
    return percentiles(times)


def serve_and_load(repo: Path, runs: list, log: Path, local, blobs) -> tuple:
    """Start a server on `repo`, measure the in-process pipeline while it idles (the shared CPU's load drifts:
    the concurrency-1 ratio compares numbers taken a minute, not a quarter of an hour, apart), run each
    (label, kwargs) load, stop. Returns ({label: rows}, in-process percentiles, stub memory)."""
    from edet_deploy.measure import free_port
    from edet_deploy.triton.server import TritonServer

    # the load test reads the statistics API (restricted by default): open it for this server only
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=log, open_apis=["statistics"]).start()
    try:
        for _, kw in runs:  # warm every stub (first requests import decoders, fill caches): not measured
            run_load(server.grpc_url, **{**kw, "concurrencies": [2], "requests_per_client": 3})
        inproc = in_process_p50(local, blobs)
        out = {label: run_load(server.grpc_url, **kw) for label, kw in runs}
        mem = stub_memory(repo)
    finally:
        server.stop()
    return out, inproc, mem


def engine(row: dict, key: str):
    return row["server"].get(f"{MODEL}_engine", {}).get(key, "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="model_repository", help="repository whose ONNX graph is served")
    ap.add_argument("--images", default="build/shapes", help="COCO-format dataset whose val images are sent")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client per concurrency level")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--delays", default="0,1000,2000,4000", help="engine windows (us) tried without preferred sizes")
    ap.add_argument("--out", default="benchmarks/results/triton_load")
    args = ap.parse_args(argv)

    from edet_deploy.data import CocoDataset, generate_shapes
    from edet_deploy.detector import Detector
    from edet_deploy.errors import EdetError
    from edet_deploy.preprocess import decode_image
    from edet_deploy.triton.repo import generate_repository

    onnx = Path(args.repo) / f"{MODEL}_engine" / "1" / "model.onnx"
    if not onnx.is_file():
        raise EdetError(f"{onnx} is missing: run `make repo` first")
    if not Path(args.images).exists():
        generate_shapes(args.images, {"val": args.num_images}, progress=False)
    ds = CocoDataset(args.images, "val")
    blobs = [ds.image_path(i).read_bytes() for i in range(min(args.num_images, len(ds)))]
    decoded = [decode_image(b) for b in blobs]  # the decoded-input client's frames, decoded ahead of time
    conc = [int(c) for c in args.concurrency.split(",")]
    delays = sorted({int(d) for d in args.delays.split(",")} | {DEFAULT_DELAY_US})
    enc = {"images": blobs, "model": MODEL, "concurrencies": conc, "requests_per_client": args.requests}
    composing = [f"{MODEL}_preprocess", f"{MODEL}_engine", f"{MODEL}_postprocess"]

    # In-process reference on the same graph and images, measured in the same run (beside each server).
    local = Detector.from_onnx(onnx)
    for b in blobs[:3]:
        local.detect([b])

    configs, stubs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plans = [("before", {"preferred_batch_sizes": (1, 2, 4, 8), "queue_delay_us": 500,
                             "stage_queue_delay_us": 500})]
        plans += [(f"after_{d}us", {"queue_delay_us": d}) for d in delays]
        for label, kw in plans:
            default = label == f"after_{DEFAULT_DELAY_US}us"
            formats = ("encoded", "decoded") if default else ("encoded",)
            repo = generate_repository(tmp / label, variant="d0", onnx=str(onnx), input_formats=formats,
                                       tuning_images=blobs[:2], **kw)
            runs = [("encoded", enc)]
            if default:
                runs.append(("decoded", {**enc, "images": decoded, "model": f"{MODEL}_decoded",
                                         "concurrencies": [c for c in (1, 16) if c in conc] or conc[:1],
                                         "input_format": "decoded",
                                         "composing": [f"{MODEL}_preprocess_decoded", *composing[1:]]}))
            print(f"{label}: serving {repo} ...", flush=True)
            rows, inproc, mem = serve_and_load(repo, runs, tmp / f"{label}.log", local, blobs)
            first = next(r for r in rows["encoded"] if r["concurrency"] == conc[0])
            configs[label] = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                              "default": default, "rows": rows["encoded"],
                              "in_process": {k: round(v, 2) for k, v in inproc.items()},
                              "c1_vs_in_process_p50": round(first["p50_ms"] / inproc["p50"], 3)}
            if default:
                configs[label]["decoded_rows"] = rows["decoded"]
                stubs = mem
            for r in rows["encoded"]:
                print(f"  c{r['concurrency']}: p50 {r['p50_ms']} ms, {r['throughput_img_s']} img/s, "
                      f"engine batch {engine(r, 'mean_batch')}, errors {r['errors']}", flush=True)

    chosen = configs[f"after_{DEFAULT_DELAY_US}us"]
    inproc = chosen["in_process"]
    by_c = lambda rows, c: next(r for r in rows if r["concurrency"] == c)  # noqa: E731
    c1 = by_c(chosen["rows"], conc[0])
    # The rule the default follows: the smallest window giving mean engine batch > 1.5 at concurrency 4 with
    # p50 at concurrency 1 within 1.3x of in-process (ratios from this one run).
    ok = [d for d in delays if 4 in conc and 1 in conc
          and (engine(by_c(configs[f"after_{d}us"]["rows"], 4), "mean_batch") or 0) > 1.5
          and configs[f"after_{d}us"]["c1_vs_in_process_p50"] <= 1.3]
    report = {"machine": machine_info(None), "protocol": "grpc", "images": len(blobs),
              "in_process": inproc,
              "engine_queue_delay_us_default": DEFAULT_DELAY_US, "delays_meeting_targets": ok,
              "ensemble_vs_in_process_p50": round(c1["p50_ms"] / inproc["p50"], 3), "configs": configs,
              "load": chosen["rows"], "decoded_vs_encoded": chosen["decoded_rows"], "stub_rss_mb": stubs,
              "perf_analyzer_equivalent": perf_analyzer_command(MODEL, "127.0.0.1:8001", "grpc", conc,
                                                                perf_input_path(args.repo, MODEL))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "input", "concurrency", "requests", "errors", "p50_ms", "p90_ms", "p99_ms",
                    "throughput_img_s", "pre_queue_ms", "pre_compute_ms", "engine_queue_ms", "engine_compute_ms",
                    "engine_mean_batch", "post_queue_ms", "post_compute_ms"])
        for label, cfg in configs.items():
            for inp, rows in (("encoded", cfg["rows"]), ("decoded", cfg.get("decoded_rows", []))):
                for r in rows:
                    s = r["server"]
                    pre = f"{MODEL}_preprocess" + ("_decoded" if inp == "decoded" else "")
                    g = lambda m, k: s.get(m, {}).get(k, "")  # noqa: E731
                    w.writerow([label, inp, r["concurrency"], r["requests"], r["errors"], r["p50_ms"], r["p90_ms"],
                                r["p99_ms"], r["throughput_img_s"], g(pre, "queue_ms"), g(pre, "compute_ms"),
                                g(f"{MODEL}_engine", "queue_ms"), g(f"{MODEL}_engine", "compute_ms"),
                                g(f"{MODEL}_engine", "mean_batch"), g(f"{MODEL}_postprocess", "queue_ms"),
                                g(f"{MODEL}_postprocess", "compute_ms")])

    m = report["machine"]
    labels = list(configs)
    head = lambda lab: "before (preferred 1,2,4,8; 500 us)" if lab == "before" else (  # noqa: E731
        f"after {configs[lab]['settings']['queue_delay_us']} us" + (" (default)" if configs[lab]["default"] else ""))
    lines = ["# Triton load test (embedded tritonserver on CPU)\n",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared, noisy), no GPU; {m['date']}. Ensemble {MODEL} over "
             f"gRPC, {len(blobs)} real images, closed loop, {args.requests} requests per client; every number "
             f"below comes from this one run.\n",
             f"In-process pipeline (same graph, same images, measured beside each server while it idles): p50 "
             f"{inproc['p50']:.1f} ms next to the default configuration, whose p50 at concurrency 1 is "
             f"{c1['p50_ms']:.1f} ms = **{report['ensemble_vs_in_process_p50']:.2f}x** in-process.\n",
             "## Engine batching before / after\n",
             "Mean engine batch (requests per engine execution) at each concurrency. \"before\" is the old config "
             "(preferred_batch_size [1, 2, 4, 8]: batch 1 is always \"preferred\", so the scheduler never waits); "
             "\"after\" has no preferred sizes and the given max_queue_delay_microseconds on the engine, 0 on "
             "pre/post-processing.\n",
             "| concurrency | " + " | ".join(head(lab) for lab in labels) + " |",
             "|---:|" + "---:|" * len(labels)]
    for c in conc:
        lines.append(f"| {c} | " + " | ".join(str(engine(by_c(configs[lab]["rows"], c), "mean_batch"))
                                             for lab in labels) + " |")
    lines += ["", "p50 latency (ms) of the same runs:\n", "| concurrency | " + " | ".join(head(lab) for lab in labels)
              + " |", "|---:|" + "---:|" * len(labels)]
    for c in conc:
        lines.append(f"| {c} | " + " | ".join(str(by_c(configs[lab]["rows"], c)["p50_ms"]) for lab in labels) + " |")
    lines.append("| in-process p50 | " + " | ".join(str(configs[lab]["in_process"]["p50"]) for lab in labels) + " |")
    lines.append("| c1 / in-process | " + " | ".join(f"{configs[lab]['c1_vs_in_process_p50']:.2f}x" for lab in labels)
                 + " |")
    lines += ["", f"Windows meeting both targets (engine batch > 1.5 at concurrency 4, p50 at concurrency 1 <= 1.3x "
              f"in-process): {', '.join(f'{d} us' for d in ok) or 'none in this run'}; the default is "
              f"{DEFAULT_DELAY_US} us (`ENGINE_QUEUE_DELAY_US[\"cpu\"]` in edet_deploy/triton/configs.py).\n",
              "## Default configuration\n",
              "| concurrency | requests | errors | p50 ms | p90 ms | p99 ms | img/s | engine queue ms | engine compute ms "
              "| engine mean batch | preprocess ms | postprocess ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in chosen["rows"]:
        s = r["server"]
        e, p, q = (s.get(f"{MODEL}_{k}", {}) for k in ("engine", "preprocess", "postprocess"))
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p90_ms']} | "
                     f"{r['p99_ms']} | {r['throughput_img_s']} | {e.get('queue_ms', '')} | {e.get('compute_ms', '')} | "
                     f"{e.get('mean_batch', '')} | {p.get('compute_ms', '')} | {q.get('compute_ms', '')} |")
    lines += ["", "## Decoded input vs JPEG-in (default configuration)\n",
              f"`{MODEL}_decoded` takes uint8 RGB [H, W, 3] the client already decoded (frames decoded before the "
              f"run, as a camera pipeline has them); `{MODEL}` takes the JPEG bytes.\n",
              "| concurrency | input | p50 ms | p99 ms | img/s | preprocess compute ms | request bytes (mean) |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    nbytes = {"JPEG": sum(len(b) for b in blobs) / len(blobs), "decoded": sum(d.nbytes for d in decoded) / len(decoded)}
    for c in [r["concurrency"] for r in chosen["decoded_rows"] if r["concurrency"] in conc]:
        for name, rows, pre in (("JPEG", chosen["rows"], f"{MODEL}_preprocess"),
                                ("decoded", chosen["decoded_rows"], f"{MODEL}_preprocess_decoded")):
            r = by_c(rows, c)
            lines.append(f"| {c} | {name} | {r['p50_ms']} | {r['p99_ms']} | {r['throughput_img_s']} | "
                         f"{r['server'].get(pre, {}).get('compute_ms', '')} | {nbytes[name]:.0f} |")
    lines += ["", "Resident memory of the Python-backend stubs (MB, one process per instance): " +
              "; ".join(f"{k}: {v}" for k, v in stubs.items()),
              "", f"Where perf_analyzer runs (input data written by `triton-repo`): `{report['perf_analyzer_equivalent']}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
