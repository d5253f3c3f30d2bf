"""The TensorRT releases edet-deploy builds engines with, and what differs between them (one home for these facts:
`require_tensorrt`, the builder's network flags, the plan and image checks, `check`'s readiness line and the
install hints read them; docs/tensorrt.md cites the sources).

- TensorRT 10.13 (10.x from 10.13 on): the TensorRT of Triton's 25.11 and 25.12 images (10.13.3.9, CUDA 13.0, in
  NVIDIA's release compatibility matrix); wheels for CUDA 12 (`tensorrt-cu12`) and CUDA 13 (`tensorrt-cu13`).
  A network is weakly typed unless created with STRONGLY_TYPED.
- TensorRT 11.x: CUDA 13 (`tensorrt-cu13`); every network is strongly typed (weak typing was removed).

Both have the quickly-deployable plugin API with ahead-of-time implementations (`tensorrt.plugin.aot_impl`)
and the network flag PREFER_AOT_PYTHON_PLUGINS; tests/trt_harness.py runs our plugin through each one's own
`tensorrt.plugin` code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..errors import EdetError


@dataclass(frozen=True)
class TensorRTSeries:
    name: str                       # as users say it: "10.13", "11.x"
    major: int
    min_minor: int                  # oldest minor of the major we build with
    wheels: Tuple[Tuple[int, str, str], ...]  # (CUDA major, TensorRT wheel, edet-deploy extra that installs it)
    min_cuda: Tuple[int, int]       # oldest CUDA its wheels support: the PTX we embed must load there
    weakly_typed_by_default: bool   # 10.x: a network is weakly typed unless STRONGLY_TYPED is given
    max_opset: int                  # highest ONNX opset its parser is documented to import (see OPSET_SOURCES)

    def contains(self, version: str) -> bool:
        major, minor = version_tuple(version)[:2]
        return major == self.major and minor >= self.min_minor


SERIES: Tuple[TensorRTSeries, ...] = (
    # TensorRT 10's CUDA 12 build is one build for every CUDA 12.x (support matrices): 12.0 is the floor the PTX
    # must load on; 10.13.2 added CUDA 13.0 builds
    TensorRTSeries("10.13", 10, 13, ((12, "tensorrt-cu12", "tensorrt10"), (13, "tensorrt-cu13", "tensorrt10-cu13")),
                   (12, 0), True, 21),
    TensorRTSeries("11.x", 11, 0, ((13, "tensorrt-cu13", "tensorrt11"),), (13, 0), False, 24),
)
OPSET_SOURCES = {
    "10.13": "onnx-tensorrt's changelog: opset-21 GroupNormalization since 10.9; later opsets are not documented "
             "for 10.13",
    "11.x": "onnx-tensorrt's operator matrix of 10.15 (opsets 9 to 24), which 11.x continues",
}
# ONNX ops the parser imports only from some release on (onnx-tensorrt's changelog,
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/Changelog.md): (major, minor)
OPS_SINCE: Dict[str, Tuple[int, int]] = {"Attention": (10, 14), "RotaryEmbedding": (10, 15),
                                         "RMSNormalization": (10, 15), "TensorScatter": (10, 15)}
def version_tuple(version: str) -> Tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in str(version).strip().split("."))
    except ValueError:
        raise EdetError(f"not a TensorRT version: {version!r} (expected numbers such as 11.4 or 10.13.3.9)") from None
    if len(parts) < 2:
        raise EdetError(f"TensorRT versions need at least MAJOR.MINOR, got {version!r}")
    return parts


def series_of(version: str) -> Optional[TensorRTSeries]:
    """The series a TensorRT version belongs to, None when edet-deploy does not build with it."""
    return next((s for s in SERIES if s.contains(version)), None)


def supported_names() -> str:
    return " and ".join(s.name for s in SERIES)


def install_hint(version: Optional[str] = None, cuda_major: Optional[int] = None) -> str:
    """How to install TensorRT's Python bindings: exactly `version` (the wheel of `cuda_major` when known), or
    the extra of each series."""
    if version is None:
        return " or ".join(f"`pip install 'edet-deploy[{extra}]'` (TensorRT {s.name}, CUDA {cuda})"
                           for s in SERIES for cuda, _, extra in s.wheels)
    series = series_of(version)
    if series is None:
        return f"use an image with TensorRT {supported_names()}"
    wheels = [w for c, w, _ in series.wheels if c == cuda_major] or [w for _, w, _ in series.wheels]
    return " or ".join(f"`pip install {w}=={version}`" for w in wheels)


def readiness(op_types: List[str], opset: int) -> Dict[str, List[str]]:
    """For each series, why TensorRT's parser of that series would not import a graph ([] = ready): its ONNX
    opset, and ops imported only from a later release on. (Our plugin node needs the parser's Python AOT plugins,
    10.9 on, and the namespace read from the node's domain, 10.10 on: every series has both.)"""
    out: Dict[str, List[str]] = {}
    for s in SERIES:
        floor = (s.major, s.min_minor)
        why = []
        if opset > s.max_opset:
            why.append(f"opset {opset} is above the {s.max_opset} documented for TensorRT {s.name}")
        for op in sorted(set(op_types)):
            since = OPS_SINCE.get(op)
            if since and since > floor:
                why.append(f"{op} is imported from TensorRT {since[0]}.{since[1]} on")
        out[s.name] = why
    return out


def readiness_line(ready: Dict[str, List[str]]) -> str:
    """'ready for TensorRT 10.13 and 11.x', or which ones and why not the others."""
    yes = [name for name, why in ready.items() if not why]
    no = "; ".join(f"not {name}: {', '.join(why)}" for name, why in ready.items() if why)
    if not yes:
        return f"ready for no supported TensorRT ({no})"
    return f"ready for TensorRT {' and '.join(yes)}" + (f" ({no})" if no else "")
