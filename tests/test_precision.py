"""FP16 and INT8 graphs: structure TensorRT needs, they run in ONNX Runtime, and their detections on real
images (the bundled shapes model on generated shapes) stay close to FP32."""
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from edet_deploy import EdetError
from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
from edet_deploy.box_ops import box_iou
from edet_deploy.data import CocoDataset, generate_shapes
from edet_deploy.metadata import read_metadata
from edet_deploy.trt.check import check_trt_compat
from edet_deploy.precision.census import census
from edet_deploy.precision.convert import to_fp16, to_int8
from edet_deploy.nms.graph import strip_nms
from edet_deploy.precision.int8 import check_qdq
from edet_deploy.preprocess import preprocess

WEIGHTS = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), {"val": 8, "calib": 24}, seed=11, progress=False)


@pytest.fixture(scope="module")
def fp32(bundled_d0):
    return bundled_d0


def _batch(shapes, n=4):
    ds = CocoDataset(shapes, "val")
    return preprocess([ds.image_path(i) for i in range(n)], 256)[0]


def _iou(a, b):
    return box_iou(a[None], b[None])[0, 0]


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
    c = census(model)  # no overflow on these images: every multiply-add in fp16
    assert c["fp16"] == 1.0 and c["int8"] == c["fp32"] == 0.0 and not res.metadata["fp16"]["kept_fp32"]
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


def _qdq_consumers(model):
    """(op of each DQ activation consumer, Q input producer op) pairs of a graph."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = []
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        (dq,) = consumers[q.output[0]]
        src = producer.get(q.input[0])
        pairs += [(c.op_type, src.op_type if src is not None else None) for c in consumers[dq.output[0]]]
    return pairs


def test_int8_on_fp16_structure_cache_and_accuracy(fp32, shapes, tmp_path, monkeypatch):
    res = to_int8(fp32, shapes, tmp_path / "q.onnx", num_images=24, method="minmax", cache_dir=tmp_path / "c",
                  progress=False)
    info = res.metadata["int8"]
    assert not info["cache_hit"] and info["quantized_convs"] > 200 and info["opset"] == 19
    model = onnx.load(str(res.onnx_path))
    assert next(o.version for o in model.opset_import if o.domain == "") >= 19  # fp16 scales need opset 19
    counts = check_qdq(strip_nms(model)[0])
    assert counts["per_channel_convs"] == info["quantized_convs"] == counts["convs"]
    assert check_trt_compat(model) == []
    # INT8 on top of FP16: activation scales are float16 (the activations' type), weights int8 per channel,
    # and every float network tensor is float16; decode and NMS inputs stay float32.
    inits = {i.name: i for i in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(inits[q.input[1]].data_type == TensorProto.FLOAT16 for q in qs)
    assert all(inits[q.input[2]].data_type == TensorProto.INT8 for q in qs)
    # Placement: Q/DQ feed Conv inputs or the residual input of an Add fused into a Conv, never anything else
    # (no Conv-output quantization: the heads' logits and box codes reach sigmoid / decode in fp16).
    pairs = _qdq_consumers(model)
    assert {c for c, _ in pairs} == {"Conv", "Add"}
    assert 0 < sum(c == "Add" for c, _ in pairs) == info["residual_adds"]
    # Census of the default INT8 twin: every multiply-add in int8, none in fp32 (the method does not change it).
    c = census(model)
    assert c["int8"] >= 0.9 and c["fp32"] == 0.0 and res.metadata["census"]["int8"] == c["int8"]
    # The rerun takes its ranges from the cache: ONNX Runtime's calibrator is never built (checked without
    # timing, which a loaded machine makes meaningless).
    from onnxruntime.quantization import calibrate as ort_calibrate

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again despite the cache")
    with monkeypatch.context() as m:
        m.setattr(ort_calibrate, "create_calibrator", no_calibration)
        again = to_int8(fp32, shapes, tmp_path / "q2.onnx", num_images=24, method="minmax",
                        cache_dir=tmp_path / "c", progress=False)
    assert again.metadata["int8"]["cache_hit"]
    assert check_qdq(strip_nms(onnx.load(str(tmp_path / "q2.onnx")))[0]) == counts  # same ranges, same graph
    # Exclusions keep those convs in FP16 (not FP32) and reuse the cached ranges.
    ex = to_int8(fp32, shapes, tmp_path / "q3.onnx", num_images=24, method="minmax", cache_dir=tmp_path / "c",
                 exclude=["/model/box_net/*"], progress=False)
    excluded = ex.metadata["int8"]["excluded_convs"]
    assert len(excluded) == 40 and all("/model/box_net/" in n for n in excluded)
    assert ex.metadata["int8"]["cache_hit"]
    c3 = census(onnx.load(str(ex.onnx_path)))
    assert 0 < c3["fp16"] < 0.5 and c3["fp32"] == 0.0 and c3["int8"] + c3["fp16"] == pytest.approx(1.0)
    check_qdq(strip_nms(onnx.load(str(ex.onnx_path)))[0])
    # With the box head in FP16 (what the sensitivity sweep keeps out of INT8 for this model), confident
    # detections survive INT8: a sanity bound from 24 calibration images; the accuracy cost is measured as mAP
    # in benchmarks/precision_accuracy.py.
    ex = to_int8(fp32, shapes, tmp_path / "q4.onnx", num_images=24, method="percentile", cache_dir=tmp_path / "c",
                 exclude=["/model/box_net/*"], progress=False)
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


def _tiny(tmp_path):
    """x -> Conv a (1x1) -> Conv b (1x1) -> Add(b, a) -> y: a residual block small enough to compute by hand."""
    from onnx import helper, numpy_helper
    rng = np.random.default_rng(3)
    wa, wb = rng.normal(size=(6, 4, 1, 1)).astype(np.float32), rng.normal(size=(6, 6, 1, 1)).astype(np.float32)
    ba = rng.normal(size=6).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="/model/a/Conv"),
         helper.make_node("Conv", ["a", "wb"], ["b"], name="/model/b/Conv"),
         helper.make_node("Add", ["b", "a"], ["y"], name="/model/add/Add")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 5])],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(ba, "ba"), numpy_helper.from_array(wb, "wb")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), wa, ba, wb


def test_qdq_insertion_matches_a_hand_computed_reference(tmp_path):
    """Our Q/DQ (fp16 scales, opset 19) run by ONNX Runtime equals int8 fake quantization computed in numpy."""
    import onnxruntime as ort
    from edet_deploy.precision.fp16 import convert_to_fp16
    from edet_deploy.precision.qdq import insert_qdq

    model, wa, ba, wb = _tiny(tmp_path)
    x = np.random.default_rng(4).normal(size=(1, 4, 5, 5)).astype(np.float32)
    a_ref = np.einsum("oi,nihw->nohw", wa[:, :, 0, 0], x) + ba[None, :, None, None]
    amax = {"x": float(np.abs(x).max()), "a": float(np.abs(a_ref).max())}
    half = convert_to_fp16(model, prefix="/model/")
    q, counts = insert_qdq(half, ["/model/a/Conv", "/model/b/Conv"], amax, {"wa": wa, "wb": wb})
    assert counts["residual_adds"] == 1 and counts["qdq_activations"] == 2  # `a` shares one pair: Conv b + Add
    onnx.checker.check_model(q, full_check=True)
    assert check_qdq(q)["per_channel_convs"] == 2

    def fq(v, scale):  # symmetric int8 fake quantization
        return np.clip(np.round(v / scale), -128, 127) * scale

    def fq_w(w):
        s = (np.abs(w.reshape(len(w), -1)).max(1) / 127).astype(np.float16).astype(np.float32)[:, None, None, None]
        return np.clip(np.round(w / s), -127, 127) * s

    sx = np.float16(amax["x"] / 127).astype(np.float32)
    sa = np.float16(amax["a"] / 127).astype(np.float32)
    a = np.einsum("oi,nihw->nohw", fq_w(wa)[:, :, 0, 0], fq(x.astype(np.float16).astype(np.float32), sx))
    a = a + ba.astype(np.float16).astype(np.float32)[None, :, None, None]
    aq = fq(a.astype(np.float16).astype(np.float32), sa)
    y_ref = np.einsum("oi,nihw->nohw", fq_w(wb)[:, :, 0, 0], aq) + aq
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=2e-2, atol=2e-2 * np.abs(y_ref).max())
    # and quantization did something: the float result differs by more than the tolerance somewhere
    y_float = np.einsum("oi,nihw->nohw", wb[:, :, 0, 0], a_ref) + a_ref
    assert np.abs(y_float - y_ref).max() > 1e-3


def test_check_qdq_rejects_output_quantization_and_asymmetry(tmp_path):
    from onnx import helper, numpy_helper
    from edet_deploy.precision.fp16 import convert_to_fp16
    from edet_deploy.precision.qdq import insert_qdq, qdq_violations

    model, wa, ba, wb = _tiny(tmp_path)
    good, _ = insert_qdq(convert_to_fp16(model, prefix="/model/"), ["/model/a/Conv", "/model/b/Conv"],
                         {"x": 1.0, "a": 4.0}, {"wa": wa, "wb": wb})
    assert qdq_violations(good) == []
    # Conv-output quantization: Conv b -> Q -> DQ -> Add (the INT8-on-FP32 layout, which quantized the heads' outputs)
    bad = onnx.ModelProto.FromString(good.SerializeToString())
    add = next(n for n in bad.graph.node if n.op_type == "Add")
    conv_out = next(i for i in add.input if "DequantizeLinear" not in i)
    bad.graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float16), "s_out"),
                                  numpy_helper.from_array(np.array(0, np.int8), "z_out")])
    nodes = list(bad.graph.node)
    i = nodes.index(add)
    nodes[i:i] = [helper.make_node("QuantizeLinear", [conv_out, "s_out", "z_out"], ["qo"], name="Q_out"),
                  helper.make_node("DequantizeLinear", ["qo", "s_out", "z_out"], ["dqo"], name="DQ_out")]
    del bad.graph.node[:]
    bad.graph.node.extend(nodes)
    add.input[list(add.input).index(conv_out)] = "dqo"
    found = qdq_violations(bad)
    assert any("not their outputs" in p for p in found), found
    with pytest.raises(EdetError, match="Q/DQ rule violation"):
        check_qdq(bad)
    # An asymmetric zero point
    asym = onnx.ModelProto.FromString(good.SerializeToString())
    zp = next(i for i in asym.graph.initializer if i.name.endswith("zero_point") and not i.dims)
    zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    with pytest.raises(EdetError, match="zero point must be int8 0"):
        check_qdq(asym)
    # A per-tensor weight scale
    pt = onnx.ModelProto.FromString(good.SerializeToString())
    s = next(i for i in pt.graph.initializer if i.name == "wa_scale")
    s.CopyFrom(numpy_helper.from_array(np.array(0.01, np.float16), "wa_scale"))
    assert any("per-channel" in p for p in qdq_violations(pt))


def test_census_matches_pytorch_mac_count(fp32):
    """MACs per image counted from the ONNX graph equal those counted on the PyTorch model with hooks."""
    import torch
    from edet_deploy.model import create_model

    model = create_model("d0", num_classes=4, weights=str(WEIGHTS), image_size=256).eval()
    total = []

    def hook(m, inp, out):
        total.append(out[0].numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 256, 256))
    for h in handles:
        h.remove()
    c = census(onnx.load(str(fp32)))
    assert c["macs"]["fp32"] == sum(total) and c["fp32"] == 1.0 and c["int8"] == 0.0


def test_calibrate_and_check_print_the_census(fp32, shapes, tmp_path, capsys):
    from edet_deploy.cli import main
    out = tmp_path / "cli.onnx"
    assert main(["calibrate", str(fp32), "--data", str(shapes), "--num-images", "4", "--method", "minmax",
                 "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "precision census" in text and "int8 100.0%" in text and "fp32 0.0%" in text
    assert "thresholds refined on 4 images" in text
    assert main(["check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "precision census" in text and "int8 100.0%" in text and "OK" in text
    # --no-refine: the calibrated thresholds as they are; refinement only ever tightened them
    raw = tmp_path / "raw.onnx"
    assert main(["calibrate", str(fp32), "--data", str(shapes), "--num-images", "4", "--method", "minmax",
                 "--out", str(raw), "--cache-dir", str(tmp_path / "c"), "--no-refine"]) == 0
    assert "thresholds refined" not in capsys.readouterr().out
    assert read_metadata(raw)["int8"]["refinement"] is None

    def activation_scales(path):
        m = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        return {q.input[0]: float(inits[q.input[1]]) for q in m.graph.node if q.op_type == "QuantizeLinear"}
    refined, unrefined = activation_scales(out), activation_scales(raw)
    assert refined.keys() == unrefined.keys()
    assert all(refined[k] <= unrefined[k] for k in refined)
    assert sum(refined[k] < unrefined[k] for k in refined) >= 10


def test_calibrate_sensitivity_keeps_the_chosen_blocks(fp32, shapes, tmp_path, capsys, monkeypatch):
    """The sweep itself (dozens of INT8 builds) is replaced; what is tested is what `calibrate --sensitivity`
    does with its answer: the report beside the graph, its line, and the chosen block kept out of INT8."""
    from edet_deploy.cli import main
    from edet_deploy.precision import sensitivity
    sweep = {"fp32_mAP": 0.5, "int8_all_mAP": 0.4, "kept_in_float": ["box_net"], "int8_with_exclusions_mAP": 0.48,
             "exclude_patterns": [sensitivity.pattern_for("box_net")]}
    monkeypatch.setattr(sensitivity, "sensitivity_sweep", lambda *a, **k: sweep)
    out = tmp_path / "s.onnx"
    assert main(["calibrate", str(fp32), "--data", str(shapes), "--num-images", "4", "--method", "minmax",
                 "--sensitivity", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    report = fp32.with_name(fp32.stem + ".sensitivity-minmax.json")
    assert json.loads(report.read_text()) == sweep
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"FP32 mAP 0.5000, INT8 all 0.4000, keeping ['box_net'] in float -> 0.4800 ({report})"
    excluded = read_metadata(out)["int8"]["excluded_convs"]
    assert excluded and all("/box_net/" in n for n in excluded)
    report.unlink()


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


def test_calibration_in_chunks_keeps_memory_bounded_and_minmax_exact(fp32, shapes, monkeypatch):
    """ONNX Runtime keeps every activation of the images one collect_data call gets (500 images of D0 at 256 px
    overflowed 24 GiB), so calibration feeds it chunks. Min/max merge exactly across chunks: the ranges equal a
    single pass's, and each chunk really is a separate call."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from edet_deploy.precision import int8

    candidate, _ = strip_nms(onnx.load(str(fp32)))
    images = int8.calibration_images(shapes, 6)
    assert int8.calibration_chunk(512) == 16 and int8.calibration_chunk(1536) == 4
    whole, _, _ = int8.calibrate(candidate, images, "minmax", None, 256)
    monkeypatch.setattr(int8, "calibration_chunk", lambda size: 4)
    calls = []
    collect = MinMaxCalibrater.collect_data

    def counting(self, reader):
        calls.append(reader.end - reader.i)
        return collect(self, reader)

    monkeypatch.setattr(MinMaxCalibrater, "collect_data", counting)
    chunked, _, _ = int8.calibrate(candidate, images, "minmax", None, 256)
    assert calls == [4, 2]
    assert chunked.keys() == whole.keys()
    assert all(np.isclose(chunked[k], whole[k], rtol=1e-6) for k in whole)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_in_chunks_equals_one_call(fp32, shapes, monkeypatch, method):
    """Histograms seeded with each tensor's final range add up across chunks to the one-call histogram, so
    entropy / percentile thresholds do not depend on the chunking (unseeded, ONNX Runtime's first chunk fixes the
    bin width and later ones add bins: 121 of 209 percentile thresholds moved here, and entropy on 400 images
    lost a mAP point)."""
    from edet_deploy.precision import int8

    candidate, _ = strip_nms(onnx.load(str(fp32)))
    images = int8.calibration_images(shapes, 6)
    whole, _, _ = int8.calibrate(candidate, images, method, None, 256)
    monkeypatch.setattr(int8, "calibration_chunk", lambda size: 4)
    chunked, _, _ = int8.calibrate(candidate, images, method, None, 256)
    assert chunked.keys() == whole.keys()
    differ = [k for k in whole if not np.isclose(chunked[k], whole[k], rtol=1e-5)]
    assert differ == [], f"{len(differ)} of {len(whole)} thresholds moved with the chunking"


def _kl_reference(hist, levels):
    """TensorRT's entropy calibration as NVIDIA's reference (pytorch-quantization's `_compute_amax_entropy`)
    describes it, written independently with numpy's digitize and plain loops: zero bin replaced by its
    neighbour; for each end bin i, P = bins [0, i) plus the outliers in its last bin, Q = those bins digitized
    into `levels` equal groups over [0, i) and expanded over the non-empty bins; the last i of least KL."""
    import math
    bins = np.asarray(hist, np.float64).copy()
    bins[0] = bins[1]
    best, best_kl = None, math.inf
    for i in range(levels, len(bins) + 1):
        group = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        group[bins[:i] == 0] = -1
        q = np.zeros(i)
        for g in set(group.tolist()) - {-1}:
            members = group == g
            q[members] = bins[:i][members].sum() / members.sum()
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        if np.any((p > 0) & (q == 0)):
            continue  # infinite divergence
        ps, qs = p / p.sum(), q / q.sum()
        kl = sum(ps[j] * math.log(ps[j] / qs[j]) for j in range(i) if ps[j] > 0)
        if kl <= best_kl:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("case", ["gaussian", "silu", "laplace_outlier", "sparse", "uniform"])
def test_kl_threshold_matches_nvidias_reference(case):
    from edet_deploy.precision.kl import kl_threshold
    rng = np.random.default_rng(7)
    x = {"gaussian": lambda: np.abs(rng.standard_normal(200_000)),
         "silu": lambda: np.abs((z := 3 * rng.standard_normal(200_000)) / (1 + np.exp(-z))),
         "laplace_outlier": lambda: np.append(np.abs(rng.laplace(size=200_000)), 60.0),
         "sparse": lambda: np.abs(rng.integers(0, 40, 5_000)).astype(float) * 0.37,  # many empty bins
         "uniform": lambda: rng.random(200_000)}[case]()
    hist, edges = np.histogram(x, 300, range=(0, x.max()))
    levels = 32
    assert kl_threshold(hist, edges, levels) == pytest.approx(edges[_kl_reference(hist, levels)])


def test_kl_threshold_clips_tails_and_keeps_a_uniform_range():
    from edet_deploy.precision.kl import kl_threshold
    rng = np.random.default_rng(3)
    u = rng.random(500_000)
    hist, edges = np.histogram(u, 2048, range=(0, 1))
    assert kl_threshold(hist, edges) > 0.97  # nothing to gain by clipping a uniform distribution
    g = np.abs(rng.standard_normal(2_000_000))
    hist, edges = np.histogram(g, 2048, range=(0, g.max()))
    t = kl_threshold(hist, edges)
    assert 3.0 < t < 0.95 * g.max()  # clips the gaussian's rare tail, keeps its body
    zeros = np.zeros(2048)
    assert kl_threshold(zeros, np.linspace(0, 1, 2049)) == 1.0  # an empty histogram keeps its range


def test_equalization_keeps_the_fp32_function_and_evens_the_channels(fp32, shapes):
    """equalize.py rewrites weights (and puts a Mul in front of uneven depthwise inputs): the FP32 graph must
    compute the same outputs, and the tensors int8 will quantize must come out with even channel ranges."""
    import onnxruntime as ort

    from edet_deploy.precision.equalize import channel_ranges, equalize

    candidate, _ = strip_nms(onnx.load(str(fp32)))
    ds = CocoDataset(shapes, "calib")
    feeds = [{"images": preprocess([ds.image_path(i)], 256)[0]} for i in range(8)]
    eq, info = equalize(candidate, feeds)
    assert info["pairs"] >= 60 and info["inputs"] >= 5  # every separable conv; the box head's last layer
    assert info["max_channel_spread_after"] < info["max_channel_spread_before"] / 2

    # the heads' raw outputs (class logits, box codes at every level), before the top-k selection, which
    # near-tied scores may reorder
    heads = [n.output[0] for n in candidate.graph.node if "/predict/conv_pw" in n.name]

    def run(model, feed):
        m = onnx.ModelProto.FromString(model.SerializeToString())
        del m.graph.output[:]
        m.graph.output.extend(onnx.helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in heads)
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    x = {"images": _batch(shapes)}
    assert len(heads) == 10
    for a, b in zip(run(candidate, x), run(eq, x)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max()))
    # the Mul'ed depthwise inputs: every channel spans the same range on the images it was fitted on (over all
    # the pyramid levels sharing that depthwise weight, hence one scale)
    muls = [n for n in eq.graph.node if n.name.endswith("/equalize/Mul")]
    assert len(muls) == info["inputs"]
    ranges = channel_ranges(eq, [m.output[0] for m in muls], feeds)
    for scale in {m.input[1] for m in muls}:
        r = np.max([ranges[m.output[0]] for m in muls if m.input[1] == scale], axis=0)
        live = r[r > r.max() / 100]
        assert live.max() / np.median(live) < 1.05, scale
    # and each rewritten separable pair's depthwise output is evener than before
    dw_out = [n.output[0] for n in candidate.graph.node if n.name == "/model/box_net/predict/conv_dw/Conv"]
    before, after = channel_ranges(candidate, dw_out, feeds)[dw_out[0]], channel_ranges(eq, dw_out, feeds)[dw_out[0]]
    assert after.max() / np.median(after) < before.max() / np.median(before) / 2  # alpha 0.5: about its root


def _one_conv(x_shape, w, name="/model/c/Conv"):
    from onnx import helper, numpy_helper
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name=name, pads=[0, 1, 1, 0] if w.shape[2] == 2 else [0] * 4,
                          strides=[2, 2] if w.shape[2] == 2 else [1, 1])],
        "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"] + list(x_shape[1:]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _qdq_error(model, amax, x):
    """Squared error of the Conv's output with its input and weights quantized by our Q/DQ (ONNX Runtime)."""
    import onnxruntime as ort
    from edet_deploy.precision.qdq import insert_qdq
    w = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    q, _ = insert_qdq(model, ["/model/c/Conv"], {"x": amax}, w)
    (y,) = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return float(((y - ref) ** 2).mean())


def test_refined_layer_matches_onnx_runtimes_qdq():
    """refine.py measures a layer in torch: with the input and weights quantized as our Q/DQ quantizes them,
    its output must be what ONNX Runtime computes for the Q/DQ graph (asymmetric pads and stride included)."""
    import onnxruntime as ort
    import torch
    from edet_deploy.precision.qdq import insert_qdq
    from edet_deploy.precision.refine import _Conv, _fake_quant

    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 4, 2, 2)).astype(np.float32)
    x = rng.laplace(size=(2, 4, 7, 7)).astype(np.float32)
    model = _one_conv(x.shape, w)
    amax = float(np.abs(x).max()) * 0.6
    q, _ = insert_qdq(model, ["/model/c/Conv"], {"x": amax}, {"w": w})
    (y,) = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    conv = _Conv(model.graph.node[0], {"w": w}, np.float32)  # an FP32 Q/DQ graph: float32 scales
    with torch.no_grad():
        ours = conv(_fake_quant(torch.from_numpy(x), amax, np.float32), True).numpy()
        ours_float = conv(torch.from_numpy(x), False).numpy()
    np.testing.assert_allclose(ours_float, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, y, rtol=1e-5, atol=1e-5)
    assert np.abs(y - ref).max() > 1e-3  # quantization did something


@pytest.mark.parametrize("case", ["laplace", "uniform"])
def test_refinement_tightens_only_where_the_layer_gains(case):
    """A Laplace input at its max |x|: rounding noise costs the layer more than clipping the rare large values
    would, so refinement clips harder, and ONNX Runtime's Q/DQ graph confirms that the layer's error fell. A
    uniform input at its max: clipping only loses, the threshold stays."""
    from edet_deploy.precision.refine import refine_thresholds

    rng = np.random.default_rng(7)
    w = rng.normal(size=(8, 16, 1, 1)).astype(np.float32)
    shape = (1, 16, 64, 64)
    draw = rng.laplace if case == "laplace" else lambda size: rng.uniform(-1, 1, size=size)
    feeds = [{"x": draw(size=shape).astype(np.float32)} for _ in range(4)]
    model = _one_conv(shape, w)
    amax = max(float(np.abs(f["x"]).max()) for f in feeds)
    refined, info = refine_thresholds(model, {"x": amax}, ["/model/c/Conv"], feeds)
    assert info["tensors"] == 1 and refined["x"] <= amax
    x = np.concatenate([f["x"] for f in feeds])
    if case == "laplace":
        assert refined["x"] < 0.9 * amax and info["tightened"] == 1
        assert _qdq_error(model, refined["x"], x) < 0.9 * _qdq_error(model, amax, x)
    else:
        assert refined["x"] == amax and info["tightened"] == 0


def test_refinement_weighs_the_heads_last_layers_by_class_confidence():
    """At the box head's last layer only the positions the class head is confident about become detections.
    Here the input is narrow and heavy-tailed (rounding noise dominates) where the class head is confident, and
    uniform over the whole range (clipping only loses) elsewhere: weighted by confidence the threshold is
    tightened; the same layer under another name (no weighting) keeps it for the background's sake."""
    from onnx import helper, numpy_helper

    from edet_deploy.precision.refine import refine_thresholds

    rng = np.random.default_rng(9)
    shape, a = (1, 8, 32, 32), 4.0

    def graph(box_name):
        g = helper.make_graph(
            [helper.make_node("Conv", ["x", "wb"], ["box"], name=box_name),
             helper.make_node("Conv", ["z", "wc"], ["logits"], name="/model/class_net/predict/conv_pw/Conv")],
            "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
                      helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 32, 32])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("box", "logits")],
            [numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(np.full((2, 1, 1, 1), 30, np.float32), "wc")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    feeds = []
    for _ in range(4):
        x = rng.uniform(-a, a, size=shape)
        x[..., :4] = np.clip(rng.laplace(scale=a / 15, size=shape[:3] + (4,)), -a, a)
        z = -np.ones((1, 1, 32, 32))
        z[..., :4] = 1  # confident in the first 4 columns only
        feeds.append({"x": x.astype(np.float32), "z": z.astype(np.float32)})
    amax = {"x": a, "z": 1.0}
    for box_name, weighted in (("/model/box_net/predict/conv_pw/Conv", True), ("/model/box_net/other/Conv", False)):
        model = graph(box_name)
        refined, _ = refine_thresholds(model, amax, [box_name, "/model/class_net/predict/conv_pw/Conv"], feeds)
        assert (refined["x"] < 0.9 * a) if weighted else (refined["x"] == a), (box_name, refined["x"])


def test_refined_separable_pair_matches_onnx_runtimes_qdq():
    """The depthwise -> pointwise pair refine.py measures (group conv, padding, bias, the middle tensor at its
    own threshold), against ONNX Runtime running the same pair with our Q/DQ."""
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper
    from edet_deploy.precision.qdq import insert_qdq
    from edet_deploy.precision.refine import _Conv, _fake_quant

    rng = np.random.default_rng(12)
    wd, wp = rng.normal(size=(4, 1, 3, 3)).astype(np.float32), rng.normal(size=(6, 4, 1, 1)).astype(np.float32)
    bp = rng.normal(size=6).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "wd"], ["m"], name="/model/dw/Conv", group=4, pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["m", "wp", "bp"], ["y"], name="/model/pw/Conv")],
        "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(wd, "wd"), numpy_helper.from_array(wp, "wp"), numpy_helper.from_array(bp, "bp")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.laplace(size=(1, 4, 9, 9)).astype(np.float32)
    amax = {"x": 2.5, "m": 4.0}
    q, _ = insert_qdq(model, ["/model/dw/Conv", "/model/pw/Conv"], amax, {"wd": wd, "wp": wp, "bp": bp})
    (y,) = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    inits = {"wd": wd, "wp": wp, "bp": bp}
    dw, pw = (_Conv(n, inits, np.float32) for n in model.graph.node)
    with torch.no_grad():
        m = dw(_fake_quant(torch.from_numpy(x), amax["x"], np.float32), True)
        ours = pw(_fake_quant(m, amax["m"], np.float32), True).numpy()
    np.testing.assert_allclose(ours, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))


def _run_on_a_terminal(argv, timeout=600):
    """`python -m edet_deploy ARGV` with stderr on a pseudo-terminal (as a user's shell gives it) and stdout on
    a pipe: returns (exit code, stdout, what the terminal showed)."""
    import os
    import pty
    import subprocess
    import sys
    import threading
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "edet_deploy", *argv], stdin=slave, stdout=subprocess.PIPE,
                            stderr=slave, cwd=Path(__file__).resolve().parents[1])
    os.close(slave)
    screen = bytearray()

    def read_terminal():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            screen.extend(chunk)
    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        reader.join(10)
        os.close(master)
    return proc.returncode, out.decode(), screen.decode(errors="replace")


def test_calibrate_shows_one_bar_over_every_phase_and_keeps_stdout_clean(fp32, shapes, tmp_path):
    code, out, screen = _run_on_a_terminal(["calibrate", str(fp32), "--data", str(shapes), "--num-images", "6",
                                            "--out", str(tmp_path / "t.onnx"), "--cache-dir", str(tmp_path / "c")])
    assert code == 0, screen[-2000:]
    # One bar (one description), naming each phase as it runs, up to its end.
    assert set(re.findall(r"calibrate d0 int8-entropy", screen)) == {"calibrate d0 int8-entropy"}
    for name in ("equalizing channels", "FP16 overflow check", "calibration: ranges", "calibration: histograms",
                 "calibration: entropy search", "refining thresholds", "writing the graph"):
        assert name in screen, name
    assert re.search(r"100%\|", screen), screen[-500:]
    # ONNX Runtime's own prints never reach stdout: only our report is there.
    assert "Collecting tensor data" not in out and "Finding optimal threshold" not in out
    assert out.splitlines()[0].startswith(f"wrote {tmp_path / 't.onnx'}")


def test_default_calibration_method_is_the_variants():
    """Unless asked, D-variants calibrate with entropy and Lite (bounded ReLU6 activations, where entropy lost 26
    points on the shapes Lite0 and minmax 0.04) with minmax; a stated method always wins."""
    from edet_deploy.configs import VARIANTS
    from edet_deploy.precision.int8 import Int8Options
    for name, cfg in VARIANTS.items():
        assert Int8Options().for_variant(name).method == ("minmax" if cfg.act == "relu6" else "entropy")
        assert Int8Options(method="percentile").for_variant(name).method == "percentile"


def test_calibration_cache_key_survives_a_re_export(fp32, tmp_path):
    """The calibration cache is keyed by the graph, not the model's metadata: the same weights exported again
    (a new export time in metadata_props) find their ranges; another graph does not."""
    from edet_deploy.precision.int8 import cache_key

    model = onnx.load(str(fp32), load_external_data=False)
    images = [Path(fp32)]  # any files: the key reads their bytes
    key = cache_key(model, images, "minmax", ["a", "b"], 8)
    again = onnx.ModelProto()
    again.CopyFrom(model)
    for prop in again.metadata_props:
        prop.value = prop.value.replace("T", "t")  # what a later export changes: its creation time among them
    again.metadata_props.add(key="exported_again", value="2099-01-01T00:00:00")
    assert cache_key(again, images, "minmax", ["a", "b"], 8) == key
    again.graph.node[0].name += "_changed"
    assert cache_key(again, images, "minmax", ["a", "b"], 8) != key
    assert cache_key(model, images, "entropy", ["a", "b"], 8) != key


@pytest.fixture(scope="module")
def clean_ranges(fp32, shapes, tmp_path_factory):
    """(candidate, images, ranges) of a clean min-max calibration on 4 images, without a cache."""
    from edet_deploy.io import load_onnx
    from edet_deploy.precision.int8 import calibrate, calibration_images
    candidate = strip_nms(load_onnx(fp32))[0]
    images = calibration_images(shapes, 4)
    amax, hit, cache = calibrate(candidate, images, "minmax", None, 256)
    assert not hit and cache is None and amax and all(v > 0 for v in amax.values())
    return candidate, images, amax


def test_calibration_cache_misses_when_an_image_changes_but_not_its_size(clean_ranges, tmp_path):
    """The reported case: calibration images overwritten by same-size black ones must not reuse the old ranges
    (the key read path and size only); the same bytes elsewhere still hit."""
    import shutil

    from PIL import Image

    from edet_deploy.precision.int8 import calibrate
    candidate, images, clean = clean_ranges
    copies = []
    for i, src in enumerate(images):  # BMP: the size depends only on the pixel count
        copies.append(tmp_path / "imgs" / f"{i}.bmp")
        copies[-1].parent.mkdir(exist_ok=True)
        Image.open(src).convert("RGB").save(copies[-1])
    cache_dir = tmp_path / "cache"
    first, hit, _ = calibrate(candidate, copies, "minmax", cache_dir, 256)
    assert not hit
    moved = [tmp_path / "moved" / p.name for p in copies]
    shutil.copytree(tmp_path / "imgs", tmp_path / "moved")
    assert calibrate(candidate, moved, "minmax", cache_dir, 256)[1]  # same contents: hit
    for p in copies:
        size = p.stat().st_size
        Image.new("RGB", Image.open(p).size).save(p)
        assert p.stat().st_size == size
    black, hit, _ = calibrate(candidate, copies, "minmax", cache_dir, 256)
    assert not hit and black != pytest.approx(first)


@pytest.mark.parametrize("content", [
    "",  # truncated (`: > file`)
    '{"method": "minmax", "amax": {',  # cut mid-write by an older, non-atomic writer
    "[1, 2]",
    '{"amax": [1, 2]}',
    '{"amax": {}}',  # every tensor's range missing
    "ZERO", "NEGATIVE", "NAN", "INFINITY", "TEXT", "TRUE",
], ids=["empty", "cut", "list", "amax-list", "amax-empty", "zero", "negative", "nan", "inf", "text", "bool"])
def test_unusable_calibration_cache_is_recalibrated_and_rewritten(clean_ranges, tmp_path, caplog, content):
    """A cache file that is not JSON, has another structure or holds ranges that are not finite numbers > 0 is a
    miss: one warning naming it, the ranges of a clean run, and the file rewritten so the next run hits."""
    from edet_deploy.precision.int8 import calibrate
    candidate, images, clean = clean_ranges
    amax, hit, cache = calibrate(candidate, images, "minmax", tmp_path, 256)
    assert not hit and json.loads(cache.read_text())["amax"] == pytest.approx(clean)
    bad = {"ZERO": 0, "NEGATIVE": -1.5, "NAN": "NaN", "INFINITY": "Infinity", "TEXT": '"3.5"', "TRUE": "true"}
    if content in bad:  # every range replaced (json.dumps writes NaN / Infinity, which json.loads reads back)
        content = '{"method": "minmax", "amax": {%s}}' % ", ".join(f'"{k}": {bad[content]}' for k in clean)
    cache.write_text(content)
    caplog.clear()
    with caplog.at_level("WARNING", logger="edet_deploy"):
        amax, hit, again = calibrate(candidate, images, "minmax", tmp_path, 256)
    assert not hit and again == cache and amax == pytest.approx(clean)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "recalibrating" in warnings[0], warnings
    assert json.loads(cache.read_text())["amax"] == pytest.approx(clean)  # rewritten whole
    assert not [p for p in tmp_path.iterdir() if p != cache]  # no temporary file left beside it
    amax, hit, _ = calibrate(candidate, images, "minmax", tmp_path, 256)
    assert hit and amax == pytest.approx(clean)


def test_calibrate_cli_recovers_from_a_truncated_cache(fp32, shapes, tmp_path, capsys):
    """The reported case: every cache file truncated, then `calibrate` again exits 0 with a graph whose ranges
    are a clean run's, instead of an internal error on every run."""
    import shutil

    from onnx import numpy_helper

    from edet_deploy.cli import main
    shutil.copytree(Path(fp32).parent, tmp_path / "g", ignore=shutil.ignore_patterns(".calibration_cache"))
    graph = tmp_path / "g" / Path(fp32).name
    argv = ["calibrate", str(graph), "--data", str(shapes), "--num-images", "4", "--method", "minmax", "--no-refine",
            "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "q1.onnx")]) == 0
    caches = list((graph.parent / ".calibration_cache").glob("*.json"))
    assert caches
    clean = {c: c.read_text() for c in caches}
    for c in caches:
        c.write_text("")
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "q2.onnx")]) == 0
    err = capsys.readouterr().err
    assert "internal error" not in err and all(str(c) in err for c in caches), err
    assert {c: c.read_text() for c in caches} == clean
    q1, q2 = onnx.load(str(tmp_path / "q1.onnx")), onnx.load(str(tmp_path / "q2.onnx"))
    scales = [{i.name: numpy_helper.to_array(i).tolist() for i in m.graph.initializer if i.name.endswith("_scale")}
              for m in (q1, q2)]
    assert scales[0] and scales[0] == scales[1]


def test_a_malformed_calibration_split_is_refused_not_skipped(tmp_path):
    """A calib split whose annotations are broken must not fall back to the train split in silence."""
    from edet_deploy.precision.int8 import calibration_images
    data = generate_shapes(tmp_path / "ds", {"train": 2, "calib": 2}, progress=False)
    assert len(calibration_images(data, 10)) == 2
    broken = json.loads((data / "instances_calib.json").read_text())
    broken["annotations"][0]["bbox"] = [1, 2]
    (data / "instances_calib.json").write_text(json.dumps(broken))
    with pytest.raises(EdetError, match="instances_calib.json: annotation 0: bbox"):
        calibration_images(data, 10)


def test_a_calibration_folder_takes_every_format_detect_reads(tmp_path):
    """A plain folder of WebP / TIFF / GIF images was 'no calibration images': it is searched for what `detect`
    decodes, other files left out."""
    from PIL import Image

    from edet_deploy.precision.int8 import calibration_images
    for i, ext in enumerate(("webp", "tif", "gif", "JPG")):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / f"{i}.{ext}")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in calibration_images(tmp_path, 10)] == ["0.webp", "1.tif", "2.gif", "3.JPG"]
