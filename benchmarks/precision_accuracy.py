"""Accuracy per precision on the shapes validation split, all through ONNX Runtime on the exact graphs TensorRT
would get: FP32, FP16, and INT8 (Q/DQ on the FP16 twin) for each calibration method, with and without the
sensitivity exclusions; each row with its precision census (share of multiply-adds in int8 / fp16 / fp32).

    python benchmarks/precision_accuracy.py [--data build/shapes_full] [--calib-images 500] [--max-loss 0.005]

Writes benchmarks/results/precision_accuracy.{json,md}."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edet_deploy.data import CocoDataset, generate_shapes
from edet_deploy.detector import Detector
from edet_deploy.eval import evaluate
from edet_deploy.backends import REFERENCE_BACKEND
from edet_deploy.measure import machine_info
from edet_deploy.precision.census import census
from edet_deploy.precision.convert import graph_for
from edet_deploy.precision.int8 import Int8Options
from edet_deploy.precision.sensitivity import sensitivity_sweep

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "edet_deploy" / "assets" / "shapes_d0.safetensors"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="build/shapes_full", help="COCO-format shapes set (generated if missing)")
    ap.add_argument("--calib-images", type=int, default=500, help="as `calibrate` (default 500)")
    ap.add_argument("--sensitivity-images", type=int, default=100)
    ap.add_argument("--max-loss", type=float, default=0.005,
                    help="sensitivity: mAP loss vs FP32 (on its images) at which blocks stop being kept in float")
    ap.add_argument("--work", default="build/precision")
    ap.add_argument("--out", default="benchmarks/results/precision_accuracy")
    args = ap.parse_args(argv)
    # The full default splits (300 val, a calib split): other benchmarks write smaller shapes sets, and a folder
    # without a calib split would have calibration fall back to its val images.
    if not all(Path(args.data, f"instances_{s}.json").is_file() for s in ("val", "calib")):
        generate_shapes(args.data)
    val = CocoDataset(args.data, "val")
    work = Path(args.work)
    fp32 = graph_for("d0", "fp32", work, weights=str(WEIGHTS), reuse=False)
    graphs = {"fp32": fp32, "fp16": graph_for("d0", "fp16", work, data=args.data, reuse=False)}
    t = time.perf_counter()
    sens = sensitivity_sweep(fp32, args.data, Int8Options(num_images=args.calib_images, method="entropy"),
                             args.sensitivity_images, max_loss=args.max_loss, work_dir=work / "sensitivity")
    print(f"sensitivity sweep {time.perf_counter() - t:.0f} s: keep {sens['kept_in_float']}", flush=True)
    # the default INT8 graph without the channel equalization that precedes calibration, for comparison
    graphs["int8 entropy, not equalized"] = graph_for("d0", "int8", work, data=args.data, num_images=args.calib_images,
                                                      method="entropy", tag="-noeq", reuse=False, equalize=False)
    # and without the threshold refinement that follows it
    graphs["int8 entropy, not refined"] = graph_for("d0", "int8", work, data=args.data, num_images=args.calib_images,
                                                    method="entropy", tag="-noref", reuse=False, refine=False)
    for method in ("entropy", "percentile", "minmax"):
        graphs[f"int8 {method}"] = graph_for("d0", "int8", work, data=args.data, num_images=args.calib_images,
                                             method=method, reuse=False)
        graphs[f"int8 {method} + sensitivity"] = graph_for(
            "d0", "int8", work, data=args.data, num_images=args.calib_images, method=method,
            exclude=sens["exclude_patterns"], tag="-sens", reuse=False)
    rows = []
    for name, graph in graphs.items():
        rep = evaluate(Detector.from_onnx(graph, backend=REFERENCE_BACKEND), val)
        c = census(graph)
        rows.append({"graph": name, **rep["stats"], "seconds": rep["seconds"],
                     "census": {p: round(c[p], 4) for p in ("int8", "fp16", "fp32")}, "gmacs": c["gmacs"]})
        print(f"{name:32s} mAP {rep['stats']['AP']:.4f} AP50 {rep['stats']['AP50']:.4f} "
              f"int8/fp16/fp32 {c['int8']:.3f}/{c['fp16']:.3f}/{c['fp32']:.3f}", flush=True)
    base = rows[0]["AP"]
    for r in rows:
        r["delta_mAP_points"] = round((r["AP"] - base) * 100, 2)
    m = machine_info(None)
    report = {"machine": m, "model": str(WEIGHTS.name), "split": f"shapes val ({len(val)} images)",
              "calibration_images": args.calib_images, "max_loss": args.max_loss, "sensitivity": sens, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Accuracy per precision (ONNX Runtime, CPU)\n",
             f"Model: bundled shapes D0 ({WEIGHTS.name}, input 256); {report['split']}; calibration on "
             f"{args.calib_images} images of the calib split; machine {m['cpu']}, {m['cores']} cores, {m['date']}. "
             f"Every graph is the one TensorRT would get (soft-NMS node inside, run here by ONNX Runtime). INT8 graphs "
             f"are the FP16 twin plus Q/DQ on the inputs of Convs (and on the residual inputs of the Adds TensorRT "
             f"fuses into them), fp16 scales, opset 19, depthwise channels equalized before calibration "
             f"(precision/equalize.py) except in the \"not equalized\" row, and calibrated thresholds tightened by "
             f"the error of the layer each tensor feeds (precision/refine.py, label-free, 32 calib images) except in "
             f"the \"not refined\" row. "
             f"Census: share of the {rows[0]['gmacs']:.3g} GMAC per image "
             f"that TensorRT 11 would run in int8 / fp16 / fp32 (read from the graph's types).\n",
             "| graph | mAP@[.5:.95] | AP50 | AP75 | APs | APm | APl | delta vs FP32 (points) | "
             "census int8 / fp16 / fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cen = " / ".join(f"{100 * r['census'][p]:.1f}%" for p in ("int8", "fp16", "fp32"))
        lines.append(f"| {r['graph']} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['AP75']:.4f} | {r['APs']:.4f} | "
                     f"{r['APm']:.4f} | {r['APl']:.4f} | {r['delta_mAP_points']:+.2f} | {cen} |")
    lines += ["", f"Sensitivity sweep (entropy, {args.sensitivity_images} val images per trial): INT8 of all blocks "
              f"{sens['int8_all_mAP']:.4f} vs FP32 {sens['fp32_mAP']:.4f}; blocks kept in FP16, best first, until the loss "
              f"is within {100 * args.max_loss:.2g} points: "
              f"{', '.join(sens['kept_in_float']) or 'none'}.", "",
              "| block kept in FP16 | convs | mAP | recovered |", "|---|---:|---:|---:|"]
    for b in sens["blocks"]:
        lines.append(f"| {b['block']} | {b['convs']} | {b['mAP_with_block_in_float']:.4f} | {b['recovered']:+.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
