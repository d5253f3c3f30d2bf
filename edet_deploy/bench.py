"""Latency / throughput benchmarks: every variant x backend x precision x batch this machine can run.

Honest by construction: first inference (graph optimisation, numba/JIT compilation) is timed separately,
warm-up iterations are discarded, every iteration gets a fresh input from a pool of distinct images, the
thread count is recorded, and what cannot run here is skipped with a one-line reason."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import EdetError
from .log import logger

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
# Largest input at which ONNX Runtime's INT8 calibration (all intermediate activations kept) fits this
# workplace's 24 GiB machines; larger variants are skipped with that reason rather than killed mid-sweep.
INT8_CALIBRATION_MAX_SIZE = int(os.environ.get("EDET_INT8_CALIB_MAX_SIZE", "1536"))
PRECISIONS = ("fp32", "fp16", "int8")


def percentiles(times_ms: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(times_ms, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def machine_info(threads: Optional[int]) -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for mod in ("torch", "onnxruntime", "openvino", "numpy", "onnx", "timm", "tensorrt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent optional libraries are simply not listed
            pass
    from . import __version__
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or os.cpu_count(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "edet_deploy": __version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


@dataclass
class Result:
    model: str
    backend: str
    precision: str
    batch: int
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    image_size: int = 0
    threads: int = 0
    load_ms: float = 0.0  # runner construction: graph load + compilation (OpenVINO, TensorRT), cold
    first_inference_ms: float = 0.0
    model_p50_ms: float = 0.0
    model_p90_ms: float = 0.0
    model_p99_ms: float = 0.0
    model_mean_ms: float = 0.0
    pipeline_p50_ms: float = 0.0
    pipeline_p90_ms: float = 0.0
    pipeline_p99_ms: float = 0.0
    pipeline_mean_ms: float = 0.0
    throughput_img_s: float = 0.0
    pipeline_throughput_img_s: float = 0.0
    peak_rss_mb: float = 0.0
    iterations: int = 0
    # The paper's COCO AP of the FP32 architecture: only FP32 rows carry it (no FP16/INT8 COCO AP is measured here).
    published_coco_ap: Optional[float] = None
    # Precision census of the graph that ran: share of multiply-adds in int8 / fp16 / fp32 (precision/census.py).
    census_int8: Optional[float] = None
    census_fp16: Optional[float] = None
    census_fp32: Optional[float] = None


def time_loop(fn: Callable[[int], None], warmup: int, iters: int, seconds: Optional[float]) -> List[float]:
    """Run fn(i) `warmup` times untimed, then `iters` times (or for `seconds`, at least 3), in ms."""
    for i in range(warmup):
        fn(i)
    times: List[float] = []
    start = time.perf_counter()
    i = 0
    while (len(times) < iters) if seconds is None else (len(times) < 3 or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        fn(warmup + i)
        times.append((time.perf_counter() - t) * 1000)
        i += 1
    return times


def _encoded_pool(n: int, seed: int = 0) -> List[bytes]:
    """Distinct JPEG 'photos' of different sizes for the full-pipeline timing."""
    from .demo import sample_image
    import tempfile
    pool = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            h, w = (480, 640) if i % 2 == 0 else (600, 400)
            pool.append(sample_image(Path(tmp) / f"{i}.jpg", seed=seed + i, size=(h, w)).read_bytes())
    return pool


class Bench:
    def __init__(self, out: Path, threads: Optional[int] = None, warmup: int = 3, iters: int = 20,
                 seconds: Optional[float] = None, calib_images: int = 4, pool: int = 4):
        self.out, self.threads, self.warmup, self.iters, self.seconds = out, threads, warmup, iters, seconds
        self.calib_images, self.pool_size = calib_images, pool
        self._encoded: Optional[List[bytes]] = None
        self._calib_dir: Optional[Path] = None
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    # -- artifacts ------------------------------------------------------------------------------------------
    def graph(self, model: str, precision: str, max_batch: int) -> Path:
        from .contract import artifact_name
        from .export import export_onnx
        from .precision.convert import to_fp16, to_int8

        d = self.out / "graphs" / model
        fp32 = d / f"{artifact_name(model)}.onnx"
        if not fp32.is_file():
            import torch
            torch.manual_seed(0)
            export_onnx(model, d, dynamic_batch=max(8, max_batch))
        if precision == "fp32":
            return fp32
        if precision == "fp16":
            p = d / f"{artifact_name(model, 'fp16')}.onnx"
            return p if p.is_file() else to_fp16(fp32, p).onnx_path
        # Latency does not depend on the calibration's quality: a quick min-max calibration on a few images
        # (accuracy per calibration method is benchmarks/precision_accuracy.py's job).
        p = d / f"{artifact_name(model, 'int8-minmax')}.onnx"
        return p if p.is_file() else to_int8(fp32, self.calibration_data(), p, self.calib_images,
                                             method="minmax").onnx_path

    def calibration_data(self) -> Path:
        if self._calib_dir is None:
            from .data import generate_shapes
            self._calib_dir = generate_shapes(self.out / "calib_shapes", {"calib": self.calib_images}, progress=False)
        return self._calib_dir

    # -- one combination ------------------------------------------------------------------------------------
    def run(self, model: str, backend: str, precision: str, batch: int, max_batch: int) -> Result:
        from .configs import get_config
        cfg = get_config(model)
        r = Result(model, backend, precision, batch, image_size=cfg.image_size,
                   threads=self.threads or os.cpu_count() or 1,
                   published_coco_ap=cfg.published.get("coco_ap") if precision == "fp32" else None)
        reason = self.skip_reason(backend, precision, cfg.image_size)
        if reason:
            r.status, r.reason = "skipped", reason
            return r
        try:
            with PeakRss() as mem:
                self._measure(r, model, backend, precision, batch, max_batch)
            r.peak_rss_mb = round(mem.peak / 2**20, 1)
        except MemoryError:
            r.status, r.reason = "skipped", "out of memory"
        except EdetError as e:
            r.status, r.reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - one failing combination must not end the sweep
            r.status, r.reason = "failed", f"{type(e).__name__}: {e}"
        return r

    @staticmethod
    def skip_reason(backend: str, precision: str, image_size: int = 0) -> str:
        if backend in ("onnxruntime", "openvino") and precision == "int8" and image_size >= INT8_CALIBRATION_MAX_SIZE:
            return (f"out of memory: INT8 calibration at {image_size} px keeps every activation of the network "
                    f"(measured: D7 at 1536 px was killed on this 24 GiB machine)")
        if backend == "torch" and precision != "fp32":
            return "torch eager is the FP32 reference; FP16/INT8 run through ONNX Runtime and TensorRT"
        if backend == "tensorrt":
            try:
                import torch
                if not torch.cuda.is_available():
                    return "no GPU"
            except ImportError:
                return "no torch"
            try:
                from .trt import require_tensorrt
                require_tensorrt()
            except EdetError:
                return "no TensorRT"
        if backend == "onnxruntime" and precision == "fp16":
            return "FP16 has no fast CPU kernels in ONNX Runtime; its accuracy is checked, its speed belongs to TensorRT"
        return ""

    @staticmethod
    def _census(r: Result, graph: Path) -> None:
        from .precision.census import census
        try:
            c = census(graph)
        except Exception as e:  # noqa: BLE001 - a census that cannot be read must not cost the timing
            logger.warning("no precision census for %s: %s", graph, e)
            return
        r.census_int8, r.census_fp16, r.census_fp32 = (round(c[p], 4) for p in ("int8", "fp16", "fp32"))

    def _measure(self, r: Result, model: str, backend: str, precision: str, batch: int, max_batch: int) -> None:
        from .backends import create_runner
        from .detector import Detector
        from .preprocess import preprocess

        if backend == "torch":
            import torch
            torch.manual_seed(0)
            t = time.perf_counter()
            runner = create_runner("torch", model_name=model, threads=self.threads)
        elif backend in ("onnxruntime", "openvino"):
            graph = self.graph(model, precision, max_batch)
            self._census(r, graph)
            # No OpenVINO model cache here: load_ms is the cold compilation a first start pays.
            extra = {"cache_dir": False} if backend == "openvino" else {}
            t = time.perf_counter()
            runner = create_runner(backend, onnx_path=str(graph), threads=self.threads, **extra)
        else:
            from .trt.builder import build_engine
            plan = self.out / "engines" / f"{model}_{precision}_b{max_batch}.plan"
            graph = self.graph(model, precision, max_batch)
            self._census(r, graph)
            if not plan.is_file():
                build_engine(graph, plan, f"1:{max_batch}:{max_batch}")
            t = time.perf_counter()
            runner = create_runner("tensorrt", engine_path=str(plan))
        r.load_ms = round((time.perf_counter() - t) * 1000, 2)
        s = runner.image_size
        rng = np.random.default_rng(0)
        inputs = [rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8) for _ in range(self.pool_size)]
        t = time.perf_counter()
        runner.infer(inputs[0])
        r.first_inference_ms = round((time.perf_counter() - t) * 1000, 2)
        times = time_loop(lambda i: runner.infer(inputs[i % len(inputs)]), self.warmup, self.iters, self.seconds)
        p = percentiles(times)
        r.model_p50_ms, r.model_p90_ms, r.model_p99_ms, r.model_mean_ms = (round(p[k], 3) for k in
                                                                          ("p50", "p90", "p99", "mean"))
        r.iterations = p["n"]
        r.throughput_img_s = round(batch * 1000.0 / p["mean"], 2)
        if self._encoded is None:
            self._encoded = _encoded_pool(max(self.pool_size, 2))
        det = Detector(runner)
        enc = self._encoded
        pipe = time_loop(lambda i: det.detect([enc[(i + j) % len(enc)] for j in range(batch)]),
                         1, max(3, self.iters // 2), None if self.seconds is None else self.seconds / 2)
        q = percentiles(pipe)
        r.pipeline_p50_ms, r.pipeline_p90_ms, r.pipeline_p99_ms, r.pipeline_mean_ms = (
            round(q[k], 3) for k in ("p50", "p90", "p99", "mean"))
        r.pipeline_throughput_img_s = round(batch * 1000.0 / q["mean"], 2)
        runner.close()


def run_bench(models: Sequence[str], backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int],
              out: str | Path, threads: Optional[int] = None, warmup: int = 3, iters: int = 20,
              seconds: Optional[float] = None, progress: bool = True) -> Dict:
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, threads, warmup, iters, seconds)
    combos = [(m, b, p, n) for m in models for b in backends for p in precisions for n in batches]
    results: List[Result] = []
    report: Dict = {"machine": machine_info(threads), "results": []}
    bar = tqdm(combos, desc="bench", unit="run", disable=not progress)
    for m, b, p, n in bar:
        bar.set_postfix_str(f"{m} {b} {p} b{n}")
        r = bench.run(m, b, p, n, max(batches))
        if r.status != "ok":
            tqdm.write(f"{m} {b} {p} b{n}: {r.status}: {r.reason}")
        else:
            tqdm.write(f"{m} {b} {p} b{n}: p50 {r.model_p50_ms:.1f} ms, pipeline p50 {r.pipeline_p50_ms:.1f} ms, "
                       f"{r.throughput_img_s:.1f} img/s")
        results.append(r)
        report = {"machine": machine_info(threads),
                  "settings": {"warmup": warmup, "iters": iters, "seconds": seconds,
                               "weights": "random init (latency does not depend on them)"},
                  "results": [asdict(x) for x in results]}
        write_reports(report, out, plots=False)  # after every run: a crash keeps what was measured
    write_reports(report, out)
    return report


# -- reports --------------------------------------------------------------------------------------------------

def write_reports(report: Dict, out: Path, plots: bool = True) -> None:
    from .io import atomic_path, write_json

    write_json(out / "bench.json", report)
    rows = report["results"]
    with atomic_path(out / "bench.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r)) or ["model"]  # merged runs: union of columns
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(markdown_table(report))
    if not plots:
        return
    try:
        plot_latency(report, out / "latency.png")
        plot_accuracy_latency(report, out / "accuracy_vs_latency.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'edet-deploy[plot]')")


def _key(r: Dict) -> tuple:
    return r["model"], r["backend"], r["precision"], r["batch"]


def merge_reports(base: Dict, new: Dict) -> Dict:
    """`base` with the rows of `new` replacing or joining its own (same model, backend, precision, batch), for
    adding backends to a sweep too slow to rerun whole. Each part keeps its machine and date in `sources`, and
    the markdown says which rows came from which run; ratios are only taken within one run."""
    def sources(report: Dict) -> List[Dict]:
        return report.get("sources") or [{"machine": report["machine"], "settings": report.get("settings"),
                                          "rows": [list(_key(r)) for r in report["results"]]}]
    new_keys = {_key(r) for r in new["results"]}
    merged_sources = []
    for src in sources(base):
        rows = [k for k in src["rows"] if tuple(k) not in new_keys]
        if rows:
            merged_sources.append({**src, "rows": rows})
    merged_sources += sources(new)
    from .configs import VARIANTS
    variants = list(VARIANTS)

    def order(r: Dict) -> tuple:
        return (variants.index(r["model"]) if r["model"] in variants else len(variants), r["batch"],
                BACKENDS.index(r["backend"]) if r["backend"] in BACKENDS else len(BACKENDS),
                PRECISIONS.index(r["precision"]) if r["precision"] in PRECISIONS else len(PRECISIONS))
    results = sorted([r for r in base["results"] if _key(r) not in new_keys] + list(new["results"]), key=order)
    return {"machine": new["machine"], "settings": new.get("settings"), "sources": merged_sources,
            "results": results}


def _same_run(report: Dict, a: tuple, b: tuple) -> bool:
    srcs = report.get("sources")
    if not srcs:
        return True
    return any([*a] in src["rows"] and [*b] in src["rows"] for src in srcs)


def markdown_table(report: Dict) -> str:
    m = report["machine"]
    lines = [f"# edet-deploy benchmark\n"]
    if report.get("sources"):
        lines.append("Merged from several runs (rows measured together are compared; a ratio never crosses runs):\n")
        for src in report["sources"]:
            sm = src["machine"]
            combos = sorted({f"{k[1]} {k[2]}" for k in src["rows"]})
            models = sorted({k[0] for k in src["rows"]}, key=lambda x: (len(x), x))
            lines.append(f"- {sm['cpu']}, {sm['cores']} cores, {sm['threads']} threads, {sm['date']}: "
                         f"{', '.join(models)} x {', '.join(combos)}. Versions: "
                         + ", ".join(f"{k} {v}" for k, v in sm["versions"].items()))
        lines.append("")
    else:
        lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads used, "
                     f"GPU: {m['gpu'] or 'none'}; {m['date']}. Versions: "
                     + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".\n")
    lines += [
             "Latency in ms (model = graph alone on preprocessed input; pipeline = JPEG decode + preprocess + "
             "model + postprocess). First inference is excluded from percentiles and shown separately.\n",
             "Load = building the runner (graph load and compilation, no cache); first inf. = the first call after.\n",
             "Census: share of the graph's multiply-adds in int8 / fp16 / fp32 under TensorRT's strong typing "
             "(read from the graph's types; torch rows run FP32 eager).\n",
             "| model | backend | precision | batch | model p50 | p90 | p99 | pipeline p50 | img/s | load ms | "
             "first inf. | peak RSS MB | census int8/fp16/fp32 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | "
                         f"{r['status']}: {r['reason']} |||||||| ")
            continue
        lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | {r['model_p50_ms']:.1f} | "
                     f"{r['model_p90_ms']:.1f} | {r['model_p99_ms']:.1f} | {r['pipeline_p50_ms']:.1f} | "
                     f"{r['throughput_img_s']:.2f} | {r.get('load_ms', 0):.0f} | {r['first_inference_ms']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {_census_cell(r)} |")
    for title, pairs in RATIOS:
        ratios = speedups(report, *pairs)
        if ratios:
            lines += ["", f"{title} (model p50, same run; > 1 = faster):", ""]
            lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def _census_cell(r: Dict) -> str:
    if r.get("census_int8") is None:
        return "-"
    return "/".join(f"{100 * r[f'census_{p}']:.0f}%" for p in ("int8", "fp16", "fp32"))


# (title, (backend, precision) measured, (backend, precision) it is compared against)
RATIOS = [("ONNX Runtime FP32 vs eager PyTorch", (("onnxruntime", "fp32"), ("torch", "fp32"))),
          ("OpenVINO FP32 vs ONNX Runtime FP32", (("openvino", "fp32"), ("onnxruntime", "fp32"))),
          ("OpenVINO INT8 (Q/DQ) vs OpenVINO FP32", (("openvino", "int8"), ("openvino", "fp32")))]


def speedups(report: Dict, subject=("onnxruntime", "fp32"), baseline=("torch", "fp32")) -> Dict[str, float]:
    """baseline p50 / subject p50 per model and batch, where both were measured."""
    by = {(r["model"], r["backend"], r["precision"], r["batch"]): r for r in report["results"] if r["status"] == "ok"}
    out = {}
    for (m, b, p, n), r in by.items():
        if ((b, p) == tuple(subject) and (m, *baseline, n) in by
                and _same_run(report, (m, b, p, n), (m, *baseline, n))):
            out[f"{m} b{n}"] = by[(m, *baseline, n)]["model_p50_ms"] / r["model_p50_ms"]
    return out


def _series(report: Dict, batch: int = 1):
    series: Dict[str, List[dict]] = {}
    for r in report["results"]:
        if r["status"] == "ok" and r["batch"] == batch:
            series.setdefault(f"{r['backend']} {r['precision']}", []).append(r)
    return series


def plot_latency(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .configs import VARIANTS

    order = list(VARIANTS)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, rows in sorted(_series(report).items()):
        rows = sorted(rows, key=lambda r: order.index(r["model"]))
        ax.plot([r["model"].upper() for r in rows], [r["model_p50_ms"] for r in rows], marker="o", label=label)
    m = report["machine"]
    ax.set_yscale("log")
    ax.set_ylabel("latency p50, batch 1 (ms, log scale)")
    ax.set_title(f"EfficientDet latency by variant ({m['cores']} cores, {m['gpu'] or 'CPU only'})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_latency(report: Dict, path: Path) -> None:
    """In the style of the EfficientDet paper's figure: published COCO AP against measured latency. Only FP32
    rows are plotted: the published AP is the FP32 model's, and FP16/INT8 COCO AP is not measured here (their
    measured accuracy on the shapes set is benchmarks/results/precision_accuracy.md)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .configs import VARIANTS

    order = list(VARIANTS)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for label, rows in sorted(_series(report).items()):
        rows = sorted((r for r in rows if r["published_coco_ap"] is not None and r["precision"] == "fp32"),
                      key=lambda r: order.index(r["model"]))
        if not rows:
            continue
        xs, ys = [r["model_p50_ms"] for r in rows], [r["published_coco_ap"] for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["model"].upper(), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("measured latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel("COCO AP (published FP32, test-dev)")
    ax.set_title("Accuracy vs latency on this machine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    from .io import atomic_path
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
