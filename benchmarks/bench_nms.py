"""Soft-NMS timings: reference, our fast CPU path, effdet's batched_soft_nms and torchvision's hard batched_nms.

Identical inputs per case: clusters of jittered boxes (realistic overlaps), detector-like scores (Beta(0.7, 3)),
90 classes, K = 100, one image, one thread. Prints a markdown table of medians with ratios from the same run
and writes it to benchmarks/results/nms.md (+ .json).

    python benchmarks/bench_nms.py [--sizes 1000,5000] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edet_deploy.nms import batched_soft_nms, batched_soft_nms_reference  # noqa: E402


def make_case(n: int, num_classes: int = 90, seed: int = 0, size: float = 512.0):
    rng = np.random.default_rng(seed)
    k = max(1, n // 10)
    centers = rng.uniform(0, size, (k, 2))
    wh = rng.uniform(10, 200, (k, 2))
    pick = rng.integers(0, k, n)
    c = centers[pick] + rng.normal(0, 6, (n, 2))
    s = wh[pick] * rng.uniform(0.8, 1.2, (n, 2))
    boxes = np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32)
    scores = rng.beta(0.7, 3.0, n).astype(np.float32)
    classes = rng.integers(0, num_classes, n).astype(np.int32)
    return boxes, scores, classes


def median_ms(fn, repeats: int, min_repeats: int = 3, budget_s: float = 20.0) -> float:
    fn()  # warm-up (numba compilation, allocator)
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000", help="candidate counts N (comma separated)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nms"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from effdet.soft_nms import batched_soft_nms as effdet_soft_nms
    from torchvision.ops import batched_nms

    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        boxes, scores, classes = make_case(n)
        tb, ts, tc = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes).long()
        b1, s1, c1 = boxes[None], scores[None], classes[None]
        timings = {
            "reference (numpy loop)": median_ms(lambda: batched_soft_nms_reference(b1, s1, c1), args.repeats),
            "edet-deploy fast CPU (numba)": median_ms(lambda: batched_soft_nms(b1, s1, c1), args.repeats * 5),
            "effdet batched_soft_nms": median_ms(lambda: effdet_soft_nms(tb, ts, tc, method_gaussian=True,
                                                                         sigma=0.5, score_threshold=0.001),
                                                 args.repeats),
            "torchvision batched_nms (hard)": median_ms(lambda: batched_nms(tb, ts, tc, 0.5)[:100],
                                                        args.repeats * 5),
        }
        fast = timings["edet-deploy fast CPU (numba)"]
        for name, ms in timings.items():
            rows.append({"N": n, "K": 100, "implementation": name, "median_ms": round(ms, 4),
                         "time_vs_fast": round(ms / fast, 2)})
            print(f"N={n:5d}  {name:34s} {ms:10.3f} ms   {ms / fast:8.1f}x the fast path", flush=True)

    from edet_deploy.measure import machine_info
    cpu = machine_info(1)["cpu"]
    header = (f"# Soft-NMS timings\n\nMachine: {cpu}, {os.cpu_count()} cores, one thread used; "
              f"{time.strftime('%Y-%m-%d')}. One image, 90 classes, K = 100, gaussian sigma 0.5, score threshold "
              f"0.001; clustered boxes, Beta(0.7, 3) scores. Median of repeated runs; ratios from the same run.\n\n")
    table = "| N | implementation | median ms | x fast path |\n|---:|---|---:|---:|\n" + "".join(
        f"| {r['N']} | {r['implementation']} | {r['median_ms']:.3f} | {r['time_vs_fast']:.1f} |\n" for r in rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + table)
    out.with_suffix(".json").write_text(json.dumps({"machine": cpu, "cores": os.cpu_count(), "threads": 1,
                                                    "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
