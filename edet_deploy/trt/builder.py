"""Build a strongly typed TensorRT engine (10.13 or 11.x) from an exported graph (precision is whatever the ONNX
says)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..contract import INPUT_NAME
from ..errors import EdetError
from ..io import atomic_path, existing_file, sha256_file
from ..log import logger
from ..metadata import read_artifact_metadata, write_metadata
from .parser_rules import BUILD_NETWORK_FLAGS
from .versions import series_of, supported_names


def parse_batch(spec: str) -> Tuple[int, int, int]:
    """'1:4:8' -> (min, opt, max); '8' -> (1, 8, 8)."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError:
        raise EdetError(f"batch profile must be MIN:OPT:MAX or N, got {spec!r}") from None
    lo, opt, hi = (1, parts[0], parts[0]) if len(parts) == 1 else tuple(parts) if len(parts) == 3 else (0, 0, 0)
    if not 1 <= lo <= opt <= hi:
        raise EdetError(f"batch profile must satisfy 1 <= MIN <= OPT <= MAX, got {spec!r}")
    return lo, opt, hi


def build_engine(onnx_path: str | Path, out: str | Path, batch: str = "1", timing_cache: Optional[str] = None,
                 workspace_gb: float = 4.0, verbose: bool = False, tf32: bool = True, progress: bool = False) -> Dict:
    """Parse, build, write the plan atomically plus its JSON sidecar; returns the sidecar. `progress` shows
    TensorRT's build phases as bars on stderr (a build takes minutes)."""
    from . import require_tensorrt
    from .plugin import register

    onnx_path, out = existing_file(onnx_path, "ONNX graph"), Path(out)  # before TensorRT is looked for
    meta = read_artifact_metadata(onnx_path)
    lo, opt, hi = parse_batch(batch)
    if not meta.batch["dynamic"] and (lo, opt, hi) != (meta.batch["max"],) * 3:
        raise EdetError(f"{onnx_path} has a fixed batch of {meta.batch['max']}; export with --dynamic-batch "
                        f"to build the profile {batch}")
    if meta.batch["dynamic"] and hi > meta.batch["max"]:
        raise EdetError(f"profile max {hi} exceeds the graph's dynamic batch {meta.batch['max']}")
    trt = require_tensorrt()
    register()  # the edet::soft_nms plugin, for the parser to find
    log = trt_logger(trt, verbose)
    t0 = time.perf_counter()
    builder = trt.Builder(log)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdetError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    # layer names, types and plugin details stay readable by the engine inspector (gpu_acceptance checks that
    # the soft-NMS layer is the AOT plugin)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not tf32:  # TensorRT runs FP32 convolutions as TF32 (10-bit mantissa) unless told not to
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = None
    if timing_cache:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    s = int(meta.image_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (lo, s, s, 3), (opt, s, s, 3), (hi, s, s, 3))
    config.add_optimization_profile(profile)
    monitor = _ProgressMonitor(trt) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    logger.info("building %s (batch %d:%d:%d, %s) ...", onnx_path.name, lo, opt, hi, meta.precision)
    plan = builder.build_serialized_network(network, config)
    if monitor is not None:
        monitor.close()
    if plan is None:
        raise EdetError("TensorRT failed to build the engine (see the log above)")
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(plan))
    if cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    from .compat import gpu_properties
    gpu_name, capability = gpu_properties()  # torch-free: the serving image has no torch
    io = [{"name": network.get_input(i).name, "shape": list(network.get_input(i).shape),
           "dtype": str(network.get_input(i).dtype)} for i in range(network.num_inputs)] + \
         [{"name": network.get_output(i).name, "shape": list(network.get_output(i).shape),
           "dtype": str(network.get_output(i).dtype)} for i in range(network.num_outputs)]
    sidecar = replace(meta, tensorrt={"version": trt.__version__, "gpu": gpu_name,
                                      "compute_capability": capability,
                                      "batch_profile": [lo, opt, hi], "io": io, "tf32": tf32,
                                      "build_seconds": round(time.perf_counter() - t0, 1),
                                      "onnx": str(onnx_path), "onnx_sha256": sha256_file(onnx_path)},
                      batch={"dynamic": lo != hi, "max": hi, "min": lo}, plan_sha256=sha256_file(out))
    write_metadata(out, sidecar)
    logger.info("wrote %s in %.0f s", out, sidecar.tensorrt["build_seconds"])
    return sidecar.to_dict()


def network_flags(trt) -> int:
    """Creation flags of our networks: strongly typed (precision is what the ONNX says) and the plugin's AOT
    implementation preferred, so the engine embeds the soft-NMS kernel and needs no Python at run time (the
    exported node also says `aot=1`). TensorRT 10.x networks are weakly typed unless STRONGLY_TYPED is given (an
    FP16 graph would build mostly in FP32); TensorRT 11 networks are always strongly typed (the flag is
    deprecated there), so it is asked for only where a network would otherwise be weakly typed. PREFER_AOT is
    set where the enum has it."""
    series = series_of(trt.__version__)
    if series is None:
        raise EdetError(f"TensorRT {trt.__version__}: edet-deploy builds with TensorRT {supported_names()}")
    enum = trt.NetworkDefinitionCreationFlag
    names = (("STRONGLY_TYPED",) if series.weakly_typed_by_default else ()) + tuple(BUILD_NETWORK_FLAGS)
    if series.weakly_typed_by_default and not hasattr(enum, "STRONGLY_TYPED"):
        raise EdetError(f"TensorRT {trt.__version__} has no STRONGLY_TYPED networks: its engines would not keep "
                        f"the graph's precision")
    flags = 0
    for name in names:
        if hasattr(enum, name):
            flags |= 1 << int(getattr(enum, name))
    return flags


def trt_logger(trt: Any, verbose: bool = False) -> Any:
    """A `trt.ILogger` for builder and runtime alike, routing TensorRT's messages into our logger: warnings and
    errors only, unless `verbose`. (A factory: the class derives from the lazily imported `trt.ILogger`.)"""
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: 50, severity.ERROR: 40, severity.WARNING: 30, severity.INFO: 20}

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, sev, msg):
            level = levels.get(sev, 10)
            if verbose or level >= 30:
                logger.log(level, "[TensorRT] %s", msg)
    return Logger()


def _ProgressMonitor(trt):
    """TensorRT's IProgressMonitor as one tqdm bar per build phase (nested phases stack their bars)."""
    from tqdm import tqdm

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: Dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False, position=len(self.bars))

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True  # never cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

        def close(self):
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
    return ProgressMonitor()


def check_plan_matches_machine(sidecar: Dict) -> None:
    """A plan only runs with the TensorRT version and GPU architecture it was built for."""
    from .compat import check_plan_tensorrt, gpu_properties

    trt = __import__("tensorrt")
    built = sidecar.get("tensorrt") or {}
    check_plan_tensorrt(sidecar, trt.__version__, "this machine")
    capability = gpu_properties()[1]
    if built.get("compute_capability") != capability:
        raise EdetError(f"engine built for compute capability {built.get('compute_capability')}, this GPU is "
                        f"{capability}: rebuild it here")
