"""Accuracy per precision on the shapes validation split, all through ONNX Runtime on the exact graphs TensorRT
would get: FP32, FP16, and INT8 (Q/DQ on the FP16 twin) for each calibration method, with and without the
sensitivity exclusions; each row with its precision census (share of multiply-adds in int8 / fp16 / fp32).

    python benchmarks/precision_accuracy.py [--models d0,lite0] [--data build/shapes_full] [--calib-images 500]
        [--max-loss 0.005] [--quick] [--reuse-fp32]

One run, every model in --models (the bundled shapes_<model>.safetensors), and for D0 the OpenVINO f32 / bf16
pair on its FP32 graph. Writes benchmarks/results/precision_accuracy.{json,md}."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edet_deploy.configs import get_config
from edet_deploy.data import CocoDataset, generate_shapes
from edet_deploy.detector import Detector
from edet_deploy.eval import evaluate
from edet_deploy.backends import REFERENCE_BACKEND
from edet_deploy.measure import CpuPressure, machine_info
from edet_deploy.precision.census import census
from edet_deploy.precision.convert import graph_for
from edet_deploy.precision.int8 import Int8Options
from edet_deploy.precision.sensitivity import sensitivity_sweep

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "edet_deploy" / "assets"


def weights_of(model: str) -> Path:
    """The bundled shapes model of a variant (shapes_d0, shapes_lite0)."""
    return ASSETS / f"shapes_{model}.safetensors"


def model_graphs(model: str, args, work: Path) -> tuple:
    """(graphs by row name, sensitivity report or None) of one model: FP32, FP16, INT8 entropy and minmax
    (equalized, refined; the variant's method marked default) and, unless --quick, the ablations, the other methods and the sensitivity exclusions."""
    # --reuse-fp32: an FP32 export already in `work` is kept, so the calibration cache beside it (keyed by the
    # graph's bytes, its export time included) still applies; the twins are made again either way.
    fp32 = graph_for(model, "fp32", work, weights=str(weights_of(model)), reuse=args.reuse_fp32)
    graphs = {"fp32": fp32, "fp16": graph_for(model, "fp16", work, data=args.data, reuse=False)}

    def int8(**kw) -> Path:
        return graph_for(model, "int8", work, data=args.data, num_images=args.calib_images, reuse=False, **kw)

    default = get_config(model).calib_method  # what `calibrate` uses unless told

    def label(method: str) -> str:
        return f"int8 {method}" + (" (default)" if method == default else "")

    graphs[label("entropy")] = int8(method="entropy")
    if args.quick:
        graphs[label("minmax")] = int8(method="minmax")
        return graphs, None
    t = time.perf_counter()
    sens = sensitivity_sweep(fp32, args.data, Int8Options(num_images=args.calib_images, method="entropy"),
                             args.sensitivity_images, max_loss=args.max_loss, work_dir=work / "sensitivity")
    print(f"{model}: sensitivity sweep {time.perf_counter() - t:.0f} s: keep {sens['kept_in_float']}", flush=True)
    # the default INT8 graph without the channel equalization that precedes calibration, and without the
    # threshold refinement that follows it, for comparison
    graphs["int8 entropy, not equalized"] = int8(method="entropy", tag="-noeq", equalize=False)
    graphs["int8 entropy, not refined"] = int8(method="entropy", tag="-noref", refine=False)
    for method in ("percentile", "minmax"):
        graphs[label(method)] = int8(method=method)
    for method in ("entropy", "percentile", "minmax"):
        graphs[f"int8 {method} + sensitivity"] = int8(method=method, exclude=sens["exclude_patterns"], tag="-sens")
    return graphs, sens


def _row(model: str, name: str, graph: Path, val, backend: str = REFERENCE_BACKEND, bf16: bool = False) -> dict:
    rep = evaluate(Detector.from_onnx(graph, backend=backend, bf16=bf16), val)
    c = census(graph)
    row = {"model": model, "graph": name, "runtime": backend + (" bf16" if bf16 else ""), **rep["stats"],
           "seconds": rep["seconds"], "census": {p: round(c[p], 4) for p in ("int8", "fp16", "fp32")},
           "gmacs": c["gmacs"]}
    print(f"{model:6s} {name:32s} {row['runtime']:16s} mAP {row['AP']:.4f} AP50 {row['AP50']:.4f} "
          f"int8/fp16/fp32 {c['int8']:.3f}/{c['fp16']:.3f}/{c['fp32']:.3f}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="d0", help="comma list of bundled shapes models (d0, lite0)")
    ap.add_argument("--data", default="build/shapes_full", help="COCO-format shapes set (generated if missing)")
    ap.add_argument("--calib-images", type=int, default=500, help="as `calibrate` (default 500)")
    ap.add_argument("--sensitivity-images", type=int, default=100)
    ap.add_argument("--max-loss", type=float, default=0.005,
                    help="sensitivity: mAP loss vs FP32 (on its images) at which blocks stop being kept in float")
    ap.add_argument("--quick", action="store_true",
                    help="per model only FP32, FP16, default INT8 and INT8 minmax (no sensitivity sweep)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the OpenVINO f32 / bf16 row pair of D0")
    ap.add_argument("--reuse-fp32", action="store_true",
                    help="keep the FP32 exports already in --work (their cached calibration ranges then apply)")
    ap.add_argument("--work", default="build/precision")
    ap.add_argument("--out", default="benchmarks/results/precision_accuracy")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    # The full default splits (300 val, a calib split): other benchmarks write smaller shapes sets, and a folder
    # without a calib split would have calibration fall back to its val images.
    if not all(Path(args.data, f"instances_{s}.json").is_file() for s in ("val", "calib")):
        generate_shapes(args.data)
    val = CocoDataset(args.data, "val")
    rows, sensitivity = [], {}
    with CpuPressure() as pressure:  # the PSI share of the whole run: this machine is shared
        for model in models:
            work = Path(args.work) / model
            graphs, sens = model_graphs(model, args, work)
            if sens is not None:
                sensitivity[model] = sens
            model_rows = [_row(model, name, graph, val) for name, graph in graphs.items()]
            if model == "d0" and not args.no_bf16:  # issue 29: bf16 accuracy, OpenVINO against itself in f32
                model_rows += [_row(model, "fp32", graphs["fp32"], val, "openvino"),
                               _row(model, "fp32 graph, bf16 inference", graphs["fp32"], val, "openvino", bf16=True)]
            base = model_rows[0]["AP"]
            for r in model_rows:
                r["delta_mAP_points"] = round((r["AP"] - base) * 100, 2)
            if any(r["runtime"].startswith("openvino") for r in model_rows):
                ov = {r["runtime"]: r["AP"] for r in model_rows if r["runtime"].startswith("openvino")}
                model_rows[-1]["delta_vs_openvino_f32_points"] = round((ov["openvino bf16"] - ov["openvino"]) * 100, 2)
            int8 = [r for r in model_rows if r["graph"].startswith("int8")]
            best = max(int8, key=lambda r: r["AP"])
            best["best_int8"] = True
            rows += model_rows
    m = machine_info(None)
    report = {"machine": m, "cpu_pressure_pct": pressure.pct, "models": {x: weights_of(x).name for x in models},
              "split": f"shapes val ({len(val)} images)", "calibration_images": args.calib_images,
              "quick": args.quick, "max_loss": args.max_loss, "sensitivity": sensitivity, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    def except_in(row: str) -> str:
        return "" if args.quick else f' except in the "{row}" row'

    lines = ["# Accuracy per precision (ONNX Runtime, CPU)\n",
             f"Models: {', '.join(f'{x} ({weights_of(x).name})' for x in models)}, input 256; {report['split']}; "
             f"calibration on {args.calib_images} images of the calib split; machine {m['cpu']}, {m['cores']} "
             f"cores, {m['date']}; CPU pressure (PSI some) {report['cpu_pressure_pct']}% of the run. "
             f"Every graph is the one TensorRT would get (soft-NMS node inside, run here by ONNX Runtime unless the "
             f"runtime column says otherwise). INT8 graphs "
             f"are the FP16 twin plus Q/DQ on the inputs of Convs (and on the residual inputs of the Adds TensorRT "
             f"fuses into them), fp16 scales, opset 19, depthwise channels equalized before calibration "
             f"(precision/equalize.py){except_in('not equalized')}, and calibrated thresholds tightened by the "
             f"error of the layer each tensor feeds (precision/refine.py, label-free, 32 calib images)"
             f"{except_in('not refined')}{' (a --quick run: no ablation rows)' if args.quick else ''}. **Bold**: the "
             f"best INT8 graph of each model. "
             f"Census: share of the GMAC per image that TensorRT 11 would run in int8 / fp16 / fp32 (read from the "
             f"graph's types).\n",
             "| model | graph | runtime | mAP@[.5:.95] | AP50 | AP75 | delta vs FP32 (points) | census int8 / fp16 / fp32 |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cen = " / ".join(f"{100 * r['census'][p]:.1f}%" for p in ("int8", "fp16", "fp32"))
        name = f"**{r['graph']}**" if r.get("best_int8") else r["graph"]
        delta = f"{r['delta_mAP_points']:+.2f}"
        if "delta_vs_openvino_f32_points" in r:
            delta += f" ({r['delta_vs_openvino_f32_points']:+.2f} vs OpenVINO f32)"
        lines.append(f"| {r['model']} | {name} | {r['runtime']} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['AP75']:.4f} | "
                     f"{delta} | {cen} |")
    for model, sens in sensitivity.items():
        lines += ["", f"{model} sensitivity sweep (entropy, {args.sensitivity_images} val images per trial): INT8 of "
                  f"all blocks {sens['int8_all_mAP']:.4f} vs FP32 {sens['fp32_mAP']:.4f}; blocks kept in FP16, best "
                  f"first, until the loss is within {100 * args.max_loss:.2g} points: "
                  f"{', '.join(sens['kept_in_float']) or 'none'}.", "",
                  "| block kept in FP16 | convs | mAP | recovered |", "|---|---:|---:|---:|"]
        for b in sens["blocks"]:
            lines.append(f"| {b['block']} | {b['convs']} | {b['mAP_with_block_in_float']:.4f} | {b['recovered']:+.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
