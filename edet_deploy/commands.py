"""Subcommands beyond `models`. Each imports its heavy dependencies inside the handler."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import command
from .errors import EdetError


def add_nms_args(p: argparse.ArgumentParser) -> None:
    from .export.graph import DEFAULT_PRE_NMS_TOP_K
    from .nms import METHODS, NmsSettings
    d = NmsSettings()
    g = p.add_argument_group("soft-NMS (inside the graph)")
    g.add_argument("--nms", default=d.method, choices=[*METHODS, "none"],
                   help="suppression method; 'none' stops the graph at decoded candidates")
    g.add_argument("--sigma", type=float, default=d.sigma, help="gaussian sigma (the paper's, not TF's doubled one)")
    g.add_argument("--iou-threshold", type=float, default=d.iou_threshold, help="IoU threshold of linear / hard")
    g.add_argument("--score-threshold", type=float, default=d.score_threshold)
    g.add_argument("--max-detections", type=int, default=d.max_detections)
    g.add_argument("--class-agnostic", action="store_true", help="let boxes of different classes suppress each other")
    g.add_argument("--pre-nms-top-k", type=int, default=DEFAULT_PRE_NMS_TOP_K,
                   help="candidates kept by TopK before NMS (TensorRT allows at most 3840)")


def nms_settings(args):
    from .nms import NmsSettings
    if args.nms == "none":
        return None
    return NmsSettings(args.nms, args.sigma, args.iou_threshold, args.score_threshold, args.max_detections,
                       args.class_agnostic)


@command("export", "export a variant to an ONNX detection graph (+ metadata JSON)")
def _export(p: argparse.ArgumentParser):
    p.add_argument("--model", default="d0", help="d0..d7, d7x (also efficientdet-d0, tf_efficientdet_d0)")
    p.add_argument("--weights", help="our checkpoint or an effdet .pth/.safetensors (default: random init)")
    p.add_argument("--num-classes", type=int, help="default: from the weights' metadata, else 90 (COCO)")
    p.add_argument("--image-size", type=int, help="input size (default: the variant's, or the weights')")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch", type=int, default=1, help="fixed batch size")
    b.add_argument("--dynamic-batch", type=int, metavar="MAX", help="dynamic batch dimension up to MAX")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--out", default="build/export", help="output directory")
    add_nms_args(p)

    def run(args) -> int:
        from .export import export_onnx
        from .export.trt_check import check_trt_compat
        res = export_onnx(args.model, args.out, weights=args.weights, num_classes=args.num_classes,
                          image_size=args.image_size, batch=args.batch, dynamic_batch=args.dynamic_batch,
                          opset=args.opset, nms=nms_settings(args), pre_nms_top_k=args.pre_nms_top_k)
        problems = check_trt_compat(res.onnx_path)
        print(f"wrote {res.onnx_path} and {res.metadata_path}")
        for f in problems:
            print(f"warning: TensorRT would reject: {f}", file=sys.stderr)
        return 0
    return run


@command("check", "check an ONNX graph for what TensorRT's parser would reject (no TensorRT needed)")
def _check(p: argparse.ArgumentParser):
    p.add_argument("onnx", help="ONNX graph")

    def run(args) -> int:
        from .export.trt_check import check_trt_compat
        path = Path(args.onnx)
        if not path.is_file():
            raise EdetError(f"ONNX graph not found: {path}")
        try:
            findings = check_trt_compat(path)
        except Exception as e:  # noqa: BLE001 - a malformed file is the user's problem
            raise EdetError(f"cannot read {path} as ONNX: {e}") from None
        for f in findings:
            print(f)
        import onnx
        from .nms import op as nms_op
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            if node.domain == nms_op.DOMAIN:
                print(f"plugin node {node.name}: {nms_op.settings_from_node(node).to_dict()}")
        print(f"{path}: {'OK, nothing TensorRT would reject' if not findings else f'{len(findings)} problem(s)'}")
        return 0 if not findings else 1
    return run


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="d0", help="variant (with --weights or random init)")
    p.add_argument("--weights", help="checkpoint (ours or effdet's)")
    p.add_argument("--onnx", help="exported graph (its metadata JSON beside it)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"],
                   help="runtime; onnxruntime exports --model/--weights once into a cache when --onnx is absent")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")


def make_detector(args, min_score: float = 0.0):
    from .detector import Detector
    if args.onnx:
        if args.backend != "onnxruntime":
            raise EdetError("--onnx runs on the onnxruntime backend")
        return Detector.from_onnx(args.onnx, threads=args.threads, min_score=min_score)
    return Detector.from_model(args.model, args.weights, backend=args.backend, threads=args.threads,
                               min_score=min_score)


@command("detect", "detect objects in images and print them (original pixel coordinates)")
def _detect(p: argparse.ArgumentParser):
    p.add_argument("images", nargs="+", help="JPEG/PNG/... files")
    add_source_args(p)
    p.add_argument("--min-score", type=float, default=0.3, help="hide detections below this score")
    p.add_argument("--json", help="write all detections as JSON")
    p.add_argument("--draw", help="draw the detections of the first image to this PNG/JPEG (or a directory "
                                  "for all images)")

    def run(args) -> int:
        from .preprocess import decode_image
        for path in args.images:  # fail early, before the model is built
            decode_image(path)
        detector = make_detector(args, args.min_score)
        results = detector.detect(args.images)
        report = []
        for path, det in zip(args.images, results):
            print(f"{path}: {len(det)} detection(s)")
            for r in det.to_records():
                x1, y1, x2, y2 = r["box"]
                print(f"  {r['label']:>12s}  {r['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
            report.append({"image": str(path), "detections": det.to_records()})
        if args.json:
            from .io import write_json
            write_json(args.json, report)
            print(f"wrote {args.json}")
        if args.draw:
            from .visualize import draw_detections
            out = Path(args.draw)
            targets = ([(args.images[0], results[0], out)] if out.suffix else
                       [(img, det, out / (Path(img).stem + "_det.png")) for img, det in zip(args.images, results)])
            for img, det, dst in targets:
                draw_detections(img, det, dst)
                print(f"drew {dst}")
        return 0
    return run


@command("demo", "the main job on this machine: export, check, and detect on CPU with ONNX Runtime")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--out", default="build/demo", help="where the graph, images and reports go")
    p.add_argument("--model", default="d0")

    def run(args) -> int:
        from .demo import run_demo
        return run_demo(args.model, Path(args.out))
    return run
