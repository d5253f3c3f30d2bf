"""Latency / throughput benchmarks: every variant x backend x precision x batch this machine can run.

Honest by construction: first inference (graph optimisation, numba/JIT compilation) is timed separately,
warm-up iterations are discarded, every iteration gets a fresh input from a pool of distinct images, the
thread count is recorded, and what cannot run here is skipped with a one-line reason. Report formats and plots
are reports.py's; percentiles and machine info are measure.py's."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import EdetError
from .io import signals_deferred
from .log import logger
from .measure import BACKENDS, LOADED_PSI_PCT, PRECISIONS, CpuPressure, machine_info, percentiles
from .reports import write_reports

PLOTS = ("latency.png", "accuracy_vs_latency.png")  # what write_reports draws beside the tables

if TYPE_CHECKING:
    from .data import CocoDataset

# Input size from which INT8 calibration does not fit in 24 GiB, so such variants are skipped with that reason
# rather than killed mid-sweep. Measured from D7's graph at 1536 px (shape inference, batch 1, float32): the
# calibrated tensors (Conv and Add inputs, which ONNX Runtime holds for every image of a collect call) are
# 8.3 GiB per image, and the FP16 overflow check's outputs (every float tensor of one image) 24.7 GiB; a run
# with EDET_INT8_CALIB_MAX_SIZE=4096 was OOM-killed at 24 GiB. Chunking the images does not help: one image
# is already too much. EDET_INT8_CALIB_MAX_SIZE moves the limit on a machine with more memory.
INT8_CALIBRATION_MAX_SIZE = int(os.environ.get("EDET_INT8_CALIB_MAX_SIZE", "1536"))


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
    # Measurements: None (null in JSON, empty in CSV) on a skipped or failed row, never a 0.0 that reads as a time.
    load_ms: Optional[float] = None  # runner construction: graph load + compilation (OpenVINO, TensorRT), cold
    first_inference_ms: Optional[float] = None
    model_p50_ms: Optional[float] = None
    model_p90_ms: Optional[float] = None
    model_p99_ms: Optional[float] = None
    model_mean_ms: Optional[float] = None
    pipeline_p50_ms: Optional[float] = None
    pipeline_p90_ms: Optional[float] = None
    pipeline_p99_ms: Optional[float] = None
    pipeline_mean_ms: Optional[float] = None
    throughput_img_s: Optional[float] = None
    pipeline_throughput_img_s: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    iterations: int = 0
    # The paper's COCO AP of the FP32 architecture: only FP32 rows carry it (no FP16/INT8 COCO AP is measured here).
    published_coco_ap: Optional[float] = None
    # Measured with `bench --data`: COCO mAP@[.5:.95] and AP50 (pycocotools) of the runner that was timed, on
    # `eval_images` images of the given split.
    map: Optional[float] = None
    ap50: Optional[float] = None
    eval_images: Optional[int] = None
    # Precision census of the graph that ran: share of multiply-adds in int8 / fp16 / fp32 (precision/census.py).
    census_int8: Optional[float] = None
    census_fp16: Optional[float] = None
    census_fp32: Optional[float] = None
    # Linux PSI "some" share of the combination's wall time (%): above measure.LOADED_PSI_PCT the row is marked
    # as measured under load, and its numbers are not to be compared with quiet ones.
    cpu_pressure_pct: Optional[float] = None
    under_load: bool = False


MEASUREMENTS = {f.name for f in fields(Result) if f.name.endswith(("_ms", "_img_s", "_mb"))} | {"map", "ap50"}


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
    import tempfile

    from .data import sample_image
    pool = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            h, w = (480, 640) if i % 2 == 0 else (600, 400)
            pool.append(sample_image(Path(tmp) / f"{i}.jpg", seed=seed + i, size=(h, w)).read_bytes())
    return pool


@dataclass(frozen=True)
class Accuracy:
    """What `bench --data` measures accuracy on: a COCO-format split, and the weights that make the numbers
    mean something (random weights score 0). INT8 twins are then calibrated as `calibrate` does by default
    (entropy, on `calib_images` of the dataset's calib split, else train) instead of the latency-only min-max."""
    data: Path
    split: str = "val"
    eval_images: Optional[int] = None  # None: the whole split
    calib_images: int = 100


class Bench:
    def __init__(self, out: Path, threads: Optional[int] = None, warmup: int = 3, iters: int = 20,
                 seconds: Optional[float] = None, calib_images: int = 4, pool: int = 4,
                 weights: Optional[str] = None, accuracy: Optional[Accuracy] = None,
                 dataset: Optional["CocoDataset"] = None):
        self.out, self.threads, self.warmup, self.iters, self.seconds = out, threads, warmup, iters, seconds
        self.calib_images, self.pool_size = calib_images, pool
        self.weights, self.accuracy = weights, accuracy
        self._encoded: Optional[List[bytes]] = None
        self._calib_dir: Optional[Path] = None
        self._dataset = dataset  # the split `accuracy` scores, when already loaded and checked
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    # -- artifacts ------------------------------------------------------------------------------------------
    def graph(self, model: str, precision: str, max_batch: int) -> Path:
        """The graph for one combination, made once per output folder and weights. Latency does not depend on
        the calibration's quality: without `accuracy`, INT8 is a quick min-max calibration on a few images."""
        from .precision.convert import graph_for

        folder = self.out / "graphs" / (f"{model}-{Path(self.weights).stem}" if self.weights else model)
        if self.accuracy is not None:  # as `calibrate` does by default, on the dataset being scored
            data = self.accuracy.data if precision in ("int8", "fp16") else None
            num_images, method = self.accuracy.calib_images, None  # the variant's method
        else:
            data = self.calibration_data() if precision == "int8" else None
            num_images, method = self.calib_images, "minmax"
        return graph_for(model, precision, folder, weights=self.weights, dynamic_batch=max(8, max_batch),
                         data=data, num_images=num_images, method=method)

    def dataset(self):
        if self._dataset is None:
            from .data import CocoDataset
            self._dataset = CocoDataset(self.accuracy.data, self.accuracy.split)
        return self._dataset

    def cpu_graph(self, model: str, backend: str, precision: str, max_batch: int) -> Tuple[Path, Dict]:
        """The graph and runner options of an onnxruntime / openvino combination. bf16 is a runtime setting on
        the FP32 graph. No OpenVINO model cache: load time is the cold compilation a first start pays."""
        from .backends import bf16_options
        graph = self.graph(model, "fp32" if precision == "bf16" else precision, max_batch)
        options: Dict = {"cache_dir": False} if backend == "openvino" else {}
        if precision == "bf16":
            options.update(bf16_options(backend))
        return graph, options

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
            with PeakRss() as mem, CpuPressure() as pressure:
                self._measure(r, model, backend, precision, batch, max_batch)
            r.peak_rss_mb = round(mem.peak / 2**20, 1)
            r.cpu_pressure_pct = pressure.pct
            r.under_load = pressure.pct is not None and pressure.pct > LOADED_PSI_PCT
        except MemoryError:
            r.status, r.reason = "skipped", "out of memory"
        except EdetError as e:
            r.status, r.reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - one failing combination must not end the sweep
            r.status, r.reason = "failed", f"{type(e).__name__}: {e}"
        if r.status != "ok":  # what a failure left half-measured is not a measurement
            r = replace(r, **{f.name: None for f in fields(Result) if f.name in MEASUREMENTS})
        return r

    @staticmethod
    def skip_reason(backend: str, precision: str, image_size: int = 0) -> str:
        if backend in ("onnxruntime", "openvino") and precision == "int8" and image_size >= INT8_CALIBRATION_MAX_SIZE:
            return (f"out of memory: INT8 calibration at {image_size} px holds more than 24 GiB for one image "
                    f"(D7: 8.3 GiB of calibrated tensors, 24.7 GiB in the FP16 overflow check)")
        if backend == "torch" and precision != "fp32":
            return "torch eager is the FP32 reference; FP16/INT8 run through ONNX Runtime and TensorRT"
        if precision == "bf16":
            from .backends import bf16_options
            from .backends.openvino import NO_BF16_CPU, cpu_has_bf16
            try:
                bf16_options(backend)
            except EdetError as e:
                return str(e)
            if not cpu_has_bf16():
                return NO_BF16_CPU
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

        if backend == "torch":
            import torch
            torch.manual_seed(0)
            t = time.perf_counter()
            runner = create_runner("torch", model_name=model, weights=self.weights, threads=self.threads)
        elif backend in ("onnxruntime", "openvino"):
            graph, options = self.cpu_graph(model, backend, precision, max_batch)
            if precision != "bf16":  # a bf16 run is not described by the FP32 graph's types
                self._census(r, graph)
            t = time.perf_counter()
            runner = create_runner(backend, onnx_path=str(graph), threads=self.threads, **options)
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
        if self.accuracy is not None and batch == 1:  # accuracy does not depend on the batch: measured once
            try:
                self._evaluate(r, det)
            except Exception as e:  # noqa: BLE001 - the latency above is measured: a failed score must not void it
                why = str(e) if isinstance(e, EdetError) else f"{type(e).__name__}: {e}"
                r.reason = f"accuracy not measured: {why}"
                logger.warning("%s %s %s b%d: %s", model, backend, precision, batch, r.reason)
        runner.close()

    def _evaluate(self, r: Result, det) -> None:
        """mAP of the very runner that was timed (after the timing, so it costs none of it)."""
        from .eval import evaluate
        rep = evaluate(det, self.dataset(), self.accuracy.eval_images, progress=False)
        r.map, r.ap50, r.eval_images = rep["stats"]["AP"], rep["stats"]["AP50"], rep["images"]


def sweep_options(backends: str, precisions: str, batches: str | Sequence[int]) -> Tuple[List[str], List[str], List[int]]:
    """The comma-separated `bench` options as lists (batches may come parsed already), refused with one message
    before hours of sweep start."""
    backend_list = [b.strip() for b in backends.split(",") if b.strip()]
    precision_list = [x.strip() for x in precisions.split(",") if x.strip()]
    if not backend_list:
        raise EdetError(f"--backends names no backend; choose from {','.join(BACKENDS)}")
    if not precision_list:
        raise EdetError(f"--precisions names no precision; choose from {','.join(PRECISIONS)}")
    bad = [b for b in backend_list if b not in BACKENDS] + [x for x in precision_list if x not in PRECISIONS]
    if bad:
        raise EdetError(f"unknown backend/precision {bad}")
    try:
        batch_list = [int(b) for b in (batches.split(",") if isinstance(batches, str) else batches)]
    except ValueError:
        raise EdetError(f"--batch takes integers, got {batches!r}") from None
    if not batch_list or min(batch_list) < 1:
        raise EdetError(f"--batch takes batch sizes >= 1, got {batches!r}")
    return backend_list, precision_list, batch_list


def _checked_dataset(accuracy: Accuracy, weights: str) -> "CocoDataset":
    """The split `accuracy` scores, refused before the sweep starts (exit 2, nothing measured) when it is
    missing, one of its images is unreadable or does not match its entry, or its categories do not pair with
    the weights' classes (`eval.category_map`)."""
    from .data import CocoDataset
    from .eval import category_map
    from .model.weights import checkpoint_metadata

    dataset = CocoDataset(accuracy.data, accuracy.split)
    meta = checkpoint_metadata(weights)
    names = list(meta.get("class_names") or [])
    num_classes = int(meta.get("num_classes") or len(names))
    if num_classes:  # effdet .pth files name no classes: their head's size is only known once the graph is made
        category_map(names, num_classes, dataset)
    dataset.check_images(accuracy.eval_images)
    return dataset


def run_bench(models: Sequence[str], backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int],
              out: str | Path, threads: Optional[int] = None, warmup: int = 3, iters: int = 20,
              seconds: Optional[float] = None, progress: bool = True, weights: Optional[str] = None,
              accuracy: Optional[Accuracy] = None) -> Dict:
    """Time every combination (and with `accuracy`, measure its mAP); reports are rewritten after each one, from
    the first measured one on: a sweep that measures nothing leaves the reports already in `out` as they were."""
    from tqdm import tqdm

    for flag, values in (("--models", models), ("--backends", backends), ("--precisions", precisions),
                         ("--batch", batches)):
        if not values:  # no combination: refused rather than a sweep of nothing
            raise EdetError(f"{flag} names nothing to bench")
    if weights is not None and len(models) != 1:
        raise EdetError("--weights fit one variant: bench a single --models entry with them")
    if weights is not None:  # refused here, not as one skipped row per combination
        from .io import existing_file
        existing_file(weights, "weights file")
        try:
            open(weights, "rb").close()
        except OSError as e:
            raise EdetError(f"cannot read weights {weights}: {e.strerror}") from None
    dataset = None
    if accuracy is not None:
        if weights is None:
            raise EdetError("--data measures accuracy, which needs trained --weights (random weights score 0)")
        dataset = _checked_dataset(accuracy, weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, threads, warmup, iters, seconds, weights=weights, accuracy=accuracy, dataset=dataset)
    combos = [(m, b, p, n) for m in models for b in backends for p in precisions for n in batches]
    results: List[Result] = []
    report: Dict = {"machine": machine_info(threads), "results": []}
    bar = tqdm(combos, desc="bench", unit="run", disable=not progress)
    stale_plots_gone = False
    for m, b, p, n in bar:
        bar.set_postfix_str(f"{m} {b} {p} b{n}")
        r = bench.run(m, b, p, n, max(batches))
        if r.status != "ok":
            tqdm.write(f"{m} {b} {p} b{n}: {r.status}: {r.reason}")
        else:
            tqdm.write(f"{m} {b} {p} b{n}: p50 {r.model_p50_ms:.1f} ms, pipeline p50 {r.pipeline_p50_ms:.1f} ms, "
                       f"{r.throughput_img_s:.1f} img/s" + ("" if r.map is None else f", mAP {r.map:.4f}"))
            if r.under_load:
                logger.warning("%s %s %s b%d was measured under load (CPU pressure %.0f%% of its time): compare "
                               "it only with rows measured alike, or rerun on a quiet machine", m, b, p, n,
                               r.cpu_pressure_pct)
        results.append(r)
        report = {"machine": machine_info(threads),
                  "settings": {"warmup": warmup, "iters": iters, "seconds": seconds,
                               "weights": weights or "random init (latency does not depend on them)",
                               "accuracy": None if accuracy is None else {**asdict(accuracy), "data": str(accuracy.data)}},
                  "results": [asdict(x) for x in results]}
        if any(x.status == "ok" for x in results):  # after every run: a crash keeps what was measured
            if not stale_plots_gone:  # never this run's tables beside an earlier run's plots
                for plot in PLOTS:
                    (out / plot).unlink(missing_ok=True)
                stale_plots_gone = True
            with signals_deferred():  # the three tables land together: a Ctrl-C waits for them
                write_reports(report, out, plots=False)
    if any(x.status == "ok" for x in results):
        with signals_deferred():
            write_reports(report, out)
    return report
