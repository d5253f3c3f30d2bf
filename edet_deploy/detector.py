"""`Detector`: preprocessing -> backend -> postprocessing, the in-process pipeline every entry point uses."""
from __future__ import annotations

import collections.abc
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .backends import CPU_GRAPH_BACKENDS, DEFAULT_CPU_BACKEND, Runner, bf16_options, create_runner, precision_options
from .backends.base import MAX_THREADS, check_number
from .contract import artifact_name, cache_dir
from .errors import EdetError
from .io import existing_file
from .log import logger
from .postprocess import Detections, split_detections
from .preprocess import IMAGE_SOURCE_TYPES, ImageSource, check_source, preprocess


def _check_arguments(min_score: float, threads: Optional[int] = None) -> None:
    """The numeric arguments of the constructors, refused in one line before a runner loads or a model exports
    (the ranges of the CLI's --min-score and --threads)."""
    check_number(min_score, "min_score", 0.0, 1.0)
    if threads is not None:
        check_number(threads, "threads", 1, MAX_THREADS, integer=True)


class Detector:
    def __init__(self, runner: Runner, min_score: float = 0.0):
        self.runner = runner
        self.min_score = check_number(min_score, "min_score", 0.0, 1.0)
        meta = runner.metadata
        if not meta.get("nms"):
            raise EdetError("this graph was exported with --nms none; Detector needs the soft-NMS outputs")
        self.image_size = int(meta["image_size"])
        self.fill = tuple(meta["mean"])  # the letterbox padding: the variant's mean colour
        self.class_names: Sequence[str] = meta.get("class_names") or []

    @classmethod
    def from_onnx(cls, onnx_path: str | os.PathLike, backend: str = DEFAULT_CPU_BACKEND, threads: Optional[int] = None,
                  min_score: float = 0.0, bf16: Optional[bool] = False) -> "Detector":
        """`bf16`: OpenVINO runs the network in bfloat16 (CPUs with bf16 instructions; the graph stays FP32);
        False: f32 (the parity reference); None: the CPU's default (bf16 where it has the instructions)."""
        _check_arguments(min_score, threads)
        extra = precision_options(backend, bf16)
        return cls(create_runner(backend, onnx_path=str(onnx_path), threads=threads, **extra), min_score)

    @classmethod
    def from_engine(cls, engine_path: str | os.PathLike, cuda_graph: bool = False,
                    min_score: float = 0.0) -> "Detector":
        """A TensorRT plan (GPU); its JSON sidecar carries the graph's metadata."""
        _check_arguments(min_score)
        return cls(create_runner("tensorrt", engine_path=str(engine_path), cuda_graph=cuda_graph), min_score)

    @classmethod
    def from_model(cls, name: str, weights: Optional[str] = None, backend: str = DEFAULT_CPU_BACKEND,
                   threads: Optional[int] = None, min_score: float = 0.0, bf16: Optional[bool] = False,
                   **export_kwargs) -> "Detector":
        """From a variant and weights: `torch` runs eagerly; `onnxruntime` / `openvino` export once into the
        cache."""
        _check_arguments(min_score, threads)
        if weights is not None:
            existing_file(weights, "weights file")
        if bf16:
            bf16_options(backend)  # refused before an export, not after
        if backend == "torch":
            return cls(create_runner("torch", model_name=name, weights=weights, threads=threads), min_score)
        if backend in CPU_GRAPH_BACKENDS:
            return cls.from_onnx(cached_export(name, weights, **export_kwargs), backend, threads, min_score, bf16)
        raise EdetError(f"backend {backend!r} needs a prebuilt artifact (--onnx or --engine)")

    def detect(self, images: Iterable[ImageSource]) -> List[Detections]:
        """The detections of each image, in order. `images` is a list (or any iterable) of images: file paths,
        encoded bytes, PIL images or HxWx3 uint8 arrays. One image given without a list is refused in one line
        (an array or a path is iterable itself, row by row or letter by letter): pass `[image]`. Every item is
        checked before the first inference."""
        single = isinstance(images, (*IMAGE_SOURCE_TYPES, io.IOBase))
        if single or not isinstance(images, collections.abc.Iterable):
            raise EdetError(f"detect takes a list of images, got {type(images).__name__}: pass one image as "
                            f"[image]")
        self.runner.check_open()  # before any image is decoded
        sources = list(images)
        for i, src in enumerate(sources):
            check_source(src, f"images[{i}]")
        results: List[Detections] = []
        step = self.runner.max_batch
        for start in range(0, len(sources), step):
            chunk = sources[start:start + step]
            batch, scales, sizes = preprocess(chunk, self.image_size, fill=self.fill)
            n = len(chunk)
            if not self.runner.dynamic_batch and n < step:  # fixed-batch graph: pad, then drop the padding
                batch = np.concatenate([batch, np.repeat(batch[-1:], step - n, axis=0)])
            outputs = self.runner.infer(batch)
            outputs = {k: v[:n] for k, v in outputs.items()}
            results.extend(split_detections(outputs, scales, sizes, self.class_names, self.min_score))
        return results

    def __call__(self, images: Iterable[ImageSource]) -> List[Detections]:
        return self.detect(images)


def cached_export(name: str, weights: Optional[str] = None, **export_kwargs) -> Path:
    """Export once per (variant, weights, settings) into the cache directory and reuse the file afterwards."""
    from . import __version__
    from .configs import canonical_name
    from .export import export_onnx
    from .io import sha256_file

    variant = canonical_name(name)
    key_src = {"variant": variant, "weights": sha256_file(weights) if weights else "random-init",
               "version": __version__, **{k: repr(v) for k, v in sorted(export_kwargs.items())}}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    out_dir = cache_dir() / f"{variant}-{key}"
    path = out_dir / f"{artifact_name(variant)}.onnx"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    if not weights:
        logger.warning("no weights given: %s runs with random initialisation (detections are meaningless)", variant)
        import torch
        torch.manual_seed(0)  # reproducible random init, so the cache entry is stable
    logger.info("exporting %s to %s (cached for next time)", variant, out_dir)
    return export_onnx(variant, out_dir, weights=weights, **export_kwargs).onnx_path
