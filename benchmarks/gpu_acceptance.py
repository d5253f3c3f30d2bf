"""Body of benchmarks/gpu_acceptance.sh (see there): every TensorRT-path check on one GPU, one summary.

    python benchmarks/gpu_acceptance.py [--dry-run] [--out build/gpu_acceptance] [VARIANT ...]

Exits 1 when any check fails, 0 when all pass (a skipped optional tool is reported, not failed).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "edet_deploy" / "assets" / "shapes_d0.safetensors"
PRECISIONS = ("fp32", "fp16", "int8")
# Matching detections with ONNX Runtime (same graph file): detections with score >= MATCH_SCORE, per image
# equal counts, each matched to one of the same class with IoU >= IOU_TOL and |score diff| <= SCORE_TOL.
MATCH_SCORE = 0.3
TOLERANCES = {"fp32": {"iou": 0.99, "score": 2e-3}, "fp16": {"iou": 0.95, "score": 2e-2}}
INT8_MAX_MAP_DROP = 0.02  # INT8 is judged by mAP on the shapes val split, not slot by slot
LATENCY_ITERS = 200

STEPS: List[tuple] = []


def step(title: str, detail: str):
    """Register a check; --dry-run prints the titles and details in order."""
    def wrap(fn: Callable):
        STEPS.append((title, detail, fn))
        return fn
    return wrap


def _dets(out: Dict[str, np.ndarray], i: int, min_score: float):
    keep = out["detection_scores"][i] >= min_score
    return out["detection_boxes"][i][keep], out["detection_scores"][i][keep], out["detection_classes"][i][keep]


def _match_into(a, b, iou_tol: float, score_tol: float, report: Dict) -> int:
    """Greedy one-to-one: every detection of `a` (best first) to an unused one of `b` of the same class with
    IoU >= iou_tol and |score diff| <= score_tol. Returns how many of `a` found none."""
    from edet_deploy.box_ops import box_iou

    (ab, as_, ac), (bb, bs, bc) = a, b
    if not len(ab):
        return 0
    if not len(bb):
        return len(ab)
    ious = box_iou(ab, bb) * (ac[:, None] == bc[None, :])
    used, missing = set(), 0
    for i in np.argsort(-as_):
        ok = [j for j in np.argsort(-ious[i]) if j not in used and ious[i, j] >= iou_tol
              and abs(float(as_[i] - bs[j])) <= score_tol]
        if not ok:
            missing += 1
            continue
        used.add(ok[0])
        report["worst_iou"] = min(report["worst_iou"], float(ious[i, ok[0]]))
        report["worst_score_diff"] = max(report["worst_score_diff"], abs(float(as_[i] - bs[ok[0]])))
    return missing


def matched(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray], iou_tol: float, score_tol: float) -> Dict:
    """Per image, both ways: each detection scoring >= MATCH_SCORE + score_tol on one side matches one scoring
    >= MATCH_SCORE - score_tol on the other (so a score within the tolerance of the cut changes nothing).
    Passes when nothing is left unmatched and there was something to match."""
    report = {"images": 0, "detections": 0, "count_mismatch": [], "worst_iou": 1.0, "worst_score_diff": 0.0,
              "unmatched": 0}
    hi, lo = MATCH_SCORE + score_tol, MATCH_SCORE - score_tol
    for i in range(len(ref["num_detections"])):
        report["images"] += 1
        report["detections"] += len(_dets(ref, i, hi)[0])
        missing = (_match_into(_dets(ref, i, hi), _dets(got, i, lo), iou_tol, score_tol, report),
                   _match_into(_dets(got, i, hi), _dets(ref, i, lo), iou_tol, score_tol, report))
        if any(missing):
            report["count_mismatch"].append((i, *missing))
            report["unmatched"] += sum(missing)
    report["ok"] = not report["unmatched"] and report["detections"] > 0
    return report


class Acceptance:
    def __init__(self, variant: str, out: Path):
        self.variant, self.out = variant, out / variant
        self.results: Dict = {"variant": variant, "checks": {}, "latency": {}, "skipped": {}}
        self.failures: List[str] = []

    def check(self, name: str, ok: bool, **details) -> None:
        self.results["checks"][name] = {"ok": bool(ok), **details}
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {json.dumps(details, default=str)[:300]}", flush=True)
        if not ok:
            self.failures.append(name)

    # --- steps ------------------------------------------------------------------------------------------

    @step("data and graphs", "shapes val/calib split; export FP32 (dynamic batch 1..8; d0 = bundled shapes "
                             "model), FP16 twin, INT8 twin calibrated on 64 images")
    def graphs(self):
        from edet_deploy.data import CocoDataset, generate_shapes
        from edet_deploy.precision.convert import graph_for

        self.data = generate_shapes(self.out.parent / "shapes", {"val": 64, "calib": 64}, progress=False)
        self.val = CocoDataset(self.data, "val")
        weights = str(DEMO) if self.variant == "d0" and DEMO.is_file() else None
        self.graph_paths = {p: graph_for(self.variant, p, self.out, weights=weights, dynamic_batch=8,
                                         data=self.data if p == "int8" else None, num_images=64, reuse=False)
                            for p in PRECISIONS}

    @step("build", "edet-deploy build --batch 1:8:8 for fp32 (--no-tf32, for the comparison) / fp16 / int8, "
                   "TensorRT's full log kept in build_<precision>.log")
    def build(self):
        from edet_deploy.log import logger
        from edet_deploy.trt.builder import build_engine

        self.plans = {}
        for p, graph in self.graph_paths.items():
            plan = self.out / f"{self.variant}_{p}.plan"
            handler = logging.FileHandler(self.out / f"build_{p}.log", mode="w")
            handler.setLevel(logging.DEBUG)
            level = logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)  # the log file keeps TensorRT's info and verbose lines
            try:
                # FP32 without TF32, so that it can be compared with ONNX Runtime's FP32 at tight tolerances
                side = build_engine(graph, plan, batch="1:8:8", verbose=True, tf32=p != "fp32")
                self.check(f"build {p}", plan.is_file(), seconds=side["tensorrt"]["build_seconds"])
            except Exception as e:  # noqa: BLE001 - one failed build must not hide the others
                self.check(f"build {p}", False, error=str(e))
            finally:
                logger.setLevel(level)
                logger.removeHandler(handler)
                handler.close()
            if plan.is_file():
                self.plans[p] = plan

    @step("soft-NMS is the AOT plugin", "a Python process that never registers the plugin deserializes and "
                                        "runs each engine (pass/fail); trtexec --loadEngine when on PATH; the "
                                        "engine inspector's plugin layer and the kernel name in the plan, reported")
    def aot(self):
        from edet_deploy.backends.tensorrt import TensorRTRunner

        for p, plan in self.plans.items():
            # informative: what the inspector says of the plugin layer, whether the kernel name is in the plan
            self.results.setdefault("plugin_layers", {})[p] = {
                "inspector": TensorRTRunner(plan).plugin_layers()[:1],
                "kernel_name_in_plan": b"soft_nms_kernel" in plan.read_bytes()}
            size = self.graph_size
            probe = (f"import tensorrt as trt, torch\n"
                     f"rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))\n"
                     f"e = rt.deserialize_cuda_engine(open({str(plan)!r}, 'rb').read())\n"
                     f"assert e is not None, 'not deserializable without the Python plugin'\n"
                     f"c = e.create_execution_context(); c.set_input_shape('images', (1, {size}, {size}, 3))\n"
                     f"bufs = {{}}\n"
                     f"for i in range(e.num_io_tensors):\n"
                     f"    n = e.get_tensor_name(i); shape = tuple(c.get_tensor_shape(n))\n"
                     f"    dt = {{trt.uint8: torch.uint8, trt.int32: torch.int32}}.get(e.get_tensor_dtype(n), torch.float32)\n"
                     f"    bufs[n] = torch.zeros(shape, dtype=dt, device='cuda'); c.set_tensor_address(n, bufs[n].data_ptr())\n"
                     f"s = torch.cuda.Stream(); assert c.execute_async_v3(s.cuda_stream); s.synchronize()\n"
                     f"print('ran without registering the plugin')\n")
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
            # the proof of AOT: a process that never registers the Python plugin deserializes and runs the plan
            self.check(f"{p} runs with no Python plugin (AOT)", out.returncode == 0,
                       tail=(out.stdout + out.stderr)[-300:])
            trtexec = shutil.which("trtexec")
            if not trtexec:
                self.results["skipped"][f"trtexec {p}"] = "trtexec not on PATH"
                continue
            cmd = [trtexec, f"--loadEngine={plan}", f"--shapes=images:1x{size}x{size}x3", "--iterations=20"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            self.check(f"trtexec {p}", out.returncode == 0 and "PASSED" in out.stdout,
                       tail=out.stdout.strip().splitlines()[-3:])

    @step("detections vs ONNX Runtime", "16 val images: fp32 and fp16 engines vs ONNX Runtime on the same "
                                        "graph file: equal counts above 0.3 (and > 0), matched IoU / score "
                                        "within the stated tolerances; INT8 engine mAP vs ONNX Runtime FP32 mAP")
    def accuracy(self):
        from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
        from edet_deploy.backends.tensorrt import TensorRTRunner
        from edet_deploy.detector import Detector
        from edet_deploy.eval import evaluate
        from edet_deploy.preprocess import preprocess

        paths = [self.val.image_path(i) for i in range(16)]
        for p in ("fp32", "fp16"):
            if p not in self.plans:
                continue
            ort, eng = OnnxRuntimeRunner(self.graph_paths[p]), TensorRTRunner(self.plans[p])
            refs, gots = [], []
            for start in (0, 8):
                batch, _, _ = preprocess(paths[start:start + 8], ort.image_size)
                refs.append(ort.infer(batch))
                gots.append(eng.infer(batch))
            cat = lambda rs: {k: np.concatenate([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
            tol = TOLERANCES[p]
            self.check(f"{p} engine matches ONNX Runtime", **matched(cat(refs), cat(gots), tol["iou"], tol["score"]),
                       tolerances=tol)
        if "int8" in self.plans:
            ref = evaluate(Detector(OnnxRuntimeRunner(self.graph_paths["fp32"])), self.val)["stats"]["AP"]
            got = evaluate(Detector(TensorRTRunner(self.plans["int8"])), self.val)["stats"]["AP"]
            self.check("int8 engine mAP", got >= ref - INT8_MAX_MAP_DROP and got > 0, int8_mAP=round(got, 4),
                       ort_fp32_mAP=round(ref, 4), max_drop=INT8_MAX_MAP_DROP)

    @step("batch 1..8", "fp32 engine: every batch size 1..8 gives the same detections as the batch-8 run")
    def batches(self):
        from edet_deploy.backends.tensorrt import TensorRTRunner
        from edet_deploy.preprocess import preprocess

        eng = TensorRTRunner(self.plans["fp32"])
        batch, _, _ = preprocess([self.val.image_path(i) for i in range(8)], eng.image_size)
        full = eng.infer(batch)
        worst = []
        for b in range(1, 9):
            got = eng.infer(batch[:b])
            rep = matched({k: v[:b] for k, v in full.items()}, got, **self._tol("fp32"))
            if not rep["ok"]:
                worst.append(b)
        self.check("batch sizes 1..8 agree", not worst, failing_batches=worst)

    @step("CUDA graphs", "fp32 engine with --cuda-graph, batch sizes 1, 8, 3, 8, 1, 5 in turn: same detections "
                         "as without graphs")
    def cuda_graphs(self):
        from edet_deploy.backends.tensorrt import TensorRTRunner
        from edet_deploy.preprocess import preprocess

        plain, graphed = TensorRTRunner(self.plans["fp32"]), TensorRTRunner(self.plans["fp32"], cuda_graph=True)
        batch, _, _ = preprocess([self.val.image_path(i) for i in range(8)], plain.image_size)
        bad = [b for b in (1, 8, 3, 8, 1, 5)
               if not matched(plain.infer(batch[:b]), graphed.infer(batch[:b]), **self._tol("fp32"))["ok"]]
        self.check("CUDA graphs with alternating batch sizes", not bad, failing_batches=bad)

    @step("compute-sanitizer", "compute-sanitizer --tool memcheck edet-deploy detect IMG --engine <fp32 plan> "
                               "(when on PATH): 0 errors")
    def sanitizer(self):
        tool = shutil.which("compute-sanitizer")
        if not tool:
            self.results["skipped"]["compute-sanitizer"] = "not on PATH"
            return
        cmd = [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m", "edet_deploy", "detect",
               str(self.val.image_path(0)), "--engine", str(self.plans["fp32"])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        self.check("memcheck clean", out.returncode == 0 and "ERROR SUMMARY: 0 errors" in out.stdout + out.stderr,
                   tail=(out.stdout + out.stderr).strip().splitlines()[-2:])

    @step("latency", f"per precision, batch 1 and 8: end-to-end (host copies included) and GPU-only (CUDA "
                     f"events around the engine) p50/p90/p99 over {LATENCY_ITERS} runs, with and without CUDA graphs")
    def latency(self):
        from edet_deploy.backends.tensorrt import TensorRTRunner
        from edet_deploy.measure import percentiles
        from edet_deploy.preprocess import preprocess

        for p, plan in self.plans.items():
            for graph in (False, True):
                eng = TensorRTRunner(plan, cuda_graph=graph)
                batch, _, _ = preprocess([self.val.image_path(i) for i in range(8)], eng.image_size)
                for b in (1, 8):
                    x = batch[:b]
                    for _ in range(20):
                        eng.infer(x)
                    e2e = []
                    for _ in range(LATENCY_ITERS):
                        t0 = time.perf_counter()
                        eng.infer(x)
                        e2e.append((time.perf_counter() - t0) * 1000)
                    gpu = eng.gpu_time_ms(x, LATENCY_ITERS)
                    key = f"{p} b{b}{' cuda-graph' if graph else ''}"
                    self.results["latency"][key] = {"end_to_end_ms": percentiles(e2e), "gpu_ms": percentiles(gpu),
                                                    "img_per_s_gpu": round(1000 * b / percentiles(gpu)["p50"], 1)}
                    print(f"  {key}: GPU p50 {percentiles(gpu)['p50']:.3f} ms, end-to-end p50 "
                          f"{percentiles(e2e)['p50']:.3f} ms", flush=True)

    def _tol(self, p):
        return {"iou_tol": TOLERANCES[p]["iou"], "score_tol": TOLERANCES[p]["score"]}

    @property
    def graph_size(self) -> int:
        from edet_deploy.metadata import read_metadata
        return int(read_metadata(self.graph_paths["fp32"])["image_size"])


def summary_markdown(summary: Dict) -> str:
    m = summary["machine"]
    lines = ["# GPU acceptance", "", f"Machine: {json.dumps(m)}", ""]
    for v in summary["variants"]:
        lines += [f"## {v['variant']}", "", "| check | result | details |", "|---|---|---|"]
        for name, c in v["checks"].items():
            details = {k: val for k, val in c.items() if k != "ok"}
            lines.append(f"| {name} | {'PASS' if c['ok'] else 'FAIL'} | {json.dumps(details, default=str)[:200]} |")
        for name, why in v["skipped"].items():
            lines.append(f"| {name} | skipped | {why} |")
        if v["latency"]:
            lines += ["", "| engine | GPU p50 ms | GPU p99 ms | end-to-end p50 ms | end-to-end p99 ms | img/s (GPU) |",
                      "|---|---:|---:|---:|---:|---:|"]
            for key, r in v["latency"].items():
                lines.append(f"| {key} | {r['gpu_ms']['p50']:.3f} | {r['gpu_ms']['p99']:.3f} | "
                             f"{r['end_to_end_ms']['p50']:.3f} | {r['end_to_end_ms']['p99']:.3f} | {r['img_per_s_gpu']} |")
        lines.append("")
    lines.append(f"**{'ALL PASSED' if summary['ok'] else 'FAILED: ' + ', '.join(summary['failures'])}**")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="GPU acceptance of the TensorRT path (see gpu_acceptance.sh)")
    ap.add_argument("variants", nargs="*", default=["d0"])
    ap.add_argument("--out", default="build/gpu_acceptance")
    ap.add_argument("--dry-run", action="store_true", help="print every step and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.dry_run:
        for v in args.variants:
            for i, (title, detail, _) in enumerate(STEPS, 1):
                print(f"[{v}] step {i}/{len(STEPS)} {title}: {detail}")
        print(f"then: summary in {out}/summary.json and {out}/summary.md; exit 1 if any check fails")
        return 0
    from edet_deploy.trt import require_tensorrt
    require_tensorrt()
    import torch
    from edet_deploy.measure import machine_info

    out.mkdir(parents=True, exist_ok=True)
    machine = dict(machine_info(None), gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    summary = {"machine": machine, "variants": [], "failures": []}
    for v in args.variants:
        acc = Acceptance(v, out)
        acc.out.mkdir(parents=True, exist_ok=True)
        for i, (title, _, fn) in enumerate(STEPS, 1):
            print(f"[{v}] step {i}/{len(STEPS)} {title}", flush=True)
            try:
                fn(acc)
            except Exception as e:  # noqa: BLE001 - record and go on to the next step
                acc.check(title, False, error=f"{type(e).__name__}: {e}")
        summary["variants"].append(acc.results)
        summary["failures"] += [f"{v}: {f}" for f in acc.failures]
    summary["ok"] = not summary["failures"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(summary_markdown(summary))
    print(f"wrote {out}/summary.json and summary.md: {'ALL PASSED' if summary['ok'] else summary['failures']}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
