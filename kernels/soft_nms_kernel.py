"""Soft-NMS as one OpenAI Triton kernel: one program per image, the whole batch in one launch.

The kernel body is a plain function so that it can be wrapped both ways: `triton.jit` (compiled to PTX, for
TensorRT's ahead-of-time plugin and for torch CUDA tensors) and the Triton interpreter (CPU, for tests).
Arithmetic follows `edet_deploy.nms.reference` step by step in float32.

Inputs, for B images of N candidates: boxes [B, N, 4] float32 (x1, y1, x2, y2), scores [B, N] float32,
classes [B, N] int32, optionally counts [B] int32 (valid candidates per image, <= N; HAS_COUNTS). Outputs
(fully written, zero padded): num_detections [B] int32, out_boxes [B, K, 4] float32, out_scores [B, K]
float32, out_classes [B, K] int32.

Argument order is TensorRT's ahead-of-time plugin convention: input tensors, integer scalars (N), output
tensors. The settings (K, sigma, thresholds, method) are compile-time constants: TensorRT passes only integer
scalars to AOT kernels, and constants let the compiler unroll and specialise. `counts_ptr` is compiled out
(None) for the plugin, where every candidate is valid.
"""
import triton.language as tl


def soft_nms_kernel(boxes_ptr, scores_ptr, classes_ptr, N,
                    num_ptr, out_boxes_ptr, out_scores_ptr, out_classes_ptr, counts_ptr,
                    K: tl.constexpr, SIGMA: tl.constexpr, IOU_THRESHOLD: tl.constexpr,
                    SCORE_THRESHOLD: tl.constexpr, METHOD: tl.constexpr, AGNOSTIC: tl.constexpr,
                    BLOCK: tl.constexpr, HAS_COUNTS: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    sigma = SIGMA
    iou_threshold = IOU_THRESHOLD
    score_threshold = SCORE_THRESHOLD
    if HAS_COUNTS:
        count = tl.load(counts_ptr + b)
    else:
        count = N
    valid = offs < count
    row = b * N + offs
    x1 = tl.load(boxes_ptr + row * 4 + 0, mask=valid, other=0.0)
    y1 = tl.load(boxes_ptr + row * 4 + 1, mask=valid, other=0.0)
    x2 = tl.load(boxes_ptr + row * 4 + 2, mask=valid, other=0.0)
    y2 = tl.load(boxes_ptr + row * 4 + 3, mask=valid, other=0.0)
    cls = tl.load(classes_ptr + row, mask=valid, other=-1)
    s = tl.load(scores_ptr + row, mask=valid, other=-float("inf"))
    s = tl.where(s >= score_threshold, s, -float("inf"))  # below threshold: never selectable
    area = (x2 - x1) * (y2 - y1)
    kept = tl.zeros([], dtype=tl.int32)
    for k in range(K):
        best = tl.argmax(s, 0, tie_break_left=True)  # lowest index among equal scores
        best_score = tl.max(s, 0)
        take = best_score >= score_threshold
        src = b * N + best
        bx1 = tl.load(boxes_ptr + src * 4 + 0)
        by1 = tl.load(boxes_ptr + src * 4 + 1)
        bx2 = tl.load(boxes_ptr + src * 4 + 2)
        by2 = tl.load(boxes_ptr + src * 4 + 3)
        bcls = tl.load(classes_ptr + src)
        dst = b * K + k
        tl.store(out_boxes_ptr + dst * 4 + 0, tl.where(take, bx1, 0.0))
        tl.store(out_boxes_ptr + dst * 4 + 1, tl.where(take, by1, 0.0))
        tl.store(out_boxes_ptr + dst * 4 + 2, tl.where(take, bx2, 0.0))
        tl.store(out_boxes_ptr + dst * 4 + 3, tl.where(take, by2, 0.0))
        tl.store(out_scores_ptr + dst, tl.where(take, best_score, 0.0))
        tl.store(out_classes_ptr + dst, tl.where(take, bcls, 0))
        kept += take.to(tl.int32)

        iw = tl.maximum(tl.minimum(bx2, x2) - tl.maximum(bx1, x1), 0.0)
        ih = tl.maximum(tl.minimum(by2, y2) - tl.maximum(by1, y1), 0.0)
        inter = iw * ih
        union = (bx2 - bx1) * (by2 - by1) + area - inter
        iou = tl.where(union > 0.0, inter / tl.where(union > 0.0, union, 1.0), 0.0)
        # Only live candidates are decayed (dead ones are -inf); when nothing was taken, nothing is live.
        if AGNOSTIC:
            affected = (offs != best) & (s >= score_threshold)
        else:
            affected = (offs != best) & (s >= score_threshold) & (cls == bcls)
        if METHOD == 2:  # gaussian
            decayed = s * tl.exp(-(iou * iou) / sigma)
        elif METHOD == 1:  # linear
            decayed = tl.where(iou > iou_threshold, s * (1.0 - iou), s)
        else:  # hard
            decayed = tl.where(iou > iou_threshold, -float("inf"), s)
        s = tl.where(affected, decayed, s)
        s = tl.where(offs == best, -float("inf"), s)
        s = tl.where(s < score_threshold, -float("inf"), s)
    tl.store(num_ptr + b, kept)
