"""Which TensorRT and GPU a plan belongs to, and whether a server can load it.

A serialized plan only deserializes in the TensorRT version that built it, on the GPU architecture it was
built for. The plan's JSON sidecar records both (`edet-deploy build`); the generated GPU repository copies them
into the engine config's `parameters`; `triton-repo --target gpu`, the TensorRT runner and the container's
entrypoint refuse a plan from another TensorRT with one line. Nothing here imports torch or needs TensorRT
installed, so the checks run (and are tested) on any machine.

    python -m edet_deploy.trt.compat check-plan model.plan   # exit 0: usable here; 1: missing or stale (why)
    python -m edet_deploy.trt.compat check-image             # TensorRT bindings == the server's libnvinfer,
                                                             # of a series we build with (10.13+, 11.x)
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import EdetError
from .versions import install_hint, series_of, supported_names, version_tuple


def same_tensorrt(a: str, b: str) -> bool:
    """True when two TensorRT versions name the same release as far as both are spelled out ('11.4' matches
    '11.4.0.106'; '11.4.0.106' does not match '11.4.1.3' nor '11.3'). Major and minor are always compared."""
    pa, pb = version_tuple(a), version_tuple(b)
    n = min(len(pa), len(pb))
    return pa[:n] == pb[:n]


def plan_info(sidecar: Dict) -> Dict[str, str]:
    """The TensorRT version, GPU name and compute capability recorded by `edet-deploy build`."""
    built = sidecar.get("tensorrt") or {}
    return {"tensorrt_version": str(built.get("version") or ""), "gpu": str(built.get("gpu") or ""),
            "compute_capability": str(built.get("compute_capability") or "")}


def tensorrt_mismatch(built: str, target_version: str, target: str, plan: str = "the engine") -> Optional[str]:
    """Why a plan built by TensorRT `built` cannot be loaded by `target_version` (one line), None if it can.
    Plans are compared within a major: a plan never crosses majors (10.x vs 11.x), and inside one it loads
    only in the release that built it."""
    if not built:
        return f"{plan} has no TensorRT version in its metadata: rebuild it with `edet-deploy build`"
    if version_tuple(built)[0] != version_tuple(target_version)[0]:
        return (f"{plan} was built with TensorRT {built} but {target} has TensorRT {target_version}: a plan never "
                f"loads in another major version ({version_tuple(built)[0]}.x vs {version_tuple(target_version)[0]}.x);"
                f" rebuild it there with `edet-deploy build`")
    if not same_tensorrt(built, target_version):
        return (f"{plan} was built with TensorRT {built} but {target} has TensorRT {target_version}: "
                f"rebuild it there with `edet-deploy build`")
    return None


def check_plan_tensorrt(sidecar: Dict, target_version: str, target: str, plan: str = "the engine") -> None:
    """Raise one line when the plan was built by another TensorRT than `target_version` (`target` names where
    that version comes from: 'this machine', 'the Triton image', ...)."""
    problem = tensorrt_mismatch(plan_info(sidecar)["tensorrt_version"], target_version, target, plan)
    if problem:
        raise EdetError(problem)


def installed_tensorrt_version() -> Optional[str]:
    """The version of the importable TensorRT Python bindings, or None (not installed, or no libraries)."""
    try:
        import tensorrt
    except Exception:  # noqa: BLE001 - ImportError, or bindings without their libraries (OSError)
        return None
    return str(tensorrt.__version__)


def runtime_library_version(names: Tuple[str, ...] = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so")
                            ) -> Optional[str]:
    """MAJOR.MINOR.PATCH of the libnvinfer the dynamic loader finds (the one Triton's tensorrt backend runs),
    from `getInferLibVersion()` (NvInferVersion.h: MAJOR*10000 + MINOR*100 + PATCH); None where absent."""
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        fn = lib.getInferLibVersion
        fn.restype = ctypes.c_int32
        v = int(fn())
        return f"{v // 10000}.{(v // 100) % 100}.{v % 100}"
    return None


def gpu_properties(device: int = 0) -> Tuple[str, str]:
    """(name, 'MAJOR.MINOR' compute capability) of a CUDA device without torch: cuda-python, then nvidia-smi."""
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00"), f"{props.major}.{props.minor}"
    except Exception:  # noqa: BLE001 - not installed or no driver: try the next source
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and "," in out.stdout:
            name, cap = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
            return name, cap
    raise EdetError("no CUDA GPU found (neither cuda-python nor nvidia-smi could query device "
                    f"{device}): engines are built and checked on the GPU that serves them")


def plan_problem(plan: str | Path, tensorrt_version: Optional[str] = None,
                 compute_capability: Optional[str] = None) -> Optional[str]:
    """Why `plan` cannot be served here (missing, no sidecar, other TensorRT, other GPU), or None if it can.
    Versions default to this machine's (installed bindings, first GPU)."""
    from ..metadata import read_metadata

    plan = Path(plan)
    if not plan.is_file():
        return f"{plan} does not exist"
    try:
        info = plan_info(read_metadata(plan))
    except EdetError as e:
        return str(e)
    version = tensorrt_version or installed_tensorrt_version() or runtime_library_version()
    if version is None:
        return "no TensorRT on this machine to compare the plan with"
    mismatch = tensorrt_mismatch(info["tensorrt_version"], version, "this machine", str(plan))
    if mismatch:
        return mismatch
    cap = compute_capability or gpu_properties()[1]
    if info["compute_capability"] != cap:
        return f"{plan} was built for compute capability {info['compute_capability'] or '?'}, this GPU is {cap}"
    return None


def image_problem(library: Optional[str], bindings: Optional[str]) -> Tuple[Optional[str], str]:
    """(why the image cannot build plans its server loads, or None; the line saying it can). `library` is the
    libnvinfer the server loads (read first: importing the bindings may load their own), `bindings` the Python
    TensorRT that builds. Both must be one release of a series edet-deploy builds with."""
    if bindings is None or library is None:
        return f"cannot compare: TensorRT bindings {bindings}, libnvinfer {library}", ""
    cuda = os.environ.get("CUDA_VERSION", "")  # set in NVIDIA's images: the wheel must match the image's CUDA
    cuda_major = int(cuda.split(".")[0]) if cuda.split(".")[0].isdigit() else None
    if series_of(library) is None:
        return (f"the server's libnvinfer is TensorRT {library}; edet-deploy builds with TensorRT "
                f"{supported_names()}: use an image that carries one of them"), ""
    if version_tuple(bindings)[0] != version_tuple(library)[0]:
        return (f"TensorRT bindings {bindings} are another major than the server's libnvinfer {library}: plans "
                f"built here would not load in Triton; {install_hint(library, cuda_major)}"), ""
    if not same_tensorrt(bindings, library):
        return (f"TensorRT bindings {bindings} differ from the server's libnvinfer {library}: plans built here "
                f"would not load in Triton; {install_hint(library, cuda_major)}"), ""
    return None, f"TensorRT bindings {bindings} == libnvinfer {library} (TensorRT {series_of(library).name})"


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edet_deploy.trt.compat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check-plan", help="exit 0 if the plan can be served here, 1 (and why) if not")
    p.add_argument("plan")
    p.add_argument("--tensorrt-version")
    p.add_argument("--compute-capability")
    sub.add_parser("check-image", help="the TensorRT Python bindings must equal the libnvinfer the server loads")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check-plan":
            problem = plan_problem(args.plan, args.tensorrt_version, args.compute_capability)
            if problem:
                print(problem)
                return 1
            print(f"{args.plan}: matches this machine")
            return 0
        problem, ok = image_problem(runtime_library_version(), installed_tensorrt_version())
        print(problem or ok)
        return 1 if problem else 0
    except EdetError as e:
        print(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
