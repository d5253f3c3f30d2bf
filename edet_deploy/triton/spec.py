"""`RepoSpec`: what a Triton repository is made of, checked once. Constructing one checks the serving choices;
`RepoSpec.validate` takes `generate_repository`'s arguments, checks them, the graph or plan and the output
folder, and fills in what the artifact's metadata says (variant, image size, detections, class names)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .. import contract
from ..configs import MEAN_RGB
from ..errors import EdetError, first_few
from .models import ENGINE_BACKENDS
from .verify import foreign_entries

# Ensemble inputs: "encoded" = JPEG/PNG bytes (BYTES [1]); "decoded" = an RGB image the client already decoded
# (UINT8 [H, W, 3], any size: the server only letterboxes it). Ensemble names: <name> and <name>_decoded.


@dataclass(frozen=True)
class RepoSpec:
    """The graph's facts, the serving choices and the artifact to copy: everything the generator writes from."""

    variant: str
    image_size: int
    max_detections: int
    class_names: List[str]
    fill: Tuple[float, ...] = MEAN_RGB  # letterbox padding: the graph's mean colour (metadata `mean`)
    precision: str = "fp32"
    target: str = "cpu"  # cpu: our CPU runner (engine_backend) in the Python backend; gpu: tensorrt_plan
    # the engine's runner. cpu: openvino | onnxruntime (None: the CPU default backend); gpu: tensorrt (or None)
    engine_backend: Optional[str] = None
    max_batch_size: int = 8
    preprocess_instances: int = 2
    engine_instances: int = 1
    postprocess_instances: int = 1
    cuda_graphs: bool = False
    queue_delay_us: Optional[int] = None  # the engine's batching window; None: configs.ENGINE_QUEUE_DELAY_US[target]
    preferred_batch_sizes: Tuple[int, ...] = ()
    stage_queue_delay_us: int = 0  # pre/post-processing: batch whatever is queued, never wait
    input_formats: Tuple[str, ...] = ("encoded",)
    plan: Dict[str, str] = field(default_factory=dict)  # GPU: TensorRT version, GPU, compute capability
    extra: Dict = field(default_factory=dict)
    artifact: Optional[str] = None  # the graph (cpu) or plan (gpu) the engine model gets a copy of; None: no copy
    artifact_metadata: Dict = field(default_factory=dict, repr=False, compare=False)  # its metadata, verified
    artifact_external_data: bool = False  # the graph keeps its weights in a side file: its copy gets them inline

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_backend", _engine_backend(self.target, self.engine_backend))
        _check_counts(self.max_batch_size, (self.preprocess_instances, self.engine_instances,
                                            self.postprocess_instances), self.queue_delay_us)
        _check_bf16(self.precision, self.engine_backend)
        if not self.input_formats or any(f not in contract.INPUT_FORMATS for f in self.input_formats):
            raise EdetError(f"input formats must be among {', '.join(contract.INPUT_FORMATS)}, got "
                            f"{', '.join(self.input_formats) or 'none'}")

    @classmethod
    def validate(cls, out: str | Path, *, variant: Optional[str] = None, onnx: Optional[str] = None,
                 engine: Optional[str] = None, precision: Optional[str] = None, target: str = "cpu",
                 max_batch_size: int = 8, copy_artifact: bool = True, engine_backend: Optional[str] = None,
                 force: bool = False, tensorrt_version: Optional[str] = None, **choices: Any) -> RepoSpec:
        """The spec of a repository written to `out` (see `generate_repository`); `choices` are the other
        fields (instance counts, input formats, queue delay, ...). Checks run in the order a user fixes them:
        the arguments, then the artifact (present, matches its metadata, agrees with `variant` / `precision`,
        loads), `out`, the artifact's outputs and batch, and for a plan its TensorRT against
        `tensorrt_version` (None: the installed one). Each failure is one line (EdetError)."""
        from ..metadata import read_metadata

        engine_backend = _engine_backend(target, engine_backend)
        artifact = engine if target == "gpu" else onnx
        if target == "gpu" and not engine:
            raise EdetError("--target gpu needs --engine model.plan (built with `edet-deploy build`)")
        if target == "cpu" and not onnx:
            raise EdetError("--target cpu needs --onnx model.onnx")
        _check_counts(max_batch_size, [v for k, v in choices.items() if k.endswith("_instances")],
                      choices.get("queue_delay_us"))
        if copy_artifact and not Path(artifact).is_file():
            raise EdetError(f"{artifact} not found")
        meta = read_metadata(artifact)  # verifies the artifact against its sidecar's checksum
        variant, precision = graph_variant_and_precision(meta, artifact, variant, precision)
        _check_bf16(precision, engine_backend)
        external_data = check_graph_file(artifact) if copy_artifact and target == "cpu" else False
        _check_out(Path(out), force)
        if not meta.get("nms"):
            raise EdetError(f"{artifact} has no soft-NMS outputs (exported with --nms none)")
        batch = meta.get("batch", {})
        if not batch.get("dynamic") or int(batch.get("max", 1)) < max_batch_size:
            raise EdetError(f"{artifact} must have a dynamic batch of at least {max_batch_size} "
                            f"(export with --dynamic-batch {max_batch_size})")
        if target == "gpu":
            choices = {**choices, "plan": _checked_plan(meta, artifact, tensorrt_version)}
        return cls(variant=variant, image_size=int(meta["image_size"]),
                   max_detections=int(meta["nms"]["max_detections"]),
                   class_names=list(meta.get("class_names") or []), fill=tuple(meta["mean"]),
                   precision=precision, target=target,
                   max_batch_size=max_batch_size, engine_backend=engine_backend,
                   artifact=artifact if copy_artifact else None, artifact_metadata=meta,
                   artifact_external_data=external_data, **choices)

    @property
    def name(self) -> str:
        return contract.artifact_name(self.variant)

    def ensemble_name(self, input_format: str) -> str:
        return contract.ensemble_name(self.name, input_format)

    def preprocess_name(self, input_format: str) -> str:
        return contract.preprocess_name(self.name, input_format)


def _engine_backend(target: str, engine_backend: Optional[str]) -> str:
    """The engine's runner: the stated one, else the target's; refused where the target has no such runner."""
    from ..backends import DEFAULT_CPU_BACKEND

    if target not in ("cpu", "gpu"):
        raise EdetError(f"target must be cpu or gpu, got {target!r}")
    if target == "gpu":
        if engine_backend not in (None, "tensorrt"):
            raise EdetError(f"--engine-backend {engine_backend} is for --target cpu; the GPU engine is TensorRT")
        return "tensorrt"
    engine_backend = engine_backend or DEFAULT_CPU_BACKEND
    if engine_backend not in ENGINE_BACKENDS:
        raise EdetError(f"unknown CPU engine backend {engine_backend!r}; "
                        f"choose one of {', '.join(ENGINE_BACKENDS)}")
    return engine_backend


def _check_counts(max_batch_size: int, instances: Iterable[int], queue_delay_us: Optional[int]) -> None:
    if max_batch_size < 1 or any(int(v) < 1 for v in instances):
        raise EdetError("--max-batch and instance counts must be >= 1")
    if (queue_delay_us or 0) < 0:
        raise EdetError(f"--queue-delay-us must be >= 0, got {queue_delay_us}")


def _check_bf16(precision: str, engine_backend: str) -> None:
    """bf16 is a runtime setting of the OpenVINO CPU engine (the engine backend is resolved by now)."""
    if precision == "bf16":
        from ..backends import bf16_options
        bf16_options(engine_backend, "--precision bf16")


def _check_out(out: Path, force: bool) -> None:
    """`out` is a directory, or will be one, holding nothing edet-deploy did not generate (unless `force`)."""
    if out.exists() and not out.is_dir():
        raise EdetError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not force:
        foreign = foreign_entries(out)
        if foreign:
            raise EdetError(f"{out} holds what edet-deploy did not generate ({first_few(foreign)}); choose an "
                            f"empty --out or pass --force")


def _checked_plan(meta: Dict, plan: str, tensorrt_version: Optional[str]) -> Dict[str, str]:
    """What the plan was built with, once its TensorRT is that of the server that will load it."""
    from ..trt.compat import check_plan_tensorrt, installed_tensorrt_version, plan_info

    source = "the target Triton image (--tensorrt-version)"
    if tensorrt_version is None:
        tensorrt_version, source = installed_tensorrt_version(), "this machine"
    if tensorrt_version is None:
        raise EdetError("--target gpu: state the TensorRT version of the Triton image that will serve the plan "
                        "(--tensorrt-version, e.g. 11.4 for nvcr.io/nvidia/tritonserver:26.10-py3)")
    check_plan_tensorrt(meta, tensorrt_version, source, plan=str(plan))
    return plan_info(meta)


def check_graph_file(path: str | Path) -> bool:
    """The graph the repository will serve loads as ONNX (a garbage file is refused here, not at serve time), and
    the external data it names, if any, is beside it. Returns whether it keeps its weights in external data."""
    from ..io import external_data_files, load_onnx, missing_external_data

    proto = load_onnx(path, external_data=False)
    if [i.name for i in proto.graph.input] != [contract.INPUT_NAME]:
        raise EdetError(f"{path} is not an edet-deploy detection graph (inputs {[i.name for i in proto.graph.input]})")
    problem = missing_external_data(path, proto)
    if problem:
        raise EdetError(problem)
    return bool(external_data_files(proto))


def graph_variant_and_precision(meta: Dict, artifact: str | Path, variant: Optional[str] = None,
                                precision: Optional[str] = None) -> Tuple[str, str]:
    """The repository's variant and precision: the graph's (its metadata JSON). A stated `variant` or
    `precision` (None: the graph's) that contradicts the graph is refused; `bf16` is the FP32 graph run in
    bfloat16 by the OpenVINO engine, so it goes with an fp32 graph."""
    from ..configs import canonical_name

    held, held_precision = meta.get("variant"), meta.get("precision", "fp32")
    if variant is not None and canonical_name(variant) != held:
        raise EdetError(f"{artifact} holds {held}, not {variant}: leave out --model (the graph's is used) or give "
                        f"the {variant} graph")
    if precision not in (None, held_precision) and (precision, held_precision) != ("bf16", "fp32"):
        raise EdetError(f"{artifact} is {held_precision}, not {precision}: leave out --precision (the "
                        f"graph's is used){' or pass bf16' if held_precision == 'fp32' else ''}")
    return held, precision or held_precision
