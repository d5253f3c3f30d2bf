"""Why entropy calibration breaks the shapes Lite0 (issue #27): the INT8 graph built as `calibrate` builds it
(equalized, refined, Q/DQ on the FP16 twin), but with entropy thresholds for one group of activation tensors and
minmax thresholds for the rest, one group at a time; mAP on the shapes val split through ONNX Runtime. Each
method's thresholds are refined once, on all tensors, and the refined ones mixed (refine.py tightens each
tensor by the error of the layer it feeds, which depends on the other tensors only through a separable pair's
middle tensor), so a row costs a Q/DQ insertion and an evaluation.

    OMP_NUM_THREADS=1 python benchmarks/lite_entropy.py [--data build/shapes_full] [--calib-images 500] [--eval-images 150]

Groups are tensor kinds (what produces the tensor: the input, ReLU6 = Clip, the residual Add, a Conv feeding a Conv
directly) by network part (backbone, BiFPN, class head, box head). Both methods' ranges are computed once (the
same calibration as `calibrate`'s, cached under --work) and mixed per group. Writes
benchmarks/results/lite_entropy.{json,md}."""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from edet_deploy.backends import REFERENCE_BACKEND
from edet_deploy.data import CocoDataset, generate_shapes
from edet_deploy.detector import Detector
from edet_deploy.eval import evaluate
from edet_deploy.measure import CpuPressure, machine_info
from edet_deploy.precision.census import census
from edet_deploy.precision.convert import FEED_IMAGES, _feeds, _finish, _load, _overflow_keep, graph_for
from edet_deploy.precision.equalize import equalize, tensor_session
from edet_deploy.precision.fp16 import convert_to_fp16
from edet_deploy.precision.int8 import calibrate, calibration_images, calibration_tensors, network_nodes
from edet_deploy.precision.qdq import _consumers, insert_qdq
from edet_deploy.precision.refine import refine_thresholds
from edet_deploy.precision.sensitivity import block_of

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "edet_deploy" / "assets" / "shapes_lite0.safetensors"
RELU6_TOP = 6.0


def tensor_groups(candidate) -> "OrderedDict[str, List[str]]":
    """Calibrated tensors by (kind, network part): kind from the producing node, part from the consumer Convs."""
    producer = {o: n for n in candidate.graph.node for o in n.output}
    consumers = _consumers(candidate.graph)
    groups: Dict[str, List[str]] = {}
    for t in calibration_tensors(candidate):
        p = producer.get(t)
        kind = {"Clip": "ReLU6 out", "Add": "residual Add out", "Conv": "Conv out (no activation)"}.get(
            p.op_type if p is not None else "", "input" if "Transpose" in t or p is None else p.op_type + " out")
        parts = sorted({block_of(n.name).split("/")[0] for n in consumers.get(t, []) if n.op_type == "Conv"})
        # no Conv reads it: the residual input of an Add fused into a Conv (BiFPN's sum fusion, for one)
        part = {"backbone": "backbone", "fpn": "BiFPN", "class_net": "class head", "box_net": "box head"}.get(
            parts[0] if parts else "", parts[0] if parts else "fused-Add residual")
        if len(parts) > 1:  # a BiFPN output, read by both heads
            part = "both heads"
        groups.setdefault(f"{kind}, {part}" if kind != "input" else "input (stem)", []).append(t)
    return OrderedDict(sorted(groups.items()))


def clipped_shares(candidate, feeds, thresholds: Dict[str, float]) -> Dict[str, dict]:
    """Per tensor over `feeds`: the share of its values at ReLU6's top (>= 6) and above its threshold."""
    tensors = list(thresholds)
    session = tensor_session(candidate, tensors)
    at6, above, total = dict.fromkeys(tensors, 0), dict.fromkeys(tensors, 0), dict.fromkeys(tensors, 0)
    for feed in feeds:
        for t, v in zip(tensors, session.run(tensors, dict(feed))):
            at6[t] += int((v >= RELU6_TOP).sum())
            above[t] += int((np.abs(v) > thresholds[t]).sum())
            total[t] += v.size
    return {t: {"share_at_6": at6[t] / max(total[t], 1), "share_above_entropy": above[t] / max(total[t], 1)}
            for t in tensors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="build/shapes_full")
    ap.add_argument("--calib-images", type=int, default=500)
    ap.add_argument("--eval-images", type=int, default=150, help="val images per mAP (the split has 300)")
    ap.add_argument("--worst", type=int, default=2, help="single-tensor runs for this many worst-clipped tensors")
    ap.add_argument("--work", default="build/lite_entropy")
    ap.add_argument("--cache", default=None, help="calibration-range cache (default: WORK/.calibration_cache)")
    ap.add_argument("--out", default="benchmarks/results/lite_entropy")
    args = ap.parse_args(argv)
    if not all(Path(args.data, f"instances_{s}.json").is_file() for s in ("val", "calib")):
        generate_shapes(args.data)
    work = Path(args.work)
    fp32 = graph_for("lite0", "fp32", work, weights=str(WEIGHTS), reuse=True)
    val = CocoDataset(args.data, "val")
    _, meta, candidate, settings = _load(fp32)
    images = calibration_images(args.data, args.calib_images)
    feeds = _feeds(images[:FEED_IMAGES], meta)
    equalized, _ = equalize(candidate, feeds)  # what to_int8 calibrates: the same function on the same feeds
    groups = tensor_groups(equalized)
    def ranges(method: str) -> Dict[str, float]:
        cache = Path(args.cache) if args.cache else work / ".calibration_cache"
        return calibrate(equalized, images, method, cache, int(meta.image_size), None, meta.mean)[0]

    entropy, minmax = ranges("entropy"), ranges("minmax")
    # the tensors entropy clips hardest against their full range, for single-tensor runs
    worst = sorted((t for t in minmax if minmax[t] > 0), key=lambda t: entropy[t] / minmax[t])[:args.worst]
    relu6 = [t for g, ts in groups.items() if g.startswith("ReLU6") for t in ts]
    shares = clipped_shares(equalized, feeds, {t: entropy[t] for t in dict.fromkeys(relu6 + worst)})

    include, _ = network_nodes(equalized)
    keep = _overflow_keep(equalized, meta, args.data, 8)  # as to_int8: nodes kept FP32 in the FP16 twin
    entropy_refined, _ = refine_thresholds(equalized, entropy, include, feeds)
    minmax_refined, _ = refine_thresholds(equalized, minmax, include, feeds)
    fp32_weights = {i.name: numpy_helper.to_array(i) for i in equalized.graph.initializer}
    half = convert_to_fp16(equalized, keep)

    def m_ap(name: str, use_entropy: set) -> dict:
        amax = {t: (entropy_refined if t in use_entropy else minmax_refined)[t] for t in minmax}
        quantized, _ = insert_qdq(onnx.ModelProto.FromString(half.SerializeToString()), include, amax, fp32_weights)
        graph = _finish(quantized, settings, replace(meta, precision="int8", census=census(quantized)),
                        work / f"{name}.onnx").onnx_path
        stats = evaluate(Detector.from_onnx(graph, backend=REFERENCE_BACKEND), val, args.eval_images,
                         progress=False)["stats"]
        return {"AP": stats["AP"], "AP50": stats["AP50"]}

    def write(rows: list, pressure_pct: Optional[float]) -> None:
        m = machine_info(None)
        report = {"machine": m, "cpu_pressure_pct": pressure_pct, "fp32_AP": fp["stats"]["AP"],
                  "calibration_images": args.calib_images, "eval_images": min(args.eval_images, len(val)),
                  "rows": rows, "shares": shares,
                  "worst": [{"tensor": t, "entropy": entropy[t], "minmax": minmax[t], **shares[t]} for t in worst],
                  "amax": {t: {"entropy": entropy[t], "minmax": minmax[t]} for t in minmax}}
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        lines = ["# Lite0: entropy thresholds one tensor group at a time (ONNX Runtime, CPU)\n",
                 f"Bundled shapes Lite0 (input {meta.image_size}), INT8 as `calibrate` builds it (equalized, refined, Q/DQ "
                 f"on the FP16 twin) with entropy thresholds for the group named and minmax for every other tensor "
                 f"(each method refined once, then mixed); "
                 f"ranges from {args.calib_images} calib images; mAP on {report['eval_images']} shapes val images, FP32 "
                 f"{fp['stats']['AP']:.4f}. Machine {m['cpu']}, {m['cores']} cores, {m['date']}; CPU pressure (PSI "
                 f"some) {pressure_pct}% of the run. Ratio: entropy threshold / minmax threshold over the group's "
                 f"tensors. `python benchmarks/lite_entropy.py`\n",
                 "| run | tensors | mAP | delta vs FP32 (points) | ratio median | ratio min |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['run']} | {r['tensors']} | {r['AP']:.4f} | {r['delta_points']:+.2f} | "
                         f"{r['entropy_over_minmax_median']:.3f} | {r['entropy_over_minmax_min']:.3f} |")
        lines += ["", "Worst tensors (lowest entropy / minmax threshold), share of their values on 32 calib images:", "",
                  "| # | tensor | entropy | minmax | values above the entropy threshold | values at 6 |",
                  "|---:|---|---:|---:|---:|---:|"]
        for i, w in enumerate(report["worst"]):
            lines.append(f"| {i + 1} | `{w['tensor']}` | {w['entropy']:.3f} | {w['minmax']:.3f} | "
                         f"{100 * w['share_above_entropy']:.2f}% | {100 * w['share_at_6']:.2f}% |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    rows = []
    with CpuPressure() as pressure:
        fp = evaluate(Detector.from_onnx(fp32, backend=REFERENCE_BACKEND), val, args.eval_images, progress=False)
        base = {"all minmax": set(), "all entropy": set(entropy)}
        runs = list(base.items())
        for i, t in enumerate(worst):
            runs += [(f"entropy only at worst #{i + 1}", {t}), (f"entropy except worst #{i + 1}", set(entropy) - {t})]
        # ReLU6 outputs first (the suspects), then every other group
        runs += sorted(((f"entropy: {g}", set(ts)) for g, ts in groups.items()), key=lambda r: "ReLU6" not in r[0])
        for label, chosen in runs:
            r = m_ap(label.replace(" ", "_").replace(",", "").replace(":", "").replace("(", "").replace(")", ""),
                     chosen)
            ts = sorted(chosen)
            ratio = np.array([entropy[t] / minmax[t] for t in ts if minmax[t] > 0]) if ts else np.ones(1)
            row = {"run": label, "tensors": len(ts), **r, "delta_points": round((r["AP"] - fp["stats"]["AP"]) * 100, 2),
                   "entropy_over_minmax_median": round(float(np.median(ratio)), 3),
                   "entropy_over_minmax_min": round(float(ratio.min()), 3)}
            if label.startswith("entropy: ReLU6"):
                row["share_at_6_median"] = round(float(np.median([shares[t]["share_at_6"] for t in ts])), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, None)  # after every row: a run cut short still leaves its rows (pressure: at the end)
    write(rows, pressure.pct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
