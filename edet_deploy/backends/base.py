"""One small interface for every runtime: load a detection graph, run a batch of preprocessed images.

Runners register themselves under their name (`register_runner`); `Runner.create` refuses, in one line, an
option the runner's constructor does not take, and `Runner.infer` checks every batch before the runner's own
`infer_impl` sees it."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Dict, Tuple, Type

import numpy as np

from ..errors import EdetError

RUNNERS: Dict[str, Type["Runner"]] = {}  # backend name -> runner class
# What a runner's required constructor argument is, for the line that says it is missing.
REQUIRED_HELP = {"onnx_path": "an ONNX graph (--onnx, or export one first)",
                 "engine_path": "an engine (--engine, built with `edet-deploy build`)",
                 "model_name": "a model name (--model)"}


def trim_heap() -> None:
    """Give the heap memory a runner's load freed back to the OS (glibc's malloc_trim; a no-op elsewhere).
    Compiling keeps temporaries that glibc would otherwise hold on to: 144 MB of the OpenVINO f32 runner's
    685 MB after load (D0, two compiled models), resident for the process's life."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def register_runner(cls: Type[Runner]) -> Type[Runner]:
    """Class decorator: `cls` becomes the backend `cls.name` of `create_runner`."""
    RUNNERS[cls.name] = cls
    return cls


class Runner(ABC):
    """Runs the detection graph: uint8 [B,S,S,3] in; num_detections, detection_boxes (input pixels),
    detection_scores, detection_classes out (or the candidate tensors for a graph exported with --nms none)."""

    name: str = "base"

    def __init__(self, metadata: Dict[str, Any]):
        self.metadata = metadata

    @classmethod
    def options(cls) -> Tuple[str, ...]:
        """The keyword arguments `create` passes on: the constructor's parameters."""
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    @classmethod
    def create(cls, **options: Any) -> "Runner":
        """The runner, or one EdetError line naming an option it does not take or the argument it lacks."""
        accepted = cls.options()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise EdetError(f"the {cls.name} backend has no option {', '.join(unknown)} "
                            f"(it takes {', '.join(accepted)})")
        params = inspect.signature(cls.__init__).parameters
        for name in accepted:
            if params[name].default is inspect.Parameter.empty and not options.get(name):
                raise EdetError(f"the {cls.name} backend needs {REQUIRED_HELP.get(name, name)}")
        return cls(**options)

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def max_batch(self) -> int:
        batch = self.metadata.get("batch") or {}
        return int(batch.get("max", 1))

    @property
    def dynamic_batch(self) -> bool:
        return bool((self.metadata.get("batch") or {}).get("dynamic"))

    def check_input(self, images: np.ndarray) -> np.ndarray:
        s = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise EdetError(f"{self.name}: expected uint8 images [B, {s}, {s}, 3], got {images.dtype} "
                            f"{list(images.shape)}")
        b = images.shape[0]
        if self.dynamic_batch and not 1 <= b <= self.max_batch:
            raise EdetError(f"{self.name}: batch {b} outside the graph's range 1..{self.max_batch}")
        if not self.dynamic_batch and b != self.max_batch:
            raise EdetError(f"{self.name}: the graph has a fixed batch of {self.max_batch}, got {b}")
        return np.ascontiguousarray(images)

    def infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Run one batch (already letterboxed) and return the graph outputs by name."""
        return self.infer_impl(self.check_input(images))

    @abstractmethod
    def infer_impl(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """The runtime's part of `infer`: `images` were checked against the graph and are contiguous."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
