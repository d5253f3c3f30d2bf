"""INT8 twin for TensorRT 11's strong typing: the FP16 twin plus explicit Q/DQ (symmetric, zero point 0,
per-channel weights) placed as TensorRT recommends (see qdq.py), so whatever is not int8 runs in fp16.
Calibration runs ONNX Runtime's calibrators (min/max, percentile; for entropy they collect the |x| histograms and
kl.py searches them as TensorRT does) on CPU on the FP32 network part: the graph without its soft-NMS node
(nms/graph.py). Ranges are cached, so a second run with the same inputs is instant."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from ..configs import MEAN_RGB, get_config
from ..contract import INPUT_NAME
from ..errors import EdetError
from ..io import sha256_file
from ..log import logger
from .fp16 import NETWORK_PREFIX
from .kl import kl_threshold
from .qdq import check_qdq, plan_qdq, qdq_violations  # noqa: F401 - check_qdq is part of this module's API

METHODS = ("entropy", "percentile", "minmax")


@dataclass(frozen=True, kw_only=True)
class Int8Options:
    """How an INT8 twin is calibrated: the one set of choices that `calibrate`, `to_int8`, the sensitivity sweep
    and the benchmarks pass on (instead of a positional list through four files)."""
    num_images: int = 500
    method: Optional[str] = None  # activation ranges (METHODS, `calibrate`); None: the variant's calib_method
    exclude: Tuple[str, ...] = ()  # node-name patterns kept in float (fnmatch or substring)
    cache_dir: Optional[Path] = None  # calibration-range cache; None: .calibration_cache beside the graph
    equalize: bool = True  # equalize depthwise channels first (equalize.py)
    refine: bool = True  # tighten thresholds by the error of the layer each feeds (refine.py)

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise EdetError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if int(self.num_images) < 1:
            raise EdetError(f"calibration needs at least 1 image, got {self.num_images}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def for_variant(self, variant: str) -> "Int8Options":
        """These options with the method stated: the given one, else `variant`'s (configs.calib_method)."""
        return self if self.method else replace(self, method=get_config(variant).calib_method)
QUANTIZED_OPS = ("Conv",)
# Entropy calibration as TensorRT's entropy calibrator does it: a 2048-bin histogram of |x|, searched for the
# clipping threshold whose 128-level quantization has the least KL divergence to it (`kl_threshold`). ONNX
# Runtime's own search (on a signed histogram, whole-bin merging, integer-truncated expansion) jumps with the
# histogram's range: 100 more images moved two box-head thresholds 3x and 7x (500 images: mAP 0.689, FP32 0.754).
CALIB_OPTIONS = {"CalibNumBins": 2048, "KLQuantizedBins": 128, "KL": "tensorrt"}


class ImageReader:
    """ONNX Runtime CalibrationDataReader over letterboxed images, one per batch, handed out in chunks: ONNX
    Runtime keeps every activation of every image it is given until its histograms are made (about 54 MB per
    image for D0 at 256 px, so 500 images overflowed 24 GiB), and it merges histograms across calls."""

    def __init__(self, paths: Sequence[Path], size: int, chunk: int, bar=None, phase: str = "calibration",
                 fill: Sequence[float] = MEAN_RGB):
        from ..progress import phase as name_phase

        self.paths, self.size, self.chunk, self.i, self.end = list(paths), size, chunk, 0, 0
        self.fill = fill  # letterbox padding: the graph's mean colour
        self.bar = bar  # one step per image handed out
        name_phase(bar, phase)

    def next_chunk(self) -> bool:
        """Open the next chunk of images; False when all were read."""
        if self.i >= len(self.paths):
            return False
        self.end = min(self.i + self.chunk, len(self.paths))
        return True

    def get_next(self):
        from ..preprocess import decode_image, letterbox
        if self.i >= self.end:
            return None
        img, _ = letterbox(decode_image(self.paths[self.i]), self.size, self.fill)
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)
        return {INPUT_NAME: img[None]}

    def rewind(self) -> None:
        self.i = 0


def calibration_chunk(image_size: int) -> int:
    """Images per collect_data call, from the input size alone: 16 at 512 px (D0: about 2.6 GiB of calibrated
    tensors), fewer as the input grows, at least 4 so that the largest inputs still get few calls. Wider
    variants hold more per image than the size says (D7 at 1536 px: 8.3 GiB each), which is why bench skips
    INT8 from 1536 px on this 24 GiB machine."""
    return max(4, round(16 * (512 / image_size) ** 2))


def calibration_images(data: str | Path, num_images: int, split: str = "calib") -> List[Path]:
    """Images for calibration: a COCO-format split (`calib`, else `train`) or a plain folder of images."""
    from ..data import CocoDataset
    from ..data.coco import decoded_sizes, find_split
    from ..preprocess import image_suffixes

    data = Path(data)
    if not data.exists():
        raise EdetError(f"calibration data not found: {data}")
    paths: List[Path] = []
    for name in (split, "train"):
        try:
            find_split(data, name)
        except EdetError:  # no such split here: the next one, else a plain folder of images
            continue
        ds = CocoDataset(data, name)  # a split that is there but malformed is refused, not skipped
        paths = [ds.image_path(i) for i in range(len(ds))]
        break
    suffixes = image_suffixes()  # what `detect` reads, so a folder of WebP or TIFF images counts too
    if not paths and data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in suffixes)
    if not paths:
        raise EdetError(f"no calibration images in {data} (expected a COCO split or image files: "
                        f"{', '.join(sorted(suffixes))})")
    paths = paths[:num_images]
    decoded_sizes(paths, "calibration")  # refuse unreadable data up front, naming the files
    return paths


def network_nodes(proto: onnx.ModelProto, exclude: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """(nodes to quantize, nodes excluded): network Convs not matching any exclude pattern (fnmatch on names, or a
    substring). A pattern that matches none of them (a typo) or one that leaves nothing to quantize is refused:
    either would make an "INT8" graph other than the one asked for."""
    patterns = list(exclude)
    include, excluded = [], []
    matched = set()
    for n in proto.graph.node:
        if n.op_type not in QUANTIZED_OPS or not n.name.startswith(NETWORK_PREFIX):
            continue
        hits = {p for p in patterns if fnmatch.fnmatch(n.name, p) or p in n.name}
        matched |= hits
        (excluded if hits else include).append(n.name)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        names = include + excluded
        raise EdetError(f"--exclude {' '.join(repr(p) for p in unmatched)} matches no Conv of the network (names "
                        f"look like {names[len(names) // 2] if names else '?'!r})")
    if patterns and not include:
        raise EdetError(f"--exclude {' '.join(repr(p) for p in patterns)} keeps every Conv in float: nothing would "
                        f"be INT8")
    return include, excluded


def cache_key(candidate: onnx.ModelProto, images: Sequence[Path], method: str, tensors: Sequence[str],
              chunk: int) -> str:
    """What the ranges depend on: the graph and its opsets (not the model's metadata, whose export time changes
    with every export of the same weights: a re-export must find its ranges), the images' contents, method and
    merging."""
    h = hashlib.sha256(candidate.graph.SerializeToString())
    for opset in sorted((o.domain, o.version) for o in candidate.opset_import):
        h.update(f"opset {opset[0]}:{opset[1]}".encode())
    h.update(method.encode())
    h.update(json.dumps(CALIB_OPTIONS, sort_keys=True).encode())
    h.update(f"chunk {chunk}, seeded histograms".encode())  # how the histograms were merged
    h.update("\n".join(sorted(tensors)).encode())
    # The bytes, not path and size: an image overwritten by another of the same size must miss the cache. Costs
    # 15-18 ms for the default 500 shapes calibration images (11.8 MB), next to ~0.4 s to decode them.
    for p in images:
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:20]


def calibration_tensors(candidate: onnx.ModelProto) -> List[str]:
    """Activation tensors any Q/DQ placement of this graph can need: the inputs of every network Conv and the
    residual inputs of fusible Adds (all Convs quantized). Exclusions pick a subset, so one cache serves all."""
    include, _ = network_nodes(candidate)
    return sorted(plan_qdq(candidate.graph, include).activations)


def calibration_steps(candidate: onnx.ModelProto, images: Sequence[Path], method: str) -> int:
    """The `bar` steps `calibrate` takes: a pass over the images (two for the histogram methods), and for
    entropy one step per tensor's threshold search."""
    passes = 1 if method == "minmax" else 2
    return passes * len(images) + (len(calibration_tensors(candidate)) if method == "entropy" else 0)


def calibrate(candidate: onnx.ModelProto, images: Sequence[Path], method: str, cache_dir: Optional[Path],
              image_size: int, bar=None, fill: Sequence[float] = MEAN_RGB
              ) -> Tuple[Dict[str, float], bool, Optional[Path]]:
    """|max| per activation tensor ({name: amax}), from the cache when the same graph, images and method were
    calibrated before. Returns (ranges, cache hit, cache file). ONNX Runtime's own prints go to the debug log,
    never to stdout."""
    import contextlib
    import io
    import tempfile
    from unittest import mock

    from onnxruntime.quantization.calibrate import CalibraterBase, CalibrationMethod, create_calibrator

    from ..io import write_json
    from ..progress import tick, ticking

    tensors = calibration_tensors(candidate)
    chunk = calibration_chunk(image_size)
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"ranges-{method}-{cache_key(candidate, images, method, tensors, chunk)}.json"
        cached = read_cached_ranges(cache, tensors) if cache.is_file() else None
        if cached is not None:
            tick(bar, calibration_steps(candidate, images, method))
            return cached, True, cache
    wanted = set(tensors)
    select = CalibraterBase.select_tensors_to_calibrate

    def only_wanted(self, model):  # ORT calibrates inputs *and* outputs of an op type; we need the inputs
        found, infos = select(self, model)
        return found & wanted, infos

    # Entropy collects the percentile method's |x| histograms; its threshold is ours (kl_threshold).
    calib_method = {"entropy": CalibrationMethod.Percentile, "percentile": CalibrationMethod.Percentile,
                    "minmax": CalibrationMethod.MinMax}[method]
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(printed):
        src = Path(tmp) / "candidate.onnx"
        onnx.save(candidate, str(src))
        # Calibrate here rather than inside quantize_static, which does not pass the histogram sizes on.
        with mock.patch.object(CalibraterBase, "select_tensors_to_calibrate", only_wanted):
            calibrator = create_calibrator(src, ["Conv", "Add"], str(Path(tmp) / "augmented.onnx"), calib_method,
                                           extra_options={"symmetric": True, "percentile": 99.999,
                                                          "num_bins": CALIB_OPTIONS["CalibNumBins"]})
        if method != "minmax":  # min/max merge exactly; histograms only over fixed edges
            _seed_histograms(calibrator, ImageReader(images, image_size, chunk, bar, "calibration: ranges", fill))
        reader = ImageReader(images, image_size, chunk, bar, "calibration: " +
                             ("min/max" if method == "minmax" else "histograms"), fill)
        while reader.next_chunk():
            calibrator.collect_data(reader)
        if method == "entropy":
            histograms = calibrator.collector.histogram_dict
            amax = {name: kl_threshold(*histograms[name][:2], levels=CALIB_OPTIONS["KLQuantizedBins"])
                    if name in histograms else 0.0 for name in ticking(tensors, bar, "calibration: entropy search")}
        else:
            data = calibrator.compute_data()
            amax = {}
            for name in tensors:
                lo, hi = data.data[name].range_value
                amax[name] = float(max(abs(float(np.asarray(lo).max())), abs(float(np.asarray(hi).max()))))
        del calibrator
    if printed.getvalue().strip():
        logger.debug("ONNX Runtime's calibrator said: %s", " | ".join(printed.getvalue().split("\n")))
    if cache is not None:
        if all(_valid_amax(v) for v in amax.values()):
            write_json(cache, {"method": method, "num_images": len(images), "amax": amax})
        else:  # an all-zero tensor: ranges the reader would refuse are not cached, nor is a stale file kept
            cache.unlink(missing_ok=True)
    return amax, False, cache


def _valid_amax(value: object) -> bool:
    """A usable range: a finite number > 0 (JSON's true/false and strings are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_cached_ranges(cache: Path, tensors: Sequence[str]) -> Optional[Dict[str, float]]:
    """The ranges a cache file holds, or None (with one warning naming it) when it cannot be read or is not
    valid: not JSON, another structure, a tensor missing, or a range that is not a finite number > 0, which
    would quantize its tensor to nothing. The caller recalibrates and overwrites it: a broken file must cost a
    calibration, not every later run nor an INT8 graph that detects nothing."""
    try:
        amax = json.loads(cache.read_text())["amax"]
        why = ("not a mapping of ranges" if not isinstance(amax, dict)
               else "ranges missing" if not set(tensors) <= set(amax)
               else "ranges that are not finite numbers > 0" if not all(_valid_amax(v) for v in amax.values())
               else "")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {e}"
    if why:
        logger.warning("calibration cache %s is unusable (%s): recalibrating and rewriting it", cache,
                       " ".join(why.split()))
        return None
    return {k: float(v) for k, v in amax.items()}


def _seed_histograms(calibrator, reader: ImageReader) -> None:
    """Give ONNX Runtime's histogram collector each tensor's final range before the first chunk. Otherwise the
    first chunk fixes the bin width and later chunks add bins, which moved entropy calibration by a mAP point
    (400 images: 0.734 in one call, 0.722 in chunks); over fixed edges the chunks' histograms add up exactly to
    the one-call histogram. Costs one more inference pass over the images."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    names = [o.name for o in calibrator.infer_session.get_outputs() if o.name in calibrator.tensors_to_calibrate]
    lo: Dict[str, float] = {}
    hi: Dict[str, float] = {}
    while reader.next_chunk():
        while (inputs := reader.get_next()) is not None:
            for name, value in zip(names, calibrator.infer_session.run(names, inputs)):
                lo[name] = min(lo.get(name, np.inf), float(np.nanmin(value)))
                hi[name] = max(hi.get(name, -np.inf), float(np.nanmax(value)))
    collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                   num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                   percentile=calibrator.percentile, scenario=calibrator.scenario)
    for name in names:
        mn, mx = np.float32(lo[name]), np.float32(hi[name])
        amax = np.float32(max(abs(mn), abs(mx)))
        if amax == 0:
            continue  # an all-zero tensor: let ONNX Runtime handle it as it does in one call
        # The layout of HistogramCollector.collect_absolute_value, which both histogram methods use here
        # (entropy collects the percentile method's |x| histograms): |x| over (0, amax).
        hist, edges = np.histogram(np.zeros(0, dtype=np.float32), calibrator.num_bins, range=(0, amax))
        collector.histogram_dict[name] = (hist, edges.astype(np.float32), mn, mx)
    calibrator.collector = collector


def quantize_candidates(candidate: onnx.ModelProto, images: Sequence[Path], method: str = "entropy",
                        exclude: Iterable[str] = (), cache_dir: Optional[Path] = None, image_size: int = 512,
                        keep_fp32: Iterable[str] = (), bar=None,
                        refine_feeds: Optional[Sequence[Dict[str, np.ndarray]]] = None,
                        fill: Sequence[float] = MEAN_RGB) -> Tuple[onnx.ModelProto, Dict]:
    """The INT8 twin of a candidate graph: its FP16 twin (nodes in `keep_fp32` stay FP32) with Q/DQ on the
    inputs of the network Convs not excluded, and on the residual inputs of the Adds TensorRT fuses with them.
    With `refine_feeds` (graph inputs), the calibrated Conv-input thresholds are tightened by the error of the
    layer each feeds (refine.py). Returns (model, info)."""
    from .fp16 import convert_to_fp16
    from .qdq import insert_qdq

    if method not in METHODS:
        raise EdetError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    include, excluded = network_nodes(candidate, exclude)
    t = time.perf_counter()
    amax, hit, cache = calibrate(candidate, images, method, cache_dir, image_size, bar, fill)
    refined = None
    if refine_feeds is not None:
        from .refine import refine_thresholds
        amax, refined = refine_thresholds(candidate, amax, include, refine_feeds, bar=bar)
    fp32_weights = {i.name: numpy_helper.to_array(i) for i in candidate.graph.initializer}
    half = convert_to_fp16(candidate, keep_fp32)
    quantized, counts = insert_qdq(half, include, amax, fp32_weights)
    info = {"method": method, "num_images": len(images), "quantized_convs": len(include),
            "excluded_convs": excluded, "residual_adds": counts["residual_adds"],
            "qdq_activations": counts["qdq_activations"], "opset": counts["opset"], "base": "fp16",
            "refinement": refined, "kept_fp32": sorted(keep_fp32),
            "cache": str(cache) if cache is not None else None, "cache_hit": hit,
            "seconds": round(time.perf_counter() - t, 1)}
    logger.info("INT8: %d convs quantized, %d kept in fp16 (%s, %s)", len(include), len(excluded), method,
                "cached ranges" if hit else f"{len(images)} calibration images")
    return quantized, info
