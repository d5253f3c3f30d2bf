"""From a variant to its FP32 detection graph, and from that graph to its FP16 or INT8 twin, metadata included.
The twins are made on the network part (the graph without its soft-NMS node, stripped once on reading and
attached once on writing), so only `graph_for`'s export needs PyTorch."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

from ..artifacts import ExportResult, save_graph
from ..configs import get_config
from ..contract import INPUT_NAME, artifact_name
from ..errors import EdetError
from ..io import existing_file, load_onnx, sha256_file
from ..metadata import ArtifactMetadata, read_artifact_metadata
from ..nms.graph import attach_nms, strip_nms
from .census import census
from .int8 import Int8Options, calibration_images, calibration_steps, check_qdq, quantize_candidates

FEED_IMAGES = 32  # calibration images that equalization and threshold refinement measure on


def _load(onnx_path: str | Path):
    path = existing_file(onnx_path, "ONNX graph")
    meta = read_artifact_metadata(path)
    if meta.precision != "fp32":
        raise EdetError(f"{path} is already {meta.precision}; start from the FP32 export")
    candidate, settings = strip_nms(load_onnx(path))
    return path, meta, candidate, settings


def _finish(candidate, settings, meta: ArtifactMetadata, out: Path) -> ExportResult:
    proto = attach_nms(candidate, settings) if settings is not None else candidate
    return save_graph(proto, out, replace(meta, outputs=tuple(o.name for o in proto.graph.output)))


def _twin_path(path: Path, meta: ArtifactMetadata, precision: str, nms: bool) -> Path:
    """Where a converted graph goes without `out`: beside its source, with the contract's precision suffix
    (efficientdet_d0.onnx -> efficientdet_d0.fp16.onnx); a renamed export keeps its own stem."""
    suffix = artifact_name(meta.variant, precision, nms)[len(artifact_name(meta.variant, nms=nms)):]
    return path.with_name(f"{path.stem}{suffix}.onnx")


def _feeds(paths, meta: ArtifactMetadata) -> list:
    """Graph inputs (batch 1) of the images at `paths`, letterboxed."""
    from ..preprocess import decode_image, letterbox
    return [{INPUT_NAME: letterbox(decode_image(p), meta.image_size, meta.mean)[0][None]} for p in paths]


def _overflow_keep(candidate, meta: ArtifactMetadata, data, num_images: int, bar=None) -> set:
    """Network nodes whose FP32 values exceed half the FP16 range on a few images of `data`: they stay FP32."""
    from .fp16 import overflow_nodes
    return overflow_nodes(candidate, _feeds(calibration_images(data, num_images), meta), bar=bar)


def to_fp16(onnx_path: str | Path, out: Optional[str | Path] = None, data: Optional[str | Path] = None,
            num_images: int = 8) -> ExportResult:
    """FP16 twin of a graph. With `data`, network nodes whose FP32 values exceed half the FP16 range on those
    images stay FP32."""
    from .fp16 import convert_to_fp16

    path, meta, candidate, settings = _load(onnx_path)
    keep = _overflow_keep(candidate, meta, data, num_images) if data is not None else set()
    converted = convert_to_fp16(candidate, keep)
    meta = replace(meta, precision="fp16", source={"onnx": str(path), "sha256": sha256_file(path)},
                   fp16={"kept_fp32": sorted(keep)}, census=census(converted))
    return _finish(converted, settings, meta,
                   Path(out) if out else _twin_path(path, meta, "fp16", settings is not None))


def to_int8(onnx_path: str | Path, data: str | Path, out: Optional[str | Path] = None,
            options: Optional[Int8Options] = None, *, progress: bool = True, **choices) -> ExportResult:
    """INT8 twin of a graph: its FP16 twin plus Q/DQ calibrated on `options.num_images` images of `data`
    (`choices`: Int8Options fields overriding `options`). With `equalize`, the FP32 graph's depthwise channels
    are equalized first (equalize.py), and with `refine` the calibrated thresholds are tightened by the error of
    the layer each tensor feeds (refine.py), both on the first 32 of the images. The FP16 overflow check uses
    the first 8 of them, as `convert --fp16 --data` does. `progress`: one bar over every phase."""
    from ..progress import job_bar, phase, tick

    opts = replace(options or Int8Options(), **choices)
    path, meta, candidate, settings = _load(onnx_path)
    opts = opts.for_variant(meta.variant)
    num_images, method, equalize, refine = opts.num_images, opts.method, opts.equalize, opts.refine
    if not meta.batch.get("dynamic") and meta.batch.get("max", 1) != 1:
        raise EdetError("calibrate a batch-1 or dynamic-batch export")
    images = calibration_images(data, num_images)
    cache = opts.cache_dir or path.parent / ".calibration_cache"
    equalized = None
    feeds = _feeds(images[:FEED_IMAGES], meta) if equalize or refine else []
    overflow_images = min(8, num_images)
    # One bar over every phase, one step per image each phase reads (and per tensor of the entropy search).
    steps = ((len(feeds) if equalize else 0) + overflow_images + calibration_steps(candidate, images, method)
             + (len(feeds) if refine else 0) + 1)
    with job_bar(progress, steps, f"calibrate {meta.variant} int8-{method}") as bar:
        if equalize:
            from .equalize import equalize as equalize_channels
            candidate, equalized = equalize_channels(candidate, feeds, bar=bar)
        keep = _overflow_keep(candidate, meta, data, overflow_images, bar)
        quantized, info = quantize_candidates(candidate, images, method, opts.exclude, cache, int(meta.image_size),
                                              keep, bar, feeds if refine else None, fill=meta.mean)
        phase(bar, "writing the graph")
        info["equalization"] = equalized
        info.update(check_qdq(quantized))
        meta = replace(meta, precision="int8", source={"onnx": str(path), "sha256": sha256_file(path)},
                       int8=info, fp16={"kept_fp32": sorted(keep)}, census=census(quantized))
        made = _finish(quantized, settings, meta,
                       Path(out) if out else _twin_path(path, meta, f"int8-{method}", settings is not None))
        tick(bar, steps - bar.n)
    return made


def graph_for(model: str, precision: str, out_dir: str | Path, *, weights: Optional[str] = None,
              dynamic_batch: Optional[int] = None, data: Optional[str | Path] = None, num_images: int = 500,
              method: Optional[str] = None, exclude: Iterable[str] = (), tag: str = "", reuse: bool = True,
              equalize: bool = True, refine: bool = True, progress: bool = False) -> Path:
    """The graph a benchmark runs for `model` at `precision`, written once here for the bench harness, the GPU
    acceptance and the accuracy benchmark: the FP32 export in `out_dir` (random weights seeded, so reruns
    measure the same network), its FP16 twin (`data`: keep overflowing nodes FP32) or its INT8 twin calibrated
    on `num_images` of `data` with `method` (None: the variant's). `tag` tells apart INT8 twins with different `exclude`s. With
    `reuse`, a graph already on disk is returned as it is; without, the requested one is made again (its FP32
    source is still reused once exported)."""
    if precision not in ("fp32", "fp16", "int8"):
        raise EdetError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    if precision == "int8" and data is None:
        raise EdetError("an INT8 graph needs calibration data")
    out_dir = Path(out_dir)
    fp32 = out_dir / f"{artifact_name(model)}.onnx"
    if precision == "fp32" and not reuse or not fp32.is_file():
        from ..export import export_onnx
        if weights is None:
            import torch
            torch.manual_seed(0)
        export_onnx(model, out_dir, weights=weights, dynamic_batch=dynamic_batch)
    if precision == "fp32":
        return fp32
    if precision == "fp16":
        path = out_dir / f"{artifact_name(model, 'fp16')}.onnx"
        return path if reuse and path.is_file() else to_fp16(fp32, path, data).onnx_path
    method = method or get_config(model).calib_method
    path = out_dir / f"{artifact_name(model, f'int8-{method}{tag}')}.onnx"
    options = Int8Options(num_images=num_images, method=method, exclude=tuple(exclude), equalize=equalize,
                          refine=refine)
    return path if reuse and path.is_file() else to_int8(fp32, data, path, options, progress=progress).onnx_path
