"""CPU backends head to head: ONNX Runtime FP32 vs OpenVINO FP32 vs OpenVINO BF16 (the FP32 graph run in
bfloat16, on CPUs with bf16 instructions) vs OpenVINO INT8 (the Q/DQ twin), the full detection graph including
soft-NMS, batch 1, interleaved.

A shared CPU's speed moves by 20-40% (sometimes 3x) within a minute; `bench` times
one combination after the other, so a ratio of two of its rows carries that drift. Here every iteration runs
each runner once on the same image, in rotating order, so all of them see the same load and the ratios of the
medians are fair. Writes benchmarks/results/cpu_backends.{json,md}.

    python benchmarks/cpu_backends.py [--models d0-d2] [--iters 30] [--threads 2] [--with-ort-int8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edet_deploy.backends import create_runner
from edet_deploy.backends.openvino import cpu_has_bf16
from edet_deploy.bench import Bench
from edet_deploy.configs import parse_model_list
from edet_deploy.measure import machine_info, percentiles
from edet_deploy.reports import RATIOS


def cpu_flags() -> list:
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                           "amx_int8", "amx_bf16", "amx_tile"))


def openvino_default_precision() -> str:
    import openvino as ov
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def cpu_pressure() -> float:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in percent: how much
    other work competed for the cores during the run (0 = quiet)."""
    try:
        line = next(x for x in open("/proc/pressure/cpu") if x.startswith("some"))
        return float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
    except (OSError, StopIteration, KeyError, ValueError):
        return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="d0-d2")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per runner (after 3 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-ort-int8", action="store_true", help="also ONNX Runtime INT8 (slow on CPU)")
    ap.add_argument("--graphs", default="build/bench", help="where graphs are exported / reused (bench's layout)")
    ap.add_argument("--out", default="benchmarks/results/cpu_backends")
    args = ap.parse_args(argv)

    bench = Bench(Path(args.graphs), threads=args.threads)
    combos = [("onnxruntime", "fp32"), ("openvino", "fp32")]
    if cpu_has_bf16():
        combos.append(("openvino", "bf16"))
    combos.append(("openvino", "int8"))
    if args.with_ort_int8:
        combos.append(("onnxruntime", "int8"))
    ratios = [(title, a, b) for title, (a, b) in RATIOS if a in combos and b in combos]
    rows = []
    for model in parse_model_list(args.models):
        runners = {}
        for backend, precision in combos:
            graph, options = bench.cpu_graph(model, backend, precision, 1)
            t = time.perf_counter()
            runners[(backend, precision)] = create_runner(backend, onnx_path=str(graph), threads=args.threads,
                                                          **options)
            load_ms = (time.perf_counter() - t) * 1000
            print(f"{model} {backend} {precision}: loaded in {load_ms:.0f} ms", flush=True)
        s = next(iter(runners.values())).image_size
        rng = np.random.default_rng(0)
        inputs = [rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8) for _ in range(4)]
        keys = list(runners)
        times = {k: [] for k in keys}
        for i in range(3 + args.iters):
            order = keys[i % len(keys):] + keys[:i % len(keys)]  # rotate: nobody always runs right after another
            for k in order:
                t = time.perf_counter()
                runners[k].infer(inputs[i % len(inputs)])
                if i >= 3:
                    times[k].append((time.perf_counter() - t) * 1000)
        pressure = cpu_pressure()
        stats = {k: percentiles(v) for k, v in times.items()}
        p50 = {k: stats[k]["p50"] for k in keys}
        row = {"model": model, "image_size": s, "cpu_pressure_avg60": pressure,
               "p50_ms": {f"{b} {p}": round(v, 2) for (b, p), v in p50.items()},
               "p90_ms": {f"{b} {p}": round(stats[k]["p90"], 2) for k, (b, p) in zip(keys, keys)},
               "ratios": {title: round(p50[b] / p50[a], 3) for title, a, b in ratios}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for r in runners.values():
            r.close()
    m = machine_info(args.threads)
    m["cpu_flags"] = cpu_flags()
    # What OpenVINO runs an FP32 graph in when not told: bf16 on CPUs that have it.
    m["openvino_default_inference_precision"] = openvino_default_precision()
    report = {"machine": m, "iters": args.iters, "threads": args.threads, "batch": 1,
              "graph": "full detection graph incl. soft-NMS, random weights, min-max INT8 calibration on 4 images",
              "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    cols = [f"{b} {p}" for b, p in combos]
    lines = ["# CPU backends head to head (interleaved, batch 1, full graph including soft-NMS)\n",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores shared with other work, "
             f"{args.threads} threads; {m['date']}. OpenVINO's default inference precision on this CPU: "
             f"{m['openvino_default_inference_precision']} (every row here names its precision explicitly). Versions: " +
             ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".\n",
             f"Every iteration runs each runner once on the same image (rotating order); {args.iters} iterations; "
             "p50 in ms; ratios > 1 = the first is faster. CPU pressure = % of the last minute in which some task "
             "waited for a core (Linux PSI; 0 = nothing else running), read at the end of each model's loop.\n",
             "| model | input | " + " | ".join(cols) + " | " + " | ".join(t for t, _, _ in ratios) +
             " | CPU pressure |", "|---|---:|" + "---:|" * (len(cols) + len(ratios) + 1)]
    for r in rows:
        lines.append(f"| {r['model'].upper()} | {r['image_size']} | " + " | ".join(f"{r['p50_ms'][c]:.1f}" for c in cols)
                     + " | " + " | ".join(f"{r['ratios'][t]:.2f}x" for t, _, _ in ratios) +
                     f" | {r['cpu_pressure_avg60']:.0f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
