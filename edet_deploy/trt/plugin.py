"""The `edet::soft_nms` TensorRT plugin (quickly deployable plugin API, `tensorrt.plugin`).

The parts that need no TensorRT are plain functions, tested on CPU: output descriptions (`output_specs`),
attribute decoding as the ONNX parser delivers them (`settings_from_attrs`) and the ahead-of-time launch
(`aot_launch`: PTX from kernels/, block, shared memory). `register()` wraps them with TensorRT's decorators;
tests/trt_harness.py executes that registration with TensorRT's own `tensorrt.plugin` code.

The AOT implementation is the one engines use (the graph node says `aot=1`, and `edet-deploy build` also
sets PREFER_AOT_PYTHON_PLUGINS): its kernel is embedded in the plan, so trtexec and Triton's tensorrt_plan
backend run it with no Python. The JIT implementation (torch + OpenAI Triton) is for debugging.

No `from __future__ import annotations` here: `@trtp.register` reads the annotations as classes.
"""
import inspect
import re
from typing import Dict, List, Tuple, Union

from ..contract import OUTPUT_SPECS
from ..nms import op as nms_op
from ..nms.settings import NmsSettings

PLUGIN_ID = f"{nms_op.DOMAIN}::{nms_op.OP_TYPE}"
PLUGIN_VERSION = "1"  # QDP creators are always version "1"
# Attribute order = the creator's field order = the order aot_impl/impl receive the values in.
ATTRIBUTES: Tuple[str, ...] = tuple(nms_op.ATTRIBUTE_TYPES)
_registered = False  # tensorrt.plugin refuses a second registration of the same id



def output_specs(batch, num_candidates, max_detections) -> List[Tuple[str, str, tuple]]:
    """[(name, dtype, shape)] of the plugin's outputs; works with ints or TensorRT shape expressions."""
    # No output's shape depends on the candidate count; the argument stays for the plugin's signature.
    return [(s.name, s.dtype, s.shape(batch, max_detections)) for s in OUTPUT_SPECS]


def settings_from_attrs(method: Union[str, int], sigma: float, iou_threshold: float, score_threshold: float,
                        max_detections: int, class_agnostic: int) -> NmsSettings:
    """Settings from the plugin's attributes as TensorRT hands them over. onnx-tensorrt copies a STRING
    attribute with its terminating NUL counted, and the QDP creator decodes those bytes as they are, so
    `method` arrives as 'gaussian\\x00'; float attributes arrive as float32 values widened to float."""
    if isinstance(method, (bytes, bytearray)):
        method = bytes(method).decode()
    method = str(method).rstrip("\x00")
    return NmsSettings(method, float(sigma), float(iou_threshold), float(score_threshold), int(max_detections),
                       bool(class_agnostic))


def aot_launch(num_candidates: int, settings: NmsSettings, arch: int) -> Dict:
    """Everything the AOT implementation returns, as plain data: kernel name, PTX (its parameters exactly
    TensorRT's AOT order: 3 inputs, N, 4 outputs), block size, shared memory; grid = batch, one program
    per image; the scalar argument N."""
    from edet_deploy.kernels.soft_nms import compile_ptx

    k = compile_ptx(int(num_candidates), settings.method_id, settings.class_agnostic, int(arch), settings.sigma,
                    settings.iou_threshold, settings.score_threshold, settings.max_detections)
    block_x = 32 * k.num_warps  # the threads the compiled kernel was built for (its .reqntid)
    reqntid = re.search(r"\.reqntid\s+(\d+)", k.ptx)
    if reqntid and int(reqntid.group(1)) != block_x:
        raise RuntimeError(f"kernel requires {reqntid.group(1)} threads per block, launch would use {block_x}")
    return {"kernel_name": k.name, "ptx": k.ptx, "block_x": block_x, "shared_mem": k.shared_mem,
            "grid": "batch", "extra_args": ["N"], "num_warps": k.num_warps}


def jit_soft_nms(inputs, outputs, settings: NmsSettings, stream: int) -> None:
    """The JIT implementation's body: `inputs` (boxes, scores, classes) and `outputs` are CUDA arrays
    (TensorRT's `trtp.Tensor`s or torch tensors), `stream` a cudaStream_t handle. Every allocation, the kernel
    and the copies run on that stream: nothing may race TensorRT's work on it."""
    import torch
    from edet_deploy.kernels.soft_nms import run

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        boxes, scores, classes = (torch.as_tensor(t, device="cuda") for t in inputs)
        counts = torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int32, device="cuda")
        got = run(boxes, scores, classes, counts, method_id=settings.method_id, sigma=settings.sigma,
                  iou_threshold=settings.iou_threshold, score_threshold=settings.score_threshold,
                  max_detections=settings.max_detections, class_agnostic=settings.class_agnostic)
        for dst, src in zip(outputs, got):
            dst_t = torch.as_tensor(dst, device="cuda")
            dst_t.copy_(src.reshape(dst_t.shape))


def target_arch() -> int:
    """sm_XY of the GPU the engine is being built on (a plan only runs on the architecture it was built for);
    asked without torch, which the serving image that builds engines does not have."""
    from .compat import gpu_properties

    major, minor = gpu_properties()[1].split(".")
    return int(major) * 10 + int(minor)


def register():
    """Register the plugin with TensorRT (idempotent) and return `tensorrt.plugin`. Needs TensorRT 10.13 or 11.x
    (require_tensorrt): both `tensorrt.plugin` packages have aot_impl and run this registration unchanged."""
    from . import require_tensorrt

    trt = require_tensorrt()
    import tensorrt.plugin as trtp

    global _registered
    if _registered:
        return trtp
    dtypes = {"int32": trt.int32, "float32": trt.float32}

    @trtp.register(PLUGIN_ID)
    def soft_nms_desc(candidate_boxes: trtp.TensorDesc, candidate_scores: trtp.TensorDesc,
                      candidate_classes: trtp.TensorDesc, method: str, sigma: float, iou_threshold: float,
                      score_threshold: float, max_detections: int, class_agnostic: int
                      ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, n = candidate_scores.shape_expr[0], candidate_scores.shape_expr[1]
        return tuple(trtp.from_shape_expr(shape, dtypes[dtype])
                     for _, dtype, shape in output_specs(b, n, max_detections))

    @trtp.aot_impl(PLUGIN_ID)
    def soft_nms_aot(candidate_boxes: trtp.TensorDesc, candidate_scores: trtp.TensorDesc,
                     candidate_classes: trtp.TensorDesc, method: str, sigma: float, iou_threshold: float,
                     score_threshold: float, max_detections: int, class_agnostic: int,
                     outputs: Tuple[trtp.TensorDesc], tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        settings = settings_from_attrs(method, sigma, iou_threshold, score_threshold, max_detections,
                                       class_agnostic)
        # At launch-parameter time the shapes are concrete (N comes from a constant TopK K); the symbolic
        # expression stays the kernel's runtime argument.
        n = int(candidate_scores.shape[1])
        if n <= 0:
            raise ValueError(f"soft_nms needs a static candidate count, got {n} (export with a constant TopK K)")
        launch = aot_launch(n, settings, target_arch())
        params = trtp.KernelLaunchParams()
        params.grid_x = candidate_scores.shape_expr[0]  # one program per image
        params.block_x = launch["block_x"]
        params.shared_mem = launch["shared_mem"]
        extra = trtp.SymIntExprs(1)
        extra[0] = trtp.SymInt32(candidate_scores.shape_expr[1])
        return launch["kernel_name"], launch["ptx"], params, extra

    @trtp.impl(PLUGIN_ID)
    def soft_nms_jit(candidate_boxes: trtp.Tensor, candidate_scores: trtp.Tensor, candidate_classes: trtp.Tensor,
                     method: str, sigma: float, iou_threshold: float, score_threshold: float, max_detections: int,
                     class_agnostic: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        settings = settings_from_attrs(method, sigma, iou_threshold, score_threshold, max_detections,
                                       class_agnostic)
        jit_soft_nms((candidate_boxes, candidate_scores, candidate_classes), outputs, settings, stream)

    assert list(inspect.signature(soft_nms_desc).parameters)[3:] == list(ATTRIBUTES)
    _registered = True
    return trtp
