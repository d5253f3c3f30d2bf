"""FP16 and INT8 graphs: structure TensorRT needs, they run in ONNX Runtime, and their detections on real
images (the bundled shapes model on generated shapes) stay close to FP32."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from edet_deploy import EdetError
from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
from edet_deploy.data import CocoDataset, generate_shapes
from edet_deploy.export import export_onnx
from edet_deploy.trt.check import check_trt_compat
from edet_deploy.precision.convert import to_fp16, to_int8
from edet_deploy.precision.int8 import check_qdq, strip_nms
from edet_deploy.preprocess import preprocess

WEIGHTS = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), {"val": 8, "calib": 24}, seed=11, progress=False)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    if not WEIGHTS.is_file():
        pytest.skip("bundled shapes model missing")
    return export_onnx("d0", tmp_path_factory.mktemp("prec"), weights=str(WEIGHTS), dynamic_batch=4).onnx_path


def _batch(shapes, n=4):
    ds = CocoDataset(shapes, "val")
    return preprocess([ds.image_path(i) for i in range(n)], 256)[0]


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.clip(rb - lt, 0, None).prod()
    return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)


def _confident_match(ref, got, min_score=0.5, iou=0.95, score_tol=0.05):
    """Every confident FP32 detection has a same-class twin in the other graph (IoU, score tolerance)."""
    for i in range(len(ref["num_detections"])):
        keep = ref["detection_scores"][i] >= min_score
        assert keep.any()
        for box, score, cls in zip(ref["detection_boxes"][i][keep], ref["detection_scores"][i][keep],
                                   ref["detection_classes"][i][keep]):
            cand = [j for j in range(int(got["num_detections"][i, 0])) if got["detection_classes"][i, j] == cls
                    and abs(got["detection_scores"][i, j] - score) <= score_tol
                    and _iou(box, got["detection_boxes"][i, j]) >= iou]
            assert cand, f"image {i}: class {cls} score {score:.3f} lost"


def test_fp16_graph(fp32, shapes):
    res = to_fp16(fp32, data=shapes, num_images=4)
    model = onnx.load(str(res.onnx_path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output} == {
        "num_detections": TensorProto.INT32, "detection_boxes": TensorProto.FLOAT,
        "detection_scores": TensorProto.FLOAT, "detection_classes": TensorProto.INT32}
    half = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(half) > 100  # the network's weights
    decode = [n for n in model.graph.node if n.op_type in ("Exp", "TopK") or n.name == "/Sigmoid"]
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert all(types.get(n.output[0]) == TensorProto.FLOAT for n in decode if n.op_type != "TopK")
    assert check_trt_compat(model) == [] and res.metadata["precision"] == "fp16"
    x = _batch(shapes)
    ref, got = OnnxRuntimeRunner(fp32).infer(x), OnnxRuntimeRunner(res.onnx_path).infer(x)
    # Stated tolerance: confident detections keep their class, IoU >= 0.98, score within 0.01.
    _confident_match(ref, got, iou=0.98, score_tol=0.01)


def _kept_fraction(ref, got, min_score=0.5, iou=0.7, score_tol=0.25):
    """Share of the confident reference detections with a same-class twin in `got` (IoU, score tolerance)."""
    kept = total = 0
    for i in range(len(ref["num_detections"])):
        for box, score, cls in zip(ref["detection_boxes"][i], ref["detection_scores"][i], ref["detection_classes"][i]):
            if score < min_score:
                continue
            total += 1
            kept += any(got["detection_classes"][i, j] == cls and abs(got["detection_scores"][i, j] - score) <= score_tol
                        and _iou(box, got["detection_boxes"][i, j]) >= iou for j in range(int(got["num_detections"][i, 0])))
    return kept / total


def test_int8_qdq_structure_cache_and_accuracy(fp32, shapes, tmp_path):
    res = to_int8(fp32, shapes, tmp_path / "q.onnx", num_images=24, method="minmax", cache_dir=tmp_path / "c")
    info = res.metadata["int8"]
    assert not info["cache_hit"] and info["quantized_convs"] > 200
    model = onnx.load(str(res.onnx_path))
    counts = check_qdq(strip_nms(model)[0])
    assert counts["per_channel_convs"] == info["quantized_convs"] == counts["convs"]
    assert check_trt_compat(model) == []
    again = to_int8(fp32, shapes, tmp_path / "q2.onnx", num_images=24, method="minmax", cache_dir=tmp_path / "c")
    assert again.metadata["int8"]["cache_hit"] and again.metadata["int8"]["seconds"] < info["seconds"]
    assert check_qdq(strip_nms(onnx.load(str(tmp_path / "q2.onnx")))[0]) == counts  # same ranges, same graph
    # Exclusions keep those convs in float. The box head is what the sensitivity sweep keeps in float for this
    # model (all-INT8 box regression moves boxes by several pixels at 256 px); with it excluded, confident
    # detections survive INT8 (a sanity bound from 24 calibration images; the accuracy cost is measured as mAP
    # in benchmarks/precision_accuracy.py).
    ex = to_int8(fp32, shapes, tmp_path / "q3.onnx", num_images=24, method="minmax", cache_dir=tmp_path / "c",
                 exclude=["/model/box_net/*"])
    excluded = ex.metadata["int8"]["excluded_convs"]
    assert len(excluded) == 40 and all("/model/box_net/" in n for n in excluded)
    assert ex.metadata["int8"]["cache_hit"]  # exclusions reuse the same calibration ranges
    ex = to_int8(fp32, shapes, tmp_path / "q4.onnx", num_images=24, method="percentile", cache_dir=tmp_path / "c",
                 exclude=["/model/box_net/*"])
    x = _batch(shapes)
    ref = OnnxRuntimeRunner(fp32).infer(x)
    ort_int8 = OnnxRuntimeRunner(ex.onnx_path).infer(x)
    _confident_match(ref, ort_int8, iou=0.7, score_tol=0.2)
    # OpenVINO runs the same Q/DQ twin with its own INT8 kernels; its requantization rounds differently from
    # ONNX Runtime's, by about as much as INT8 differs from FP32, so it is held to ONNX Runtime's INT8 record:
    # it keeps (nearly) as many of the confident FP32 detections.
    pytest.importorskip("openvino")
    from edet_deploy.backends.openvino import OpenVinoRunner
    ov_int8 = OpenVinoRunner(ex.onnx_path, cache_dir=False).infer(x)
    kept_ort, kept_ov = _kept_fraction(ref, ort_int8), _kept_fraction(ref, ov_int8)
    assert kept_ort == 1.0 and kept_ov >= 0.9, (kept_ort, kept_ov)


def test_calibration_refuses_bad_data(fp32, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdetError, match="no calibration images"):
        to_int8(fp32, tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EdetError, match="unreadable calibration image"):
        to_int8(fp32, bad)
    with pytest.raises(EdetError, match="not found"):
        to_int8(fp32, tmp_path / "missing")
    with pytest.raises(EdetError, match="unknown calibration method"):
        to_int8(fp32, _one_image(tmp_path), method="magic")


def _one_image(tmp_path):
    from PIL import Image
    d = tmp_path / "one"
    d.mkdir()
    Image.new("RGB", (64, 64)).save(d / "x.png")
    return d
