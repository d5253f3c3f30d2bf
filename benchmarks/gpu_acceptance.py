"""Body of benchmarks/gpu_acceptance.sh (see there). Exits non-zero on any failed check."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edet_deploy.backends.onnxrt import OnnxRuntimeRunner  # noqa: E402
from edet_deploy.bench import percentiles  # noqa: E402
from edet_deploy.data import CocoDataset, generate_shapes  # noqa: E402
from edet_deploy.export import export_onnx  # noqa: E402
from edet_deploy.precision.convert import to_fp16, to_int8  # noqa: E402
from edet_deploy.preprocess import preprocess  # noqa: E402
from edet_deploy.trt import require_tensorrt  # noqa: E402

OUT = Path("build/gpu_acceptance")
DEMO = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    return inter / ((a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter + 1e-9)


def main(variants) -> int:
    require_tensorrt()
    from edet_deploy.backends.trt import TensorRTRunner
    from edet_deploy.trt.builder import build_engine

    data = generate_shapes(OUT / "shapes", {"val": 32, "calib": 64}, progress=False)
    val = CocoDataset(data, "val")
    failures = 0
    for v in variants:
        weights = str(DEMO) if v == "d0" and DEMO.is_file() else None
        fp32 = export_onnx(v, OUT / v, weights=weights, dynamic_batch=8).onnx_path
        graphs = {"fp32": fp32, "fp16": to_fp16(fp32).onnx_path,
                  "int8": to_int8(fp32, data, num_images=64).onnx_path}
        ref_runner = OnnxRuntimeRunner(fp32)
        size = ref_runner.image_size
        batch, _, _ = preprocess([val.image_path(i) for i in range(8)], size)
        ref = ref_runner.infer(batch)
        for precision, graph in graphs.items():
            t = time.perf_counter()
            plan = OUT / v / f"{v}_{precision}.plan"
            build_engine(graph, plan, batch="1:8:8")
            runner = TensorRTRunner(plan)
            got = runner.infer(batch)
            ok = True
            for i in range(len(batch)):
                n = min(int(ref["num_detections"][i, 0]), int(got["num_detections"][i, 0]), 20)
                same_cls = np.array_equal(ref["detection_classes"][i, :n], got["detection_classes"][i, :n])
                ious = iou(ref["detection_boxes"][i, :n], got["detection_boxes"][i, :n])
                ok &= bool(same_cls and (n == 0 or ious.min() > 0.98))
            lat = {}
            for b in (1, 8):
                x = batch[:b]
                for _ in range(20):
                    runner.infer(x)
                times = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    runner.infer(x)
                    times.append((time.perf_counter() - t0) * 1000)
                lat[b] = percentiles(times)
            failures += not ok
            print(f"{v} {precision}: build+check {time.perf_counter() - t:.0f}s, matches ORT FP32: {ok}; "
                  f"b1 p50 {lat[1]['p50']:.2f} p90 {lat[1]['p90']:.2f} p99 {lat[1]['p99']:.2f} ms; "
                  f"b8 p50 {lat[8]['p50']:.2f} ms ({8000 / lat[8]['p50']:.0f} img/s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["d0"]))
