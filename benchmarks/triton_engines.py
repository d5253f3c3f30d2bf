"""Triton load test, once per CPU engine (OpenVINO, OpenVINO in bf16 where the CPU has it, ONNX Runtime): generates the CPU repository
for the bundled D0 model with that engine, starts the embedded server, sends real images (the shapes
validation split) at concurrency 1, 2, 4, 8, 16, and compares with the in-process pipeline of the same backend
on the same images. The ensemble-vs-in-process ratio is measured in alternating blocks, so the shared
CPU's drift hits both sides alike (benchmarks/triton_floor.py sets it beside the floor of any Triton model). Writes JSON, CSV and markdown to
benchmarks/results/triton_engines.*

    python benchmarks/triton_engines.py [--engine-backends openvino,openvino-bf16,onnxruntime] [--requests 20]
    python benchmarks/triton_engines.py --url HOST:PORT --engine-backends openvino   # a server you started
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edet_deploy, also in the stubs
from edet_deploy.measure import CpuPressure, alternating_blocks, machine_info, percentiles  # noqa: E402
from edet_deploy.triton.load import perf_analyzer_command, run_load  # noqa: E402


def stub_memory(server_pid: int) -> dict:
    """Resident memory (MB) of each Python-backend stub the server started, by model (one process per
    instance), read from /proc (the server's children, never `ps` columns)."""
    from edet_deploy.triton.supervisor import child_processes
    mem: dict = {}
    for pid, argv in child_processes(server_pid):
        if not argv or not argv[0].endswith(b"triton_python_backend_stub"):
            continue
        model = next((a.decode().split("/")[-3] for a in argv if a.endswith(b"/1/model.py")), "?")
        mem.setdefault(model, []).append(round(_rss_kb(pid) / 1024, 1))
    return mem


def _rss_kb(pid: int) -> int:
    try:
        return int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS")).split()[1])
    except (OSError, StopIteration):
        return 0


def engine_smaps(server_pid: int, top: int = 8) -> dict:
    """Where the engine stub's resident memory is (MB by mapping: shared libraries by file, the rest as
    anonymous heap), from /proc/PID/smaps: the biggest `top`, the rest summed."""
    from edet_deploy.triton.supervisor import child_processes
    pid = next((p for p, argv in child_processes(server_pid)
                if any(a.endswith(b"_engine/1/model.py") for a in argv)), None)
    if pid is None:
        return {}
    groups: dict = {}
    name = "?"
    try:
        for line in open(f"/proc/{pid}/smaps"):
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                path = parts[5] if len(parts) > 5 else "[anon]"
                name = path.rsplit("/", 1)[-1] if path.startswith("/") else path
                if "site-packages/" in path:  # group a package's libraries under its name
                    name = path.split("site-packages/", 1)[1].split("/", 1)[0]
            elif parts[0] == "Rss:":
                groups[name] = groups.get(name, 0) + int(parts[1])
    except OSError:
        return {}
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    out = {k: round(v / 1024, 1) for k, v in ranked[:top]}
    out["other"] = round(sum(v for _, v in ranked[top:]) / 1024, 1)
    return out


def export_graph(repo: Path, out: Path) -> Path:
    """The graph the repository serves (make repo), else the bundled model exported with a dynamic batch."""
    served = repo / "efficientdet_d0_engine" / "1" / "model.onnx"
    if served.is_file():
        return served
    from edet_deploy.demo import ASSET
    from edet_deploy.export import export_onnx
    path = out / "export" / "efficientdet_d0.onnx"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    return export_onnx("d0", out / "export", weights=str(ASSET), dynamic_batch=8).onnx_path


def interleaved(local, url: str, blobs, n: int, rounds: int = 6) -> dict:
    """In-process pipeline and ensemble at concurrency 1 on the same images, `n` calls each, in alternating
    blocks (`measure.alternating_blocks`)."""
    from edet_deploy.triton.client import TritonDetectorClient
    client = TritonDetectorClient(url, "efficientdet_d0", "grpc")
    for b in blobs[:3]:
        local.detect([b])
        client.detect([b])
    times = alternating_blocks({"local": local.detect, "remote": client.detect}, blobs, n, rounds)
    client.close()
    a, b = percentiles(times["local"]), percentiles(times["remote"])
    return {"in_process": {k: round(v, 2) for k, v in a.items()}, "ensemble_c1": {k: round(v, 2) for k, v in b.items()},
            "ratio_p50": round(b["p50"] / a["p50"], 3)}


def run_backend(engine: str, graph: Path, blobs, args, conc) -> dict:
    """`engine`: a CPU engine backend, or openvino-bf16 (the repository's --precision bf16)."""
    from edet_deploy.detector import Detector
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.measure import free_port
    from edet_deploy.triton.server import TritonServer

    backend, _, precision = engine.partition("-")
    bf16 = precision == "bf16"
    server = None
    if args.url is None:
        repo = generate_repository(Path(args.work) / f"repo_{engine}", variant="d0", onnx=str(graph),
                                   engine_backend=backend, precision="bf16" if bf16 else "fp32")
        server = TritonServer(repo, free_port(), free_port(), free_port(), open_apis=["statistics"],
                              log_file=Path(args.work) / f"tritonserver_{engine}.log").start()
        url = server.grpc_url
    else:
        url = args.url
    try:
        # The in-process side runs the runner as the engine stub does (same precision, same runner options).
        from edet_deploy.backends import create_runner, precision_options
        from edet_deploy.triton.models.engine_onnxruntime import RUNNER_OPTIONS
        options = RUNNER_OPTIONS if backend == "onnxruntime" else {}
        local = Detector(create_runner(backend, onnx_path=str(graph), **precision_options(backend, bf16), **options))
        with CpuPressure() as pressure:
            inter = interleaved(local, url, blobs, args.interleaved)
        inter["cpu_pressure_pct"] = pressure.pct
        local.runner.close()
        rows = []
        for c in conc:  # one level at a time, each with the CPU pressure during it (ours included)
            with CpuPressure() as pressure:
                row = run_load(url, blobs, concurrencies=[c], requests_per_client=args.requests)[0]
            rows.append({**row, "cpu_pressure_pct": pressure.pct})
        stubs = stub_memory(server.proc.pid) if server else {}
        smaps = engine_smaps(server.proc.pid) if server else {}
    finally:
        if server:
            server.stop()
    return {"engine_backend": engine, "url": url, **inter, "load": rows, "stub_rss_mb": stubs,
            "engine_smaps_mb": smaps, "checks": load_checks(rows)}


def load_checks(rows: list) -> dict:
    """Issue #29's bars on one run: p99 <= 3x p50 at every level, img/s never down >10% from one level to the
    next, the top level's img/s >= the first's."""
    tput = [r["throughput_img_s"] for r in rows]
    return {"p99_le_3x_p50": all(r["p99_ms"] <= 3 * r["p50_ms"] for r in rows),
            "no_drop_over_10pct": all(b >= 0.9 * a for a, b in zip(tput, tput[1:])),
            "top_ge_first": tput[-1] >= tput[0]}


def write_csv(path: Path, runs: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["engine_backend", "concurrency", "requests", "errors", "p50_ms", "p90_ms", "p99_ms",
                    "throughput_img_s", "pre_queue_ms", "pre_compute_ms", "engine_queue_ms", "engine_compute_ms",
                    "engine_mean_batch", "post_queue_ms", "post_compute_ms"])
        for backend, run in runs.items():
            for r in run["load"]:
                s = r["server"]
                g = lambda m, k: s.get(f"efficientdet_d0_{m}", {}).get(k, "")  # noqa: E731
                w.writerow([backend, r["concurrency"], r["requests"], r["errors"], r["p50_ms"], r["p90_ms"],
                            r["p99_ms"], r["throughput_img_s"], g("preprocess", "queue_ms"),
                            g("preprocess", "compute_ms"), g("engine", "queue_ms"), g("engine", "compute_ms"),
                            g("engine", "mean_batch"), g("postprocess", "queue_ms"), g("postprocess", "compute_ms")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="model_repository", help="its engine's model.onnx is served, if present")
    ap.add_argument("--engine-backends", default="openvino,openvino-bf16,onnxruntime",
                    help="openvino | openvino-bf16 (left out on CPUs without bf16) | onnxruntime")
    ap.add_argument("--url", help="use a running server (grpc host:port; one engine backend) instead of starting one")
    ap.add_argument("--images", default="build/shapes", help="COCO-format dataset whose val images are sent")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client per concurrency level")
    ap.add_argument("--interleaved", type=int, default=120, help="in-process/ensemble calls each for the c=1 ratio")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--work", default="build/triton_engines", help="generated repositories and server logs")
    ap.add_argument("--out", default="benchmarks/results/triton_engines")
    args = ap.parse_args(argv)

    from edet_deploy.data import CocoDataset, generate_shapes

    from edet_deploy.backends.openvino import cpu_has_bf16
    backends = [b.strip() for b in args.engine_backends.split(",") if b.strip()]
    if "openvino-bf16" in backends and not cpu_has_bf16():
        print("openvino-bf16 left out: this CPU has no bf16 instructions", file=sys.stderr)
        backends.remove("openvino-bf16")
    if args.url and len(backends) != 1:
        ap.error("--url serves one engine: name it with --engine-backends")
    if not Path(args.images).exists():
        generate_shapes(args.images, {"val": args.num_images}, progress=False)
    ds = CocoDataset(args.images, "val")
    blobs = [ds.image_path(i).read_bytes() for i in range(min(args.num_images, len(ds)))]
    conc = [int(c) for c in args.concurrency.split(",")]
    graph = export_graph(Path(args.repo), Path(args.work))
    runs = {b: run_backend(b, graph, blobs, args, conc) for b in backends}
    report = {"machine": machine_info(None), "protocol": "grpc", "images": len(blobs), "graph": str(graph),
              "runs": runs,
              "perf_analyzer_equivalent": perf_analyzer_command("efficientdet_d0", "HOST:PORT", "grpc", conc)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_csv(out.with_suffix(".csv"), runs)
    m = report["machine"]
    lines = [f"# Triton load test (embedded tritonserver on CPU)\n",
             f"Machine: {m['cpu']}, {m['cores']} cores shared with other work, no GPU; {m['date']}. Ensemble "
             f"efficientdet_d0 (bundled D0, 256 px) over gRPC, {len(blobs)} real images, closed loop, "
             f"{args.requests} requests per client; one run per CPU engine backend. Other work may have shared the "
             "machine: the CPU pressure columns say how much (rerun quietly with `python benchmarks/triton_engines.py`).\n",
             "Ensemble at concurrency 1 vs the in-process pipeline of the same backend (decode + letterbox + graph + "
             f"soft-NMS + mapping), {args.interleaved} calls each in 6 alternating blocks per side, p50:\n",
             "| engine backend | in-process p50 ms | ensemble c=1 p50 ms | ensemble / in-process | CPU pressure % |",
             "|---|---:|---:|---:|---:|"]
    for b, run in runs.items():
        lines.append(f"| {b} | {run['in_process']['p50']:.1f} | {run['ensemble_c1']['p50']:.1f} | "
                     f"**{run['ratio_p50']:.2f}x** | {run['cpu_pressure_pct']} |")
    lines += ["", "CPU pressure = share of the block's wall time in which some task waited for a core (Linux PSI), "
              "our own server and clients included: at c>=2 they load both cores by design, so only the c=1 and "
              "in-process blocks say how busy the machine was otherwise."]
    for b, run in runs.items():
        lines += ["", f"## Engine: {b}\n",
                  "| concurrency | requests | errors | p50 ms | p90 ms | p99 ms | img/s | engine queue ms | engine compute ms "
                  "| engine mean batch | preprocess ms | postprocess ms | CPU pressure % |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in run["load"]:
            s = r["server"]
            e, p, q = (s.get(f"efficientdet_d0_{k}", {}) for k in ("engine", "preprocess", "postprocess"))
            lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p90_ms']} | "
                         f"{r['p99_ms']} | {r['throughput_img_s']} | {e.get('queue_ms', '')} | "
                         f"{e.get('compute_ms', '')} | {e.get('mean_batch', '')} | {p.get('compute_ms', '')} | "
                         f"{q.get('compute_ms', '')} | {r['cpu_pressure_pct']} |")
        lines += ["", "Issue #29's bars in this run: " + ", ".join(f"{k} **{'yes' if v else 'NO'}**"
                                                                 for k, v in run["checks"].items()),
                  "", "Resident memory of the Python-backend stubs (MB, one process per instance): " +
                  "; ".join(f"{k}: {v}" for k, v in run["stub_rss_mb"].items()),
                  "", "Engine stub resident memory by mapping (MB, /proc/PID/smaps): " +
                  ", ".join(f"{k} {v}" for k, v in run["engine_smaps_mb"].items())]
    lines += ["", f"Where perf_analyzer runs: `{report['perf_analyzer_equivalent']}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
