"""GPU check that needs no TensorRT: one command on any CUDA GPU with torch and OpenAI Triton, no downloads.

    python benchmarks/gpu_kernels.py [--out benchmarks/results/gpu] [--models d0-d7] [--budget-s 420]
    python benchmarks/gpu_kernels.py --cpu      # small run under the Triton interpreter (what the test runs)

1. The soft-NMS kernel against the CPU reference: hundreds of random cases, every method, class-aware and
   agnostic, N up to 3840, batch 1 and 8 (same kept boxes and classes, scores within 1e-5 relative).
2. Its time with CUDA events (batch 1 and 8, N = 1000 / 3840), beside our numba CPU path on the same inputs.
3. The plugin's JIT implementation body (`jit_soft_nms`) on a side stream, compared with the kernel's result.
4. Eager and CUDA-graph PyTorch latency of D0-D7 (raw network, batch 1, native size) in FP32 and FP16.

Writes gpu_kernels.json and gpu_kernels.md (machine, versions, every number); exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--cpu" in sys.argv:  # Triton decides at import time whether it interprets (CPU tensors) or compiles
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402


def compare(ref, got, rtol=1e-5) -> str:
    """'' when the kernel's outputs equal the reference's (same kept boxes and classes), else what differs."""
    names = ("num_detections", "boxes", "classes")
    for name, r, g in zip(names, (ref[0], ref[1], ref[3]), (got[0], got[1], got[3])):
        if not np.array_equal(np.asarray(r).reshape(-1), np.asarray(g).reshape(-1)):
            return f"{name} differ"
    if not np.allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=rtol, atol=0):
        return f"scores differ (max abs {np.abs(np.asarray(got[2]) - np.asarray(ref[2])).max():.3g})"
    return ""


def kernel_correctness(device: str, count: int, max_n: int, batches, max_detections: int) -> dict:
    import torch

    from edet_deploy.nms import NmsSettings, batched_soft_nms_reference
    from edet_deploy.nms.synthetic import random_cases
    from edet_deploy.kernels.soft_nms import run

    failures, methods, largest = [], {}, 0
    for i, ((boxes, scores, classes), opts) in enumerate(random_cases(7, count, max_n, batches=batches,
                                                                      num_classes=(1, 3, 90),
                                                                      max_detections=max_detections)):
        ref = batched_soft_nms_reference(boxes, scores, classes, **opts)
        b, n = scores.shape
        counts = np.full(b, n, np.int32)
        if n == 0:  # the kernel always gets >= 1 slot; count 0 means empty
            boxes, scores, classes = np.zeros((b, 1, 4), np.float32), np.zeros((b, 1), np.float32), \
                np.zeros((b, 1), np.int32)
        t = [torch.from_numpy(x).to(device) for x in (boxes, scores, classes, counts)]
        s = NmsSettings(opts["method"])
        got = run(*t, method_id=s.method_id, sigma=opts["sigma"], iou_threshold=opts["iou_threshold"],
                  score_threshold=opts["score_threshold"], max_detections=opts["max_detections"],
                  class_agnostic=opts["class_agnostic"])
        why = compare(ref, [x.cpu().numpy() for x in got])
        if why:
            failures.append({"case": i, "n": n, "batch": b, **opts, "why": why})
        methods[opts["method"]] = methods.get(opts["method"], 0) + 1
        largest = max(largest, n)
    return {"cases": count, "per_method": methods, "max_n": largest, "batches": list(batches),
            "failures": failures[:10], "failed": len(failures), "ok": not failures}


def kernel_timing(sizes, batches, repeats: int) -> list:
    import torch

    from edet_deploy.nms import batched_soft_nms
    from edet_deploy.nms.synthetic import clustered_case
    from edet_deploy.kernels.soft_nms import run

    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        for b in batches:
            boxes, scores, classes = clustered_case(rng, b, n, 90)
            t = [torch.from_numpy(x).cuda() for x in (boxes, scores, classes, np.full(b, n, np.int32))]
            kw = dict(method_id=2, sigma=0.5, iou_threshold=0.3, score_threshold=0.001, max_detections=100,
                      class_agnostic=False)
            for _ in range(3):
                run(*t, **kw)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(*t, **kw)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            cpu = []
            for _ in range(max(3, repeats // 10)):
                t0 = time.perf_counter()
                batched_soft_nms(boxes, scores, classes, method="gaussian")
                cpu.append((time.perf_counter() - t0) * 1000)
            gpu_ms, cpu_ms = statistics.median(times), statistics.median(cpu)
            rows.append({"n": n, "batch": b, "gpu_ms": round(gpu_ms, 4), "cpu_numba_ms": round(cpu_ms, 3),
                         "gpu_ms_per_image": round(gpu_ms / b, 4), "cpu_over_gpu": round(cpu_ms / gpu_ms, 1)})
            print(f"  soft-NMS kernel N={n} batch {b}: {gpu_ms:.3f} ms (CUDA events), numba CPU {cpu_ms:.2f} ms",
                  flush=True)
    return rows


def jit_path(device: str) -> dict:
    """The plugin's JIT body on a non-default stream: its outputs must equal the kernel's."""
    import torch

    from edet_deploy.nms import NmsSettings
    from edet_deploy.nms.synthetic import clustered_case
    from edet_deploy.trt.plugin import jit_soft_nms
    from edet_deploy.kernels.soft_nms import run

    rng = np.random.default_rng(5)
    boxes, scores, classes = (torch.from_numpy(x).to(device) for x in clustered_case(rng, 4, 500, 5))
    s = NmsSettings()
    k = s.max_detections
    outs = [torch.full((4, 1), -1, dtype=torch.int32, device=device),
            torch.full((4, k, 4), -1.0, device=device), torch.full((4, k), -1.0, device=device),
            torch.full((4, k), -1, dtype=torch.int32, device=device)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the fills above ran on the default stream
    jit_soft_nms((boxes, scores, classes), outs, s, side.cuda_stream)
    side.synchronize()
    counts = torch.full((4,), 500, dtype=torch.int32, device=device)
    ref = run(boxes, scores, classes, counts, method_id=s.method_id, sigma=s.sigma, iou_threshold=s.iou_threshold,
              score_threshold=s.score_threshold, max_detections=k, class_agnostic=False)
    why = compare([x.cpu().numpy() for x in ref], [x.cpu().numpy() for x in outs])
    return {"ok": not why, "why": why, "detections": [int(x) for x in outs[0].view(-1).cpu()]}


def model_latency(models, image_size=None, repeats: int = 50, budget_s: float = 300.0) -> list:
    import torch

    from edet_deploy import create_model
    from edet_deploy.configs import get_config

    rows, t_start = [], time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in models:
        if time.perf_counter() - t_start > budget_s:
            rows.append({"model": name, "status": f"skipped: time budget {budget_s:.0f} s spent"})
            continue
        size = image_size or get_config(name).image_size
        torch.manual_seed(0)
        model = create_model(name, image_size=size).eval().to(device).to(memory_format=torch.channels_last)
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            if device == "cpu" and dtype == torch.float16:
                continue
            net = model.to(dtype)
            x = torch.randn(1, 3, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
            row = {"model": name, "precision": precision, "image_size": size, "batch": 1}
            with torch.inference_mode():
                for _ in range(3):
                    net(x)
                row["eager_ms"] = _time(lambda: net(x), repeats if device == "cuda" else 2, device)
                if device == "cuda":
                    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):
                            net(static_x)
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                        net(static_x)
                    row["cuda_graph_ms"] = _time(graph.replay, repeats, device)
                    row["graph_speedup"] = round(row["eager_ms"] / row["cuda_graph_ms"], 2)
            row["status"] = "ok"
            rows.append(row)
            print(f"  {name} {precision} @{size}: eager {row['eager_ms']:.2f} ms"
                  + (f", CUDA graph {row['cuda_graph_ms']:.2f} ms" if "cuda_graph_ms" in row else ""), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time(fn, repeats: int, device: str) -> float:
    import torch
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def machine() -> dict:
    import torch
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1))
        try:
            import subprocess
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001 - the driver version is informative only
            pass
    else:
        info["gpu"] = "none (Triton interpreter on CPU)"
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU kernel check ({m.get('gpu')})", "",
             f"torch {m['torch']}, OpenAI Triton {m['triton']}, CUDA {m.get('cuda')}, driver {m.get('driver', '-')}; "
             f"{report['seconds']} s in all.", "",
             f"- soft-NMS kernel vs CPU reference: {report['correctness']['cases'] - report['correctness']['failed']}"
             f"/{report['correctness']['cases']} cases agree (methods {report['correctness']['per_method']}, "
             f"N up to {report['correctness']['max_n']}, batches {report['correctness']['batches']})",
             f"- JIT implementation body on a side stream equals the kernel: {report['jit'].get('ok')}", ""]
    if report["kernel_timing"]:
        lines += ["| N | batch | kernel ms (CUDA events) | ms / image | numba CPU ms | CPU / GPU |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['batch']} | {r['gpu_ms']} | {r['gpu_ms_per_image']} | {r['cpu_numba_ms']} | "
                  f"{r['cpu_over_gpu']}x |" for r in report["kernel_timing"]] + [""]
    if report["models"]:
        lines += ["| model | precision | size | eager ms | CUDA graph ms | graph speed-up |", "|---|---|---:|---:|---:|---:|"]
        for r in report["models"]:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | - | - | {r['status']} | | |")
            else:
                lines.append(f"| {r['model']} | {r['precision']} | {r['image_size']} | {r['eager_ms']} | "
                             f"{r.get('cuda_graph_ms', '-')} | {r.get('graph_speedup', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small run under the Triton interpreter (no GPU)")
    ap.add_argument("--out", default="benchmarks/results/gpu", help="where gpu_kernels.{json,md} go")
    ap.add_argument("--models", default="d0-d7", help="variants for the PyTorch latency part")
    ap.add_argument("--cases", type=int, default=300, help="random soft-NMS cases")
    ap.add_argument("--budget-s", type=float, default=300.0, help="time budget of the model-latency part")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    import torch

    from edet_deploy.configs import parse_model_list
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_kernels.py: no CUDA GPU visible (use --cpu for the interpreter run)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    report = {"machine": machine(), "mode": "cpu-interpreter" if args.cpu else "gpu"}
    print(f"machine: {report['machine']}", flush=True)
    if args.cpu:
        report["correctness"] = kernel_correctness(device, min(args.cases, 24), 40, (1, 8), 20)
        report["kernel_timing"], report["jit"] = [], {"ok": None, "why": "needs a GPU (CUDA streams)"}
        report["models"] = model_latency(parse_model_list("d0")[:1], image_size=256, budget_s=args.budget_s)
    else:
        report["correctness"] = kernel_correctness(device, args.cases, 3840, (1, 8), 100)
        report["kernel_timing"] = kernel_timing((1000, 3840), (1, 8), 100)
        report["jit"] = jit_path(device)
        report["models"] = model_latency(parse_model_list(args.models), budget_s=args.budget_s)
    c = report["correctness"]
    print(f"soft-NMS kernel vs reference: {c['cases'] - c['failed']}/{c['cases']} agree", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kernels.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_kernels.md").write_text(markdown(report))
    print(f"wrote {out}/gpu_kernels.json and gpu_kernels.md ({report['seconds']} s)")
    ok = c["ok"] and report["jit"].get("ok") is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
