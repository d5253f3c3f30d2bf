"""Soft-NMS: the fast CPU path and the GPU kernel (Triton interpreter) against the reference; effdet parity."""
import numpy as np
import pytest
import torch

from edet_deploy import EdetError
from edet_deploy.box_ops import box_iou
from edet_deploy.nms import METHODS, NmsSettings, batched_soft_nms, batched_soft_nms_reference, soft_nms
from edet_deploy.nms.synthetic import clustered_case, random_cases


def assert_same(ref, got, rtol=1e-5):
    num_r, boxes_r, scores_r, classes_r = ref
    num_g, boxes_g, scores_g, classes_g = (np.asarray(x) for x in got)
    np.testing.assert_array_equal(num_r.ravel(), num_g.ravel())
    np.testing.assert_array_equal(classes_r, classes_g)
    np.testing.assert_array_equal(boxes_r, boxes_g)  # same kept boxes = same kept indices
    np.testing.assert_allclose(scores_g, scores_r, rtol=rtol, atol=0)


def test_fast_cpu_matches_reference():
    for (boxes, scores, classes), opts in random_cases(0, 600, 300):
        assert_same(batched_soft_nms_reference(boxes, scores, classes, **opts),
                    batched_soft_nms(boxes, scores, classes, **opts))


def test_fast_cpu_large_n_over_k():
    rng = np.random.default_rng(1)
    boxes, scores, classes = clustered_case(rng, 2, 5000, 90)
    for method in METHODS:
        assert_same(batched_soft_nms_reference(boxes, scores, classes, method=method),
                    batched_soft_nms(boxes, scores, classes, method=method))


def test_gpu_kernel_under_triton_interpreter():
    from edet_deploy.kernels.soft_nms import run_interpreted

    cases, refs, settings = [], [], []
    for (boxes, scores, classes), opts in random_cases(2, 150, 48):
        refs.append(batched_soft_nms_reference(boxes, scores, classes, **opts))
        counts = np.full(scores.shape[0], scores.shape[1], np.int32)
        if scores.shape[1] == 0:  # the kernel always gets >= 1 slot; count 0 means empty
            boxes, scores, classes = np.zeros((len(counts), 1, 4), np.float32), np.zeros((len(counts), 1),
                                                                                          np.float32), np.zeros((len(counts), 1), np.int32)
        cases.append((boxes, scores, classes, counts))
        settings.append(dict(method_id=NmsSettings(opts["method"]).method_id, sigma=opts["sigma"],
                             iou_threshold=opts["iou_threshold"], score_threshold=opts["score_threshold"],
                             max_detections=opts["max_detections"], class_agnostic=opts["class_agnostic"]))
    outs = run_interpreted(*[[c[i] for c in cases] for i in range(4)], per_case=settings)
    for ref, got in zip(refs, outs):
        assert_same(ref, got)


def test_kernel_respects_candidate_count():
    from edet_deploy.kernels.soft_nms import run_interpreted

    rng = np.random.default_rng(3)
    boxes, scores, classes = clustered_case(rng, 2, 40, 2)
    counts = np.array([40, 17], np.int32)
    got = run_interpreted(boxes, scores, classes, counts, method_id=2, sigma=0.5, iou_threshold=0.3,
                          score_threshold=0.001, max_detections=30, class_agnostic=False)
    for b, n in enumerate(counts):
        ref = batched_soft_nms_reference(boxes[b:b + 1, :n], scores[b:b + 1, :n], classes[b:b + 1, :n],
                                         max_detections=30)
        assert_same(ref, tuple(x[b:b + 1] for x in got))


@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_to_ptx(arch):
    from edet_deploy.kernels.soft_nms import KERNEL_NAME, compile_ptx, launch_params

    k = compile_ptx(3840, NmsSettings().method_id, False, arch)
    assert f".visible .entry {KERNEL_NAME}(" in k.ptx and k.name == KERNEL_NAME
    assert f".target sm_{arch}" in k.ptx
    p = launch_params(8, 3840)
    assert p.grid == (8, 1, 1) and p.block == (32 * k.num_warps, 1, 1) and p.block_candidates == 4096


def _iou_pairs():
    """Pairs of boxes (first, second) covering the IoU cases: partial overlap, nested, identical, touching,
    disjoint, zero-area, both zero-area (empty union), fractional coordinates; plus random pairs."""
    crafted = [[[0, 0, 10, 10], [1, 0, 11, 10]], [[0, 0, 10, 10], [2, 2, 5, 7]], [[3, 3, 9, 9], [3, 3, 9, 9]],
               [[0, 0, 10, 10], [10, 0, 20, 10]], [[0, 0, 1, 1], [50, 50, 60, 60]], [[0, 0, 10, 10], [5, 5, 5, 9]],
               [[5, 5, 5, 5], [5, 5, 5, 5]], [[0.3, 0.7, 12.9, 5.1], [1.1, 0.2, 7.7, 9.3]]]
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 100, (64, 2, 2)).astype(np.float32)
    wh = rng.uniform(0, 40, (64, 2, 2)).astype(np.float32)
    pairs = np.concatenate([np.asarray(crafted, np.float32), np.concatenate([xy, xy + wh], -1)])
    return pairs  # [P, 2, 4]


def _iou_from_linear_decay(pairs, kept_scores):
    """Linear soft-NMS at IoU threshold 0 keeps a pair's second box (score 0.5) with 0.5 * (1 - IoU), the IoU
    being the kernel's: check those kept scores against box_ops's IoU."""
    iou = np.array([box_iou(p[:1], p[1:], np.float32)[0, 0] for p in pairs])
    expected = np.float32(0.5) * (np.float32(1) - iou)
    np.testing.assert_array_equal(kept_scores[:, 0], np.float32(1))
    np.testing.assert_array_equal(kept_scores[:, 1], expected)


def test_kernels_iou_is_box_ops_iou():
    """The numba path and the GPU kernel (Triton interpreter) compute IoU in-kernel; their decays agree with
    box_ops.box_iou (float32) bit for bit, and the reference's IoU is box_ops's."""
    from edet_deploy.kernels.soft_nms import run_interpreted
    from edet_deploy.nms import iou_one_to_many

    pairs = _iou_pairs()
    scores = np.tile(np.array([1.0, 0.5], np.float32), (len(pairs), 1))
    classes = np.zeros(scores.shape, np.int32)
    opts = dict(method="linear", iou_threshold=0.0, score_threshold=0.0, max_detections=2)
    _iou_from_linear_decay(pairs, batched_soft_nms(pairs, scores, classes, **opts)[2])
    got = run_interpreted(pairs, scores, classes, np.full(len(pairs), 2, np.int32), method_id=1, sigma=0.5,
                          iou_threshold=0.0, score_threshold=0.0, max_detections=2, class_agnostic=False)
    _iou_from_linear_decay(pairs, np.asarray(got[2]))
    for p in pairs:
        np.testing.assert_array_equal(iou_one_to_many(p[0], p[1:]), box_iou(p[:1], p[1:], np.float32)[0])
    np.testing.assert_allclose(box_iou(pairs[:1, 0], pairs[:1, 1])[0, 0], 9 / 11)  # the by-hand value below


def test_reference_semantics_by_hand():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.9, 0.8, 0.7], np.float32)
    # hard: box 0 wins the tie (lowest index), boxes 1 and 2 overlap it (IoU 1 and 9/11) and go.
    keep, kept = soft_nms(boxes, scores, method="hard", iou_threshold=0.5)
    assert keep.tolist() == [0, 3] and kept.tolist() == pytest.approx([0.9, 0.7])
    # gaussian: box 1 decays to 0.9 * exp(-1 / 0.5); box 2 (IoU 9/11) to 0.8 * exp(-(9/11)^2 / 0.5).
    keep, kept = soft_nms(boxes, scores)
    d2 = 0.8 * np.exp(-(9 / 11) ** 2 / 0.5)
    d1 = 0.9 * np.exp(-1 / 0.5)
    assert keep.tolist() == [0, 3, 2, 1]
    np.testing.assert_allclose(kept[:3], [0.9, 0.7, d2], rtol=1e-6)
    # box 1 is decayed again by box 2 (IoU 9/11) before being selected.
    np.testing.assert_allclose(kept[3], d1 * np.exp(-(9 / 11) ** 2 / 0.5), rtol=1e-5)
    # linear below the threshold: untouched.
    keep, kept = soft_nms(boxes[[0, 3]], scores[[0, 3]], method="linear")
    assert kept.tolist() == pytest.approx([0.9, 0.7])
    # all below the score threshold
    assert soft_nms(boxes, scores * 0 + 1e-4)[0].size == 0
    # zero-area boxes have IoU 0 with everything, so they never suppress
    z = np.array([[5, 5, 5, 5], [5, 5, 5, 5]], np.float32)
    assert soft_nms(z, np.array([0.5, 0.4], np.float32), method="hard", iou_threshold=0.0)[0].tolist() == [0, 1]


def test_class_aware_output_convention():
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    classes = np.array([[0, 1, 0]], np.int32)
    num, b, s, c = batched_soft_nms(boxes, scores, classes, method="hard", max_detections=5)
    assert num.dtype == np.int32 and num.shape == (1, 1) and num[0, 0] == 2
    assert b.shape == (1, 5, 4) and s.shape == (1, 5) and c.dtype == np.int32
    assert c[0, :2].tolist() == [0, 1] and s[0, 2:].tolist() == [0, 0, 0] and not b[0, 2:].any()
    num, *_ = batched_soft_nms(boxes, scores, classes, method="hard", class_agnostic=True)
    assert num[0, 0] == 1


@pytest.mark.parametrize("bad,match", [
    (dict(scores=np.array([[np.nan]], np.float32)), "NaN"),
    (dict(boxes=np.array([[[5, 0, 1, 1]]], np.float32)), "x2 >= x1"),
    (dict(boxes=np.zeros((1, 2, 4), np.float32)), "shape"),
    (dict(method="box"), "unknown soft-NMS method"),
    (dict(sigma=0.0), "sigma"),
    (dict(classes=np.zeros((1, 3), np.int32)), "classes must have shape"),
])
def test_bad_input_is_a_clear_error(bad, match):
    args = dict(boxes=np.array([[[0, 0, 1, 1]]], np.float32), scores=np.array([[0.5]], np.float32),
                classes=np.zeros((1, 1), np.int32))
    args.update(bad)
    with pytest.raises(EdetError, match=match):
        batched_soft_nms(**args)


def test_gaussian_matches_effdet(effdet_module):
    """effdet's batched_soft_nms uses the same gaussian decay; it keeps going past 100 detections and
    keeps scores strictly above the threshold, so compare its first K picks with ours (K = 100)."""
    from effdet.soft_nms import batched_soft_nms as effdet_soft_nms

    rng = np.random.default_rng(5)
    for _ in range(5):
        boxes, scores, classes = clustered_case(rng, 1, 400, 5)
        idx, sc = effdet_soft_nms(torch.from_numpy(boxes[0]), torch.from_numpy(scores[0]),
                                  torch.from_numpy(classes[0]).long(), method_gaussian=True, sigma=0.5,
                                  score_threshold=0.001)
        num, b, s, c = batched_soft_nms(boxes, scores, classes)
        n = int(num[0, 0])
        np.testing.assert_array_equal(b[0, :n], boxes[0, idx[:n].numpy()])
        np.testing.assert_allclose(s[0, :n], sc[:n].numpy(), rtol=1e-4)
