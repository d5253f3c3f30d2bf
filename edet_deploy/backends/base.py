"""One small interface for every runtime: load a detection graph, run a batch of preprocessed images.

Runners register themselves under their name (`register_runner`); `Runner.create` refuses, in one line, an
option the runner's constructor does not take, and `Runner.infer` checks every batch before the runner's own
`infer_impl` sees it."""
from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Dict, Tuple, Type

import numpy as np

from ..contract import MAX_THREADS  # the bound of the CLI's --threads too, written once
from ..errors import EdetError

RUNNERS: Dict[str, Type["Runner"]] = {}  # backend name -> runner class
# What a runner's required constructor argument is, for the line that says it is missing.
REQUIRED_HELP = {"onnx_path": "an ONNX graph (--onnx, or export one first)",
                 "engine_path": "an engine (--engine, built with `edet-deploy build`)",
                 "model_name": "a model name (--model)"}




def check_number(value: Any, name: str, lo: float, hi: float, integer: bool = False) -> Any:
    """`value` when it is a number in [lo, hi] (an integer where `integer`), else one EdetError line naming
    `name`: an argument of the Python API, checked when the call is made as the CLI checks its options while
    parsing. Text, None, booleans, NaN and infinities are refused, never converted."""
    kind = numbers.Integral if integer else numbers.Real
    number = isinstance(value, kind) and not isinstance(value, bool)
    # isfinite only where NaN can be: on an int it converts to float, which overflows past 1e308
    if not (number and (isinstance(value, numbers.Integral) or math.isfinite(value)) and lo <= value <= hi):
        what = "an integer" if integer else "a number"
        got = repr(value)[:40] if isinstance(value, (numbers.Number, str, type(None))) else type(value).__name__
        raise EdetError(f"{name} must be {what} in {lo:g}..{hi:g}, got {got}")
    return int(value) if integer else float(value)


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
    closed: bool = False  # set by `close`: every later inference is refused in one line

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
        if options.get("threads") is not None:  # before any loading: a runtime takes 10**6 or 2.5 as it is
            options["threads"] = check_number(options["threads"], "threads", 1, MAX_THREADS, integer=True)
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

    def check_open(self) -> None:
        """One line when the runner was closed (its runtime's resources are gone)."""
        if self.closed:
            raise EdetError(f"this {self.name} runner is closed: create a new one to run inference")

    def check_input(self, images: np.ndarray) -> np.ndarray:
        self.check_open()
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
        """Release what the runtime holds; inference afterwards is refused (`check_open`). Closing twice is fine."""
        if not self.closed:
            self.closed = True
            self.release()

    def release(self) -> None:
        """The runtime's part of `close` (called once): drop the sessions, compiled models, buffers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
