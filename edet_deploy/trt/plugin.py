"""The `edet::soft_nms` TensorRT plugin (quickly deployable plugin API, `tensorrt.plugin`).

The parts that need no TensorRT are plain functions, tested on CPU: output descriptions (`output_specs`) and
the ahead-of-time launch (`aot_launch`: PTX from kernels/, grid, block, shared memory, scalar arguments).
`register()` wraps them with the real decorators where TensorRT is installed. The AOT implementation makes
engines that run in any TensorRT runtime (trtexec, Triton's tensorrt backend) with no Python; the JIT
implementation (torch + OpenAI Triton) is for debugging.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..nms import op as nms_op
from ..nms.settings import NmsSettings

PLUGIN_ID = f"{nms_op.DOMAIN}::{nms_op.OP_TYPE}"
_registered = False  # tensorrt.plugin refuses a second registration of the same id  # matched by the ONNX node's domain and op_type

# (output name, dtype name, shape as a function of (batch, candidates, K))
_OUTPUT_LAYOUT = (("num_detections", "int32", lambda b, n, k: (b, 1)),
                  ("detection_boxes", "float32", lambda b, n, k: (b, k, 4)),
                  ("detection_scores", "float32", lambda b, n, k: (b, k)),
                  ("detection_classes", "int32", lambda b, n, k: (b, k)))


def output_specs(batch, num_candidates, max_detections) -> List[Tuple[str, str, tuple]]:
    """[(name, dtype, shape)] of the plugin's outputs; works with ints or TensorRT shape expressions."""
    return [(name, dtype, shape(batch, num_candidates, max_detections)) for name, dtype, shape in _OUTPUT_LAYOUT]


def settings_from_attrs(method: str, sigma: float, iou_threshold: float, score_threshold: float,
                        max_detections: int, class_agnostic: int) -> NmsSettings:
    return NmsSettings(method, float(sigma), float(iou_threshold), float(score_threshold), int(max_detections),
                       bool(class_agnostic))


def aot_launch(num_candidates: int, settings: NmsSettings, arch: int) -> Dict:
    """Everything the AOT implementation returns, as plain data: kernel name, PTX, launch parameters per
    batch size (grid = batch), and the scalar arguments in kernel order (N)."""
    from edet_kernels.soft_nms import compile_ptx, launch_params

    k = compile_ptx(int(num_candidates), settings.method_id, settings.class_agnostic, arch, settings.sigma,
                    settings.iou_threshold, settings.score_threshold, settings.max_detections)
    params = launch_params(1, num_candidates, k.shared_mem)
    return {"kernel_name": k.name, "ptx": k.ptx, "block_x": params.block[0], "shared_mem": k.shared_mem,
            "grid": "batch", "extra_args": ["N"], "num_warps": k.num_warps}


def register():
    """Register the plugin with TensorRT (idempotent). Needs TensorRT >= 11 and a GPU."""
    from . import require_tensorrt

    trt = require_tensorrt()
    import tensorrt.plugin as trtp
    from typing import Tuple as T

    global _registered
    if _registered:
        return trtp

    @trtp.register(PLUGIN_ID)
    def soft_nms_desc(candidate_boxes: trtp.TensorDesc, candidate_scores: trtp.TensorDesc,
                      candidate_classes: trtp.TensorDesc, method: str, sigma: float, iou_threshold: float,
                      score_threshold: float, max_detections: int, class_agnostic: int
                      ) -> T[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, n = candidate_scores.shape_expr[0], candidate_scores.shape_expr[1]
        dtypes = {"int32": trt.int32, "float32": trt.float32}
        return tuple(trtp.from_shape_expr(shape, dtypes[dtype])
                     for _, dtype, shape in output_specs(b, n, max_detections))

    @trtp.aot_impl(PLUGIN_ID)
    def soft_nms_aot(candidate_boxes: trtp.TensorDesc, candidate_scores: trtp.TensorDesc,
                     candidate_classes: trtp.TensorDesc, method: str, sigma: float, iou_threshold: float,
                     score_threshold: float, max_detections: int, class_agnostic: int,
                     outputs: T[trtp.TensorDesc], tactic: int):
        from .compat import gpu_properties

        settings = settings_from_attrs(method, sigma, iou_threshold, score_threshold, max_detections,
                                       class_agnostic)
        major, minor = gpu_properties()[1].split(".")  # no torch in the serving image that builds engines
        n = candidate_scores.shape_expr[1]
        launch = aot_launch(int(n), settings, int(major) * 10 + int(minor))
        params = trtp.KernelLaunchParams()
        params.grid_x = candidate_scores.shape_expr[0]  # one program per image
        params.block_x = launch["block_x"]
        params.shared_mem = launch["shared_mem"]
        extra = trtp.SymIntExprs(1)
        extra[0] = trtp.SymInt32(n)
        return launch["kernel_name"], launch["ptx"], params, extra

    @trtp.impl(PLUGIN_ID)
    def soft_nms_jit(candidate_boxes: trtp.Tensor, candidate_scores: trtp.Tensor, candidate_classes: trtp.Tensor,
                     method: str, sigma: float, iou_threshold: float, score_threshold: float, max_detections: int,
                     class_agnostic: int, outputs: T[trtp.Tensor], stream: int) -> None:
        import torch
        from edet_kernels.soft_nms import run

        settings = settings_from_attrs(method, sigma, iou_threshold, score_threshold, max_detections,
                                       class_agnostic)
        boxes = torch.as_tensor(candidate_boxes, device="cuda")
        scores = torch.as_tensor(candidate_scores, device="cuda")
        classes = torch.as_tensor(candidate_classes, device="cuda")
        counts = torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int32, device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            got = run(boxes, scores, classes, counts, method_id=settings.method_id, sigma=settings.sigma,
                      iou_threshold=settings.iou_threshold, score_threshold=settings.score_threshold,
                      max_detections=settings.max_detections, class_agnostic=settings.class_agnostic)
            for dst, src in zip(outputs, got):
                torch.as_tensor(dst, device="cuda").copy_(src.reshape(torch.as_tensor(dst, device="cuda").shape))

    _registered = True
    return trtp
