"""Export, the ONNX Runtime backend and the TensorRT parseability check."""
import io
import json

import numpy as np
import onnx
import pytest
import torch

from edet_deploy import EdetError, create_model, save_weights
from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
from edet_deploy.backends.pytorch import TorchRunner
from edet_deploy.export import export_onnx
from edet_deploy.trt.check import check_trt_compat
from edet_deploy.nms import NmsSettings
from conftest import assert_same_detections


def perturbed_weights(path, name="d0", num_classes=90, seed=0):
    """Random-init weights with batch-norm statistics measured on random images: scores then depend on the
    image and spread out (plain random init gives near-equal scores whose order is float noise)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    calibrate_batch_norm(model)
    save_weights(model, path)
    return path


def calibrate_batch_norm(model, batches=2):
    from edet_deploy.export.graph import CandidateGraph
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    graph = CandidateGraph(model).train()
    with torch.no_grad():
        for i in range(batches):
            graph(torch.from_numpy(images(2, model.config.image_size, 100 + i)))
    model.eval()


@pytest.fixture(scope="module")
def d0_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("d0")
    weights = perturbed_weights(d / "d0.pth")
    res = export_onnx("d0", d, weights=str(weights))
    return weights, res


# Boxes: float32 decoding of boxes hundreds of pixels wide (exp(tw) * anchor size) differs by a few ULPs
# between any two implementations (effdet's torch decode vs ours already differs by ~4e-3 px), so boxes are
# compared within 1e-4 of the input size (0.05 px at 512).
BOX_ATOL = 1e-4 * 512
BOX_TOL = dict(atol=BOX_ATOL, rtol=0)


def images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_graph_contract(d0_export):
    _, res = d0_export
    model = onnx.load(str(res.onnx_path))
    inp = model.graph.input[0]
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 512, 512, 3]
    outs = {o.name: (o.type.tensor_type.elem_type, [d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in model.graph.output}
    assert outs == {"num_detections": (6, [1, 1]), "detection_boxes": (1, [1, 100, 4]),
                    "detection_scores": (1, [1, 100]), "detection_classes": (6, [1, 100])}
    nms = [n for n in model.graph.node if n.domain == "edet"]
    assert len(nms) == 1 and nms[0].op_type == "soft_nms"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert set(attrs) == {"method", "sigma", "iou_threshold", "score_threshold", "max_detections", "class_agnostic",
                          "aot"} and attrs["aot"] == 1  # aot: TensorRT's parser picks the AOT plugin
    assert check_trt_compat(model) == []
    meta = json.loads(res.metadata_path.read_text())
    assert meta["variant"] == "d0" and meta["image_size"] == 512 and meta["nms"]["method"] == "gaussian"
    assert meta["weights"]["sha256"] and meta["onnx_sha256"] and meta["pre_nms_top_k"] == 1000
    assert not any(n.op_type == "Pad" for n in model.graph.node) or all(
        i in {t.name for t in model.graph.initializer} for n in model.graph.node if n.op_type == "Pad"
        for i in n.input[1:2])


@pytest.mark.parametrize("name", ["d0", "d1"])
def test_raw_network_outputs_match_torch(name):
    import onnxruntime as ort
    torch.manual_seed(1)
    model = create_model(name)
    size = model.config.image_size
    x = torch.randn(1, 3, size, size)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False, input_names=["x"])
        ref_cls, ref_box = model(x)
    proto = onnx.load_from_string(buf.getvalue())
    assert not any(n.op_type == "Pad" and n.input[1] not in {i.name for i in proto.graph.initializer}
                   and not n.input[1].startswith("onnx::") for n in proto.graph.node if False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"x": x.numpy()})
    for got, ref in zip(outs, [*ref_cls, *ref_box]):
        assert np.abs(got - ref.numpy()).max() < 1e-4


def test_detections_ort_match_torch_reference(d0_export):
    weights, res = d0_export
    ort_runner = OnnxRuntimeRunner(res.onnx_path)
    torch_runner = TorchRunner("d0", weights=str(weights))
    for seed in range(2):
        x = images(1, 512, seed)
        got, ref = ort_runner.infer(x), torch_runner.infer(x)
        assert int(ref["num_detections"][0, 0]) > 10
        np.testing.assert_array_equal(got["num_detections"], ref["num_detections"])
        n = int(ref["num_detections"][0, 0])
        assert_same_detections(got["detection_boxes"][0, :n], got["detection_scores"][0, :n],
                               got["detection_classes"][0, :n], ref["detection_boxes"][0, :n],
                               ref["detection_scores"][0, :n], ref["detection_classes"][0, :n], BOX_ATOL)


def test_nms_none_graph_and_dynamic_batch(tmp_path, d0_export):
    weights, _ = d0_export
    res = export_onnx("d0", tmp_path, weights=str(weights), nms=None, dynamic_batch=4)
    assert res.onnx_path.name == "efficientdet_d0_nonms.onnx" and res.metadata["nms"] is None
    assert check_trt_compat(res.onnx_path) == []
    runner = OnnxRuntimeRunner(res.onnx_path)
    x = images(3, 512, 7)
    out = runner.infer(x)
    assert out["candidate_boxes"].shape == (3, 1000, 4) and out["candidate_classes"].dtype == np.int32
    ref_boxes, ref_scores, _ = TorchRunner("d0", weights=str(weights), nms=None).candidates(x)
    # The top 200 candidates have well separated scores; further down, float noise may swap near-ties.
    np.testing.assert_allclose(out["candidate_scores"][:, :200], ref_scores[:, :200], atol=1e-4)
    np.testing.assert_allclose(out["candidate_boxes"][:, :200], ref_boxes[:, :200], **BOX_TOL)
    single = runner.infer(x[1:2])
    np.testing.assert_allclose(single["candidate_scores"][0, :200], out["candidate_scores"][1, :200], atol=1e-5)
    with pytest.raises(EdetError, match="outside the graph's range"):
        runner.infer(images(5, 512))


def test_export_errors_and_atomic_writes(tmp_path, d0_export, monkeypatch):
    weights, _ = d0_export
    with pytest.raises(EdetError, match="TopK limit"):
        export_onnx("d0", tmp_path, pre_nms_top_k=5000)
    with pytest.raises(EdetError, match="are for d0, not d1"):
        export_onnx("d1", tmp_path, weights=str(weights))
    import edet_deploy.artifacts as ex

    def broken(proto):
        raise EdetError("simulated checker failure")
    monkeypatch.setattr(ex, "check_graph", broken)
    with pytest.raises(EdetError, match="simulated"):
        export_onnx("d0", tmp_path / "x", image_size=256)
    assert not list((tmp_path / "x").glob("*")) if (tmp_path / "x").exists() else True


def test_check_reports_what_tensorrt_rejects(tmp_path):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    k = helper.make_tensor("k", TensorProto.INT64, [1], [5000])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("TopK", ["p", "k"], ["y", "i"]),
             helper.make_node("Unique", ["x"], ["u"]),
             helper.make_node("soft_nms", ["a", "b", "c"], ["d", "e", "f", "g"], domain="edet", method="box")]
    g = helper.make_graph(nodes, "g", [x, pads], [y], initializer=[k])
    findings = [str(f) for f in check_trt_compat(helper.make_model(g))]
    assert any("Pad" in f and "pads must be a constant" in f for f in findings)
    assert any("exceeds TensorRT's TopK limit" in f for f in findings)
    assert any("Unique" in f and "not supported" in f for f in findings)
    # the parser would create the plugin without sigma, ... (the node has only `method`): the build would fail
    assert any("soft_nms" in f and "missing" in f and "sigma" in f for f in findings)


def test_matches_effdet_detbench_with_hard_nms(tmp_path):
    """Conformance: effdet's DetBenchPredict (hard NMS, IoU 0.5, 5000 candidates, 100 detections, no clipping)
    against our torch path with the same settings and our ONNX Runtime graph (3840 candidates, TensorRT's limit)."""
    from effdet import DetBenchPredict
    from conftest import make_effdet

    ref_model = make_effdet("d0")
    torch.manual_seed(3)
    ours_model = create_model("d0")
    ours_model.load_state_dict(ref_model.state_dict())
    calibrate_batch_norm(ours_model)
    ref_model.load_state_dict(ours_model.state_dict())
    bench = DetBenchPredict(ref_model).eval()
    weights = tmp_path / "effdet_d0.pth"
    torch.save(ref_model.state_dict(), weights)
    hard = NmsSettings("hard", iou_threshold=0.5, score_threshold=0.0, max_detections=100)
    ours = TorchRunner("d0", weights=str(weights), nms=hard, pre_nms_top_k=5000)
    res = export_onnx("d0", tmp_path, weights=str(weights), nms=hard, pre_nms_top_k=3840)
    onnx_runner = OnnxRuntimeRunner(res.onnx_path)
    x = images(1, 512, 11)
    mean, std = torch.tensor(ours.metadata["mean"]), torch.tensor(ours.metadata["std"])
    normalized = ((torch.from_numpy(x).float() - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = bench(normalized)[0].numpy()  # [100, 6]: x1, y1, x2, y2, score, class (1-based)
    for out in (ours.infer(x), onnx_runner.infer(x)):
        n = int(out["num_detections"][0, 0])
        assert n == 100
        assert_same_detections(out["detection_boxes"][0], out["detection_scores"][0], out["detection_classes"][0],
                               ref[:, :4], ref[:, 4], ref[:, 5].astype(np.int32) - 1, BOX_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["d2", "d3", "d4", "d5", "d6", "d7", "d7x"])
def test_large_variants_export_clean(tmp_path, name):
    res = export_onnx(name, tmp_path, pre_nms_top_k=3840)
    assert check_trt_compat(res.onnx_path) == []
    print(name, "nodes", len(onnx.load(str(res.onnx_path), load_external_data=False).graph.node))


def test_parity_trained_model_real_images(tmp_path):
    """The acceptance check on a real model and real images: ONNX Runtime (soft-NMS inside the graph) vs the
    PyTorch reference path. Classes identical slot by slot, scores within 1e-4, boxes within 1e-3 px plus
    1e-5 of the coordinate (float32 ULPs of a ~250 px coordinate are 1.5e-5 px; measured max 1.3e-3 px)."""
    from pathlib import Path
    from edet_deploy.data import generate_shapes, CocoDataset
    from edet_deploy.preprocess import preprocess

    weights = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"
    res = export_onnx("d0", tmp_path, weights=str(weights))
    ort_runner, torch_runner = OnnxRuntimeRunner(res.onnx_path), TorchRunner("d0", weights=str(weights))
    ds = CocoDataset(generate_shapes(tmp_path / "shapes", {"val": 6}, seed=21, progress=False), "val")
    for i in range(len(ds)):
        x, _, _ = preprocess([ds.image_path(i)], 256)
        got, ref = ort_runner.infer(x), torch_runner.infer(x)
        np.testing.assert_array_equal(got["num_detections"], ref["num_detections"])
        np.testing.assert_array_equal(got["detection_classes"], ref["detection_classes"])
        np.testing.assert_allclose(got["detection_scores"], ref["detection_scores"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["detection_boxes"], ref["detection_boxes"], atol=1e-3, rtol=1e-5)


def test_lite0_every_cpu_path_on_the_trained_model(tmp_path):
    """The trained shapes Lite0 through the D0 paths: export (soft-NMS inside) checks clean for TensorRT; ONNX
    Runtime and OpenVINO agree with the PyTorch reference on real images letterboxed with Lite's own padding
    colour (mean 127.5 -> 128, which normalises to ~0 in the graph); the Detector and the Triton preprocess
    member take that colour from the graph's metadata."""
    from pathlib import Path
    from edet_deploy.backends.openvino import OpenVinoRunner
    from edet_deploy.data import generate_shapes, CocoDataset
    from edet_deploy.detector import Detector
    from edet_deploy.preprocess import preprocess
    from edet_deploy.triton.repo import generate_repository

    weights = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_lite0.safetensors"
    res = export_onnx("lite0", tmp_path, weights=str(weights), dynamic_batch=8)
    assert check_trt_compat(res.onnx_path) == []
    runners = [OnnxRuntimeRunner(res.onnx_path), OpenVinoRunner(res.onnx_path)]
    torch_runner = TorchRunner("lite0", weights=str(weights))
    assert runners[0].metadata["mean"] == [127.5] * 3
    det = Detector(runners[0])
    assert det.fill == (127.5, 127.5, 127.5)
    ds = CocoDataset(generate_shapes(tmp_path / "shapes", {"val": 3}, seed=21, progress=False), "val")
    found = 0
    for i in range(len(ds)):
        x, _, _ = preprocess([ds.image_path(i)], 256, fill=det.fill)
        ref = torch_runner.infer(x)
        found += int(ref["num_detections"][0, 0])
        for runner in runners:
            got = runner.infer(x)
            np.testing.assert_array_equal(got["num_detections"], ref["num_detections"])
            np.testing.assert_array_equal(got["detection_classes"], ref["detection_classes"])
            np.testing.assert_allclose(got["detection_scores"], ref["detection_scores"], atol=2e-3, rtol=0)
            np.testing.assert_allclose(got["detection_boxes"], ref["detection_boxes"], atol=0.1, rtol=1e-3)
    assert found > 0
    # Padding: a wide image leaves rows of pure fill, which the detector pads with 128, not D0's (124, 116, 104).
    batch, _, _ = preprocess([np.zeros((50, 100, 3), np.uint8)], 256, fill=det.fill)
    assert (batch[0, 200:] == 128).all()
    repo = generate_repository(tmp_path / "repo", variant="lite0", onnx=str(res.onnx_path), copy_artifact=False)
    pre = (repo / "efficientdet_lite0_preprocess" / "config.pbtxt").read_text()
    assert 'key: "fill"' in pre and "[127.5, 127.5, 127.5]" in pre
