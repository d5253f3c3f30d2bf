"""Build, compile and launch the soft-NMS Triton kernel, independently of TensorRT.

- `compile_ptx(target)` compiles to PTX on any machine (no GPU needed) for the TensorRT AOT plugin.
- `launch_params(...)` gives grid, block and shared memory consistent with the shapes.
- `run(...)` launches on torch tensors: CUDA tensors on a GPU, CPU tensors under the Triton interpreter.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

from . import soft_nms_kernel as _src

KERNEL_NAME = "soft_nms_kernel"
MAX_BLOCK = 8192  # candidates per image one program holds in registers (TensorRT TopK allows 3840)

# The plugin's kernel signature: 3 input tensors, the integer N, 4 output tensors (TensorRT's AOT order);
# everything else is a compile-time constant and `counts_ptr` is compiled out.
RUNTIME_ARGS = ("boxes_ptr", "scores_ptr", "classes_ptr", "N", "num_ptr", "out_boxes_ptr", "out_scores_ptr",
                "out_classes_ptr")
SIGNATURE = {"boxes_ptr": "*fp32", "scores_ptr": "*fp32", "classes_ptr": "*i32", "N": "i32", "num_ptr": "*i32",
             "out_boxes_ptr": "*fp32", "out_scores_ptr": "*fp32", "out_classes_ptr": "*i32",
             "counts_ptr": "constexpr", "K": "constexpr", "SIGMA": "constexpr", "IOU_THRESHOLD": "constexpr",
             "SCORE_THRESHOLD": "constexpr", "METHOD": "constexpr", "AGNOSTIC": "constexpr", "BLOCK": "constexpr",
             "HAS_COUNTS": "constexpr"}


# The oldest PTX ISA that can target each GPU architecture (PTX ISA manual, "PTX ISA Notes" of each `.target`;
# OpenAI Triton targets sm_XYa from sm_90 on). Triton would write the newest ISA its ptxas knows (triton 3.8: 8.8 =
# CUDA 12.9 up to sm_90, 9.x from sm_100 on, from its CUDA 13 ptxas), which a driver or image of an older CUDA
# refuses to load; the oldest ISA of the architecture loads on every CUDA that knows the GPU, so one PTX serves
# TensorRT 10.13 (CUDA 12.0+) and 11.x (CUDA 13.0+). Architectures not listed keep Triton's choice.
# Floor: Triton's code generation uses `::cta`-scoped operations, which need PTX ISA 7.8 (CUDA 11.8) whatever the
# architecture (sm_80's own 7.0 makes ptxas refuse the kernel); 7.8 still loads on every CUDA 12 and 13.
TRITON_MIN_PTX_ISA = 78
ARCH_PTX_ISA = {arch: max(isa, TRITON_MIN_PTX_ISA) for arch, isa in {
    75: 63, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 101: 86, 103: 88, 110: 90, 120: 87, 121: 88}.items()}


def constexprs(settings, block: int, has_counts: bool = False) -> dict:
    """Compile-time constants for NmsSettings-like `settings` (method_id, sigma, thresholds, max_detections)."""
    return {"K": int(settings["max_detections"]), "SIGMA": float(settings["sigma"]),
            "IOU_THRESHOLD": float(settings["iou_threshold"]), "SCORE_THRESHOLD": float(settings["score_threshold"]),
            "METHOD": int(settings["method_id"]), "AGNOSTIC": bool(settings["class_agnostic"]), "BLOCK": int(block),
            "HAS_COUNTS": bool(has_counts)}


def block_size(num_candidates: int) -> int:
    """Smallest power of two >= N (at least 16): the lanes of one program."""
    if num_candidates > MAX_BLOCK:
        raise ValueError(f"soft-NMS kernel takes at most {MAX_BLOCK} candidates per image, got {num_candidates}")
    return max(16, 1 << max(0, int(num_candidates - 1).bit_length()))


def num_warps_for(block: int) -> int:
    # About 16 candidates per thread keeps the eight per-candidate arrays in registers.
    return int(min(16, max(1, block // (32 * 16))))


@dataclass(frozen=True)
class LaunchParams:
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_mem: int
    num_warps: int
    block_candidates: int


def launch_params(batch: int, num_candidates: int, shared_mem: int = 0) -> LaunchParams:
    block = block_size(num_candidates)
    warps = num_warps_for(block)
    return LaunchParams(grid=(batch, 1, 1), block=(32 * warps, 1, 1), shared_mem=shared_mem, num_warps=warps,
                        block_candidates=block)


@functools.lru_cache(maxsize=None)
def kernel():
    """The kernel wrapped by `triton.jit`. Triton decides at import time whether the process interprets
    (TRITON_INTERPRET=1: CPU tensors, no GPU) or compiles; `run_interpreted` starts such a process."""
    import triton
    return triton.jit(_src.soft_nms_kernel)


def interpreting() -> bool:
    from triton import knobs
    return bool(knobs.runtime.interpret)


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    block_candidates: int
    arch: int
    scratch_bytes: int = 0


@functools.lru_cache(maxsize=64)
def compile_ptx(num_candidates: int, method_id: int = 2, class_agnostic: bool = False, arch: int = 80,
                sigma: float = 0.5, iou_threshold: float = 0.3, score_threshold: float = 0.001,
                max_detections: int = 100) -> CompiledKernel:
    """Compile the plugin's kernel to PTX for sm_`arch` without a GPU (Triton's CUDA backend needs only the
    target), in the oldest PTX ISA of that architecture (ARCH_PTX_ISA). Its runtime parameters are RUNTIME_ARGS
    (plus Triton's trailing scratch pointers, unused: the metadata reports 0 bytes of scratch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block = block_size(num_candidates)
    warps = num_warps_for(block)
    consts = constexprs({"max_detections": max_detections, "sigma": sigma, "iou_threshold": iou_threshold,
                         "score_threshold": score_threshold, "method_id": method_id,
                         "class_agnostic": class_agnostic}, block)
    consts["counts_ptr"] = None
    src = ASTSource(fn=kernel(), signature=SIGNATURE, constexprs=consts)
    options = {"num_warps": warps}
    if arch in ARCH_PTX_ISA:
        options["ptx_version"] = ARCH_PTX_ISA[arch]  # a CUDAOptions field: LLVM's +ptxNN and the `.version` line
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    md = compiled.metadata
    scratch = int(getattr(md, "global_scratch_size", 0) or 0) + int(getattr(md, "profile_scratch_size", 0) or 0)
    ptx = compiled.asm["ptx"]
    if scratch:  # TensorRT's AOT launch passes exactly RUNTIME_ARGS; it has no scratch buffer to give
        raise RuntimeError(f"this Triton build asks for {scratch} bytes of kernel scratch memory, which TensorRT's "
                           f"AOT launch cannot provide")
    ptx = trim_entry_params(ptx, md.name, len(RUNTIME_ARGS))
    return CompiledKernel(name=md.name, ptx=ptx, num_warps=md.num_warps, shared_mem=md.shared,
                          block_candidates=block, arch=arch, scratch_bytes=scratch)


def trim_entry_params(ptx: str, name: str, keep: int) -> str:
    """Drop the kernel parameters after the first `keep` when the body never reads them.

    Triton appends its global/profile scratch pointers to every kernel; TensorRT's AOT launcher passes exactly
    the plugin's inputs, scalar arguments and outputs. With 0 bytes of scratch those pointers are dead, and
    removing them makes the entry's parameter list the one TensorRT launches with (no argument read past the
    end of its array)."""
    head = f".entry {name}("
    start = ptx.index(head) + len(head)
    end = ptx.index(")", start)
    params = [line for line in ptx[start:end].split("\n") if line.strip()]
    if len(params) <= keep:
        return ptx
    body = ptx[end:]
    for i in range(keep, len(params)):
        if f"{name}_param_{i}" in body:
            raise RuntimeError(f"{name} reads parameter {i}; it cannot be dropped")
    kept = [line.rstrip().rstrip(",") for line in params[:keep]]
    return ptx[:start] + "\n" + ",\n".join(kept) + "\n" + body


def run(boxes, scores, classes, counts, *, method_id: int, sigma: float, iou_threshold: float,
        score_threshold: float, max_detections: int, class_agnostic: bool):
    """Launch on torch tensors (CUDA: compiled kernel; CPU: interpreter). Returns the four outputs."""
    import torch

    b, n = scores.shape
    k = int(max_detections)
    dev = scores.device
    boxes = boxes.to(torch.float32).contiguous()
    scores = scores.to(torch.float32).contiguous()
    classes = classes.to(torch.int32).contiguous()
    counts = counts.to(device=dev, dtype=torch.int32).contiguous()
    num = torch.zeros(b, dtype=torch.int32, device=dev)
    out_boxes = torch.zeros(b, k, 4, dtype=torch.float32, device=dev)
    out_scores = torch.zeros(b, k, dtype=torch.float32, device=dev)
    out_classes = torch.zeros(b, k, dtype=torch.int32, device=dev)
    if b == 0 or k == 0:
        return num.view(b, 1), out_boxes, out_scores, out_classes
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing triton); "
                           "use run_interpreted()")
    params = launch_params(b, max(n, 1))
    consts = constexprs({"max_detections": k, "sigma": sigma, "iou_threshold": iou_threshold,
                         "score_threshold": score_threshold, "method_id": method_id,
                         "class_agnostic": class_agnostic}, params.block_candidates, has_counts=True)
    kernel()[params.grid](boxes, scores, classes, max(n, 1), num, out_boxes, out_scores, out_classes, counts,
                          num_warps=params.num_warps, **consts)
    return num.view(b, 1), out_boxes, out_scores, out_classes


def run_interpreted(boxes, scores, classes, counts, **settings):
    """Run the kernel on numpy arrays under the Triton interpreter, in a child process with TRITON_INTERPRET=1
    when this process compiles instead. `boxes` etc. may be lists of per-case arrays (one child for all)."""
    import os
    import subprocess
    import sys
    import tempfile

    import numpy as np

    single = not isinstance(boxes, (list, tuple))
    cases = [(boxes, scores, classes, counts)] if single else list(zip(boxes, scores, classes, counts))
    settings_list = [settings] * len(cases) if "method_id" in settings else settings["per_case"]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        arrays = {}
        for i, (case, st) in enumerate(zip(cases, settings_list)):
            for name, arr in zip(("boxes", "scores", "classes", "counts"), case):
                arrays[f"{i}_{name}"] = np.asarray(arr)
            arrays[f"{i}_settings"] = np.array([st["method_id"], st["sigma"], st["iou_threshold"],
                                                st["score_threshold"], st["max_detections"],
                                                st["class_agnostic"]], np.float64)
        np.savez(inp, n=len(cases), **arrays)
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "edet_deploy.kernels.soft_nms", inp, out], check=True, env=env)
        res = np.load(out)
        outs = [tuple(res[f"{i}_{k}"] for k in ("num", "boxes", "scores", "classes")) for i in range(len(cases))]
    return outs[0] if single else outs


def _interpret_main(inp: str, out: str) -> None:
    import numpy as np
    import torch

    data = np.load(inp)
    results = {}
    for i in range(int(data["n"])):
        m, sigma, iou, thr, k, agn = data[f"{i}_settings"]
        got = run(*(torch.from_numpy(data[f"{i}_{name}"]) for name in ("boxes", "scores", "classes", "counts")),
                  method_id=int(m), sigma=sigma, iou_threshold=iou, score_threshold=thr, max_detections=int(k),
                  class_agnostic=bool(agn))
        for name, t in zip(("num", "boxes", "scores", "classes"), got):
            results[f"{i}_{name}"] = t.numpy()
    np.savez(out, **results)


if __name__ == "__main__":
    import sys
    _interpret_main(sys.argv[1], sys.argv[2])
