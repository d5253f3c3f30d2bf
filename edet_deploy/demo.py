"""`edet-deploy demo` (`make demo`): the main job end to end on this machine's CPU - the bundled shapes model
exported to ONNX, checked for TensorRT, run in-process with the CPU default backend (OpenVINO; checked against
ONNX Runtime, the reference runner of the exact TensorRT graph), then served by the real Triton server and
queried over HTTP and gRPC."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .contract import artifact_name

ASSET = Path(__file__).parent / "assets" / "shapes_d0.safetensors"


def run_demo(model: str, out: Path) -> int:
    from .backends import DEFAULT_CPU_BACKEND, REFERENCE_BACKEND
    from .data import sample_image
    from .detector import Detector
    from .export import export_onnx
    from .trt.check import check_trt_compat
    from .model.weights import checkpoint_metadata
    from .visualize import draw_detections

    weights = str(ASSET) if model == "d0" and ASSET.is_file() else None
    meta = checkpoint_metadata(weights) if weights else {}
    if weights:
        print(f"== model: bundled {model} trained on generated shapes ({', '.join(meta['class_names'])}); "
              f"input {meta['image_size']}, val mAP {meta.get('val_mAP', float('nan')):.3f}")
    else:
        print(f"== model: {model} with random weights (no bundled weights for it): detections are not meaningful")
    print(f"== 1. export to ONNX (uint8 NHWC input, soft-NMS node inside, dynamic batch up to 8)")
    t = time.perf_counter()
    res = export_onnx(model, out / "onnx", weights=weights, dynamic_batch=8)
    print(f"   {res.onnx_path} ({res.onnx_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    findings = check_trt_compat(res.onnx_path)
    print(f"== 2. TensorRT parseability check: {'nothing TensorRT would reject' if not findings else findings}")
    images = [sample_image(out / f"scene_{i}.jpg", seed=i, size=size)
              for i, size in enumerate([(480, 640), (600, 400)])]
    print(f"== 3. in-process detection with {DEFAULT_CPU_BACKEND} (CPU default) on "
          f"{', '.join(str(p) for p in images)}")
    det = Detector.from_onnx(res.onnx_path, backend=DEFAULT_CPU_BACKEND, min_score=0.4)
    local = det.detect(images)
    if DEFAULT_CPU_BACKEND != REFERENCE_BACKEND:
        ref = Detector.from_onnx(res.onnx_path, backend=REFERENCE_BACKEND, min_score=0.4).detect(images)
        same = all(len(a) == len(b) and (a.classes == b.classes).all() and np.allclose(a.scores, b.scores, atol=1e-4)
                   and np.allclose(a.boxes, b.boxes, atol=0.05) for a, b in zip(local, ref))
        print(f"   {'same' if same else 'DIFFERENT'} detections as ONNX Runtime (the reference runner of the graph)")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        det.detect(images[:1])
        times.append(time.perf_counter() - t)
    for path, d in zip(images, local):
        print(f"   {path.name}: {len(d)} detections >= 0.4")
        for r in d.to_records():
            print(f"     {r['label']:>9s} {r['score']:.3f} {r['box']}")
        drawn = draw_detections(path, d, path.with_name(path.stem + "_detections.png"))
        print(f"     drawn: {drawn}")
    print(f"   end-to-end (decode + letterbox + graph + soft-NMS + mapping) median {np.median(times) * 1000:.0f} ms")
    return _serve_and_query(model, res.onnx_path, images, local, out)


def _serve_and_query(model, onnx_path, images, local, out: Path) -> int:
    from .errors import EdetError
    from .triton.client import TritonDetectorClient
    from .triton.repo import generate_repository
    from .measure import free_port
    from .triton.server import TritonServer

    print("== 4. Triton: generate the ensemble repository and start the embedded tritonserver (CPU)")
    try:
        repo = generate_repository(out / "model_repository", variant=model, onnx=str(onnx_path))
        t = time.perf_counter()
        server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=out / "tritonserver.log")
        server.start()
    except EdetError as e:
        print(f"   Triton step skipped: {e}")
        return 1
    try:
        print(f"   ready in {time.perf_counter() - t:.1f} s: http {server.http_url}, grpc {server.grpc_url}")
        for url, proto in ((server.http_url, "http"), (server.grpc_url, "grpc")):
            client = TritonDetectorClient(url, artifact_name(model), proto)
            remote = client.detect([p.read_bytes() for p in images], min_score=0.4)
            client.close()
            same = all(len(a) == len(b) and np.allclose(a.scores, b.scores, atol=1e-4) for a, b in zip(remote, local))
            print(f"   {proto}: {[len(d) for d in remote]} detections, "
                  f"{'identical to' if same else 'DIFFERENT from'} the in-process result")
    finally:
        server.stop()
    print("   server stopped. Next: `edet-deploy serve --repo model_repository` and `edet-deploy client IMG`.")
    return 0
