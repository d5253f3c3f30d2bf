"""`edet-deploy demo` (`make demo`): the whole CPU pipeline end to end, printing what it does."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def sample_image(path: Path, seed: int = 0, size=(480, 640)) -> Path:
    """A synthetic scene of simple shapes (stands in for a photo; no downloads)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    img = Image.fromarray((rng.normal(120, 20, (h, w, 3)).clip(0, 255)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, r = rng.integers(40, w - 40), rng.integers(40, h - 40), rng.integers(20, 60)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def run_demo(model: str, out: Path) -> int:
    from .detector import Detector
    from .export import export_onnx
    from .export.trt_check import check_trt_compat
    from .visualize import draw_detections

    print(f"== 1. export {model} to ONNX (soft-NMS node inside)")
    t = time.perf_counter()
    res = export_onnx(model, out / "onnx")
    print(f"   {res.onnx_path} ({res.onnx_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    findings = check_trt_compat(res.onnx_path)
    print(f"== 2. TensorRT parseability check: {'clean' if not findings else findings}")
    image = sample_image(out / "sample.jpg")
    print(f"== 3. detect on {image} with ONNX Runtime (CPU)")
    det = Detector.from_onnx(res.onnx_path, min_score=0.3)
    results = det.detect([image])
    times = []
    for _ in range(5):
        t = time.perf_counter()
        det.detect([image])
        times.append(time.perf_counter() - t)
    for r in results[0].to_records()[:10]:
        print(f"   {r['label']:>10s} {r['score']:.3f} {r['box']}")
    print(f"   {len(results[0])} detections >= 0.3; end-to-end median {np.median(times) * 1000:.1f} ms")
    draw_detections(image, results[0], out / "sample_detections.png")
    print(f"   drew {out / 'sample_detections.png'}")
    print("note: random weights until a trained model is bundled; detections are not meaningful yet")
    return 0
