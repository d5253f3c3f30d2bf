"""From an exported FP32 detection graph to its FP16 or INT8 twin, metadata included."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import onnx

from ..contract import INPUT_NAME, artifact_name
from ..errors import EdetError
from ..export.onnx_export import ExportResult, attach_nms, save_graph
from ..io import sha256_file
from ..metadata import ArtifactMetadata, read_artifact_metadata
from .census import census
from .int8 import METHODS, calibration_images, check_qdq, quantize_candidates, strip_nms


def _load(onnx_path: str | Path):
    path = Path(onnx_path)
    if not path.is_file():
        raise EdetError(f"ONNX graph not found: {path}")
    meta = read_artifact_metadata(path)
    if meta.precision != "fp32":
        raise EdetError(f"{path} is already {meta.precision}; start from the FP32 export")
    candidate, settings = strip_nms(onnx.load(str(path)))
    return path, meta, candidate, settings


def _finish(candidate, settings, meta: ArtifactMetadata, out: Path) -> ExportResult:
    proto = attach_nms(candidate, settings) if settings is not None else candidate
    return save_graph(proto, out, replace(meta, outputs=tuple(o.name for o in proto.graph.output)))


def _twin_path(path: Path, meta: ArtifactMetadata, precision: str, nms: bool) -> Path:
    """Where a converted graph goes without `out`: beside its source, with the contract's precision suffix
    (efficientdet_d0.onnx -> efficientdet_d0.fp16.onnx); a renamed export keeps its own stem."""
    suffix = artifact_name(meta.variant, precision, nms)[len(artifact_name(meta.variant, nms=nms)):]
    return path.with_name(f"{path.stem}{suffix}.onnx")


def _overflow_keep(candidate, meta: ArtifactMetadata, data, num_images: int) -> set:
    """Network nodes whose FP32 values exceed half the FP16 range on a few images of `data`: they stay FP32."""
    from ..preprocess import decode_image, letterbox
    from .fp16 import overflow_nodes

    feeds = [{INPUT_NAME: letterbox(decode_image(p), meta.image_size)[0][None]}
             for p in calibration_images(data, num_images)]
    return overflow_nodes(candidate, feeds)


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


def to_int8(onnx_path: str | Path, data: str | Path, out: Optional[str | Path] = None, num_images: int = 500,
            method: str = "entropy", exclude: Iterable[str] = (), cache_dir: Optional[str | Path] = None,
            progress: bool = True) -> ExportResult:
    """INT8 twin of a graph: its FP16 twin plus Q/DQ calibrated on `num_images` images of `data` (the FP16
    overflow check uses the first 8 of them, as `convert --fp16 --data` does)."""
    path, meta, candidate, settings = _load(onnx_path)
    if not meta.batch.get("dynamic") and meta.batch.get("max", 1) != 1:
        raise EdetError("calibrate a batch-1 or dynamic-batch export")
    if method not in METHODS:
        raise EdetError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    images = calibration_images(data, num_images)
    cache = Path(cache_dir) if cache_dir else path.parent / ".calibration_cache"
    keep = _overflow_keep(candidate, meta, data, min(8, num_images))
    quantized, info = quantize_candidates(candidate, images, method, exclude, cache, int(meta.image_size),
                                          keep, progress)
    info.update(check_qdq(quantized))
    meta = replace(meta, precision="int8", source={"onnx": str(path), "sha256": sha256_file(path)}, int8=info,
                   fp16={"kept_fp32": sorted(keep)}, census=census(quantized))
    return _finish(quantized, settings, meta,
                   Path(out) if out else _twin_path(path, meta, f"int8-{method}", settings is not None))
