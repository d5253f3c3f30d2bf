"""The OpenVINO backend against ONNX Runtime (the reference runner of the exact TensorRT graph): same
detections on the bundled model and real images, soft-NMS settings read from the graph's node, thread count
and compiled-model cache honoured, user errors as EdetError."""
import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("openvino")

from edet_deploy import EdetError  # noqa: E402
from edet_deploy.backends import create_runner  # noqa: E402
from edet_deploy.backends.onnxrt import OnnxRuntimeRunner  # noqa: E402
from edet_deploy.backends import openvino as ov_backend  # noqa: E402
from edet_deploy.backends.openvino import OpenVinoRunner, cpu_has_bf16, cut_at_nms  # noqa: E402
from edet_deploy.box_ops import box_iou  # noqa: E402
from edet_deploy.cli import main  # noqa: E402
from edet_deploy.data import CocoDataset, generate_shapes  # noqa: E402
from edet_deploy.detector import Detector  # noqa: E402
from edet_deploy.eval import evaluate  # noqa: E402
from edet_deploy.export import export_onnx  # noqa: E402
from edet_deploy.metadata import read_artifact_metadata, write_metadata  # noqa: E402
from edet_deploy.nms import NmsSettings  # noqa: E402
from edet_deploy.nms import op as nms_op  # noqa: E402
from edet_deploy.preprocess import preprocess  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"
# Measured on the bundled model, 12 shapes images (Xeon, AVX-512): scores differ by at most 1e-6, boxes by at
# most 7.3e-4 px (box decoding exp(tw) * anchor amplifies the last bits of the regression output). Tolerances
# leave room for other CPUs' kernels while staying far below anything visible (1/500 px, 1e-5 score).
SCORE_ATOL = 1e-5
BOX_ATOL = 2e-3


@pytest.fixture(scope="module")
def graph(bundled_d0):
    return bundled_d0


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), {"val": 8}, seed=21, progress=False)


@pytest.fixture(scope="module")
def scenes(shapes_dir):
    ds = CocoDataset(shapes_dir, "val")
    return [ds.image_path(i) for i in range(len(ds))]


def assert_identical_detections(got, ref):
    np.testing.assert_array_equal(got["num_detections"], ref["num_detections"])
    np.testing.assert_array_equal(got["detection_classes"], ref["detection_classes"])  # slot by slot
    np.testing.assert_allclose(got["detection_scores"], ref["detection_scores"], atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(got["detection_boxes"], ref["detection_boxes"], atol=BOX_ATOL, rtol=0)


def test_parity_with_onnxruntime_real_images(graph, scenes, tmp_path):
    """The acceptance check: bundled model, generated scenes, one image at a time and as a batch of 3."""
    ov = OpenVinoRunner(graph, cache_dir=tmp_path / "cache")
    ort = OnnxRuntimeRunner(graph)
    assert ov.nms.to_dict() == pytest.approx(NmsSettings().to_dict())  # read from the node (float32 attributes)
    for path in scenes:
        x, _, _ = preprocess([path], 256)
        got, ref = ov.infer(x), ort.infer(x)
        assert int(ref["num_detections"][0, 0]) > 0 and ref["detection_scores"][0, 0] > 0.5  # a real scene
        assert_identical_detections(got, ref)
    x, _, _ = preprocess(scenes[:3], 256)
    assert_identical_detections(ov.infer(x), ort.infer(x))  # batch 3: the bounded-dynamic model
    assert ov.static_batches == [1]


def test_every_batch_size_is_compiled_at_load(graph, scenes):
    """No compilation inside a request: all sizes 1..max are ready when the runner is, and running each of them
    (in an order no warm-up follows) makes no compile_model call."""
    ov = OpenVinoRunner(graph, cache_dir=False)
    assert ov.max_batch == 4 and ov.compiled_batches == [1, 2, 3, 4]
    assert ov.compile_count == 2  # batch 1 static + one model for 2..4
    x, _, _ = preprocess(scenes[:4], 256)
    single = [ov.infer(x[i:i + 1]) for i in range(4)]
    for b in (3, 1, 4, 2):
        got = ov.infer(x[:b])
        for i in range(b):  # each image's detections do not depend on the batch it ran in
            np.testing.assert_array_equal(got["num_detections"][i], single[i]["num_detections"][0])
            np.testing.assert_allclose(got["detection_scores"][i], single[i]["detection_scores"][0], atol=SCORE_ATOL)
    assert ov.compile_count == 2


def _with_nms(graph: Path, out: Path, **attrs) -> Path:
    """The same graph with other soft-NMS attributes on its node (the metadata's NMS settings left as they
    were: the node is what both runtimes must read), saved with a matching checksum."""
    proto = onnx.load(str(graph))
    node = next(n for n in proto.graph.node if n.domain == nms_op.DOMAIN)
    settings = NmsSettings(**{**nms_op.settings_from_node(node).to_dict(), **attrs})
    del node.attribute[:]
    node.attribute.extend(nms_op.make_node(settings).attribute)
    from edet_deploy.export.onnx_export import save_graph
    return save_graph(proto, out, read_artifact_metadata(graph)).onnx_path


@pytest.mark.parametrize("attrs", [dict(method="hard", iou_threshold=0.5, max_detections=7),
                                   dict(method="linear", score_threshold=0.2, class_agnostic=True)])
def test_nms_settings_come_from_the_node(graph, scenes, tmp_path, attrs):
    path = _with_nms(graph, tmp_path / "g.onnx", **attrs)
    ov = OpenVinoRunner(path, cache_dir=False)
    assert all(getattr(ov.nms, k) == pytest.approx(v) for k, v in attrs.items())
    x, _, _ = preprocess(scenes[:2], 256)
    got, ref = ov.infer(x), OnnxRuntimeRunner(path).infer(x)
    assert_identical_detections(got, ref)
    k = attrs.get("max_detections", 100)
    assert got["detection_scores"].shape == (2, k)
    if "score_threshold" in attrs:
        n = got["num_detections"][:, 0]
        assert all((got["detection_scores"][i, :n[i]] >= 0.2).all() for i in range(2))


def test_nms_none_graph_gives_the_candidates(tmp_path, scenes):
    res = export_onnx("d0", tmp_path, weights=str(WEIGHTS), nms=None)
    ov = OpenVinoRunner(res.onnx_path, cache_dir=False)
    assert ov.nms is None
    x, _, _ = preprocess(scenes[:1], 256)
    got, ref = ov.infer(x), OnnxRuntimeRunner(res.onnx_path).infer(x)
    assert set(got) == set(ref) == {"candidate_boxes", "candidate_scores", "candidate_classes"}
    np.testing.assert_allclose(got["candidate_scores"], ref["candidate_scores"], atol=SCORE_ATOL, rtol=0)
    top = ref["candidate_scores"][0] > 0.05  # below, near-equal scores may swap places; above they are distinct
    np.testing.assert_array_equal(got["candidate_classes"][0][top], ref["candidate_classes"][0][top])
    np.testing.assert_allclose(got["candidate_boxes"][0][top], ref["candidate_boxes"][0][top], atol=BOX_ATOL)


def test_cut_keeps_only_the_candidate_graph(graph):
    proto = onnx.load(str(graph))
    cut, settings, names = cut_at_nms(proto)
    assert names == list(nms_op.INPUTS) and settings.method == "gaussian"
    assert [o.name for o in cut.graph.output] == names
    assert not any(n.domain == nms_op.DOMAIN for n in cut.graph.node)
    assert not any(o.domain == nms_op.DOMAIN for o in cut.opset_import)
    assert any(n.domain == nms_op.DOMAIN for n in proto.graph.node)  # the loaded graph itself is untouched
    onnx.checker.check_model(cut, full_check=True)


def test_threads_hint_and_cache_dir(graph, tmp_path):
    cache = tmp_path / "ovcache"
    first = OpenVinoRunner(graph, threads=1, cache_dir=cache)
    assert first.property("INFERENCE_NUM_THREADS") == 1
    assert str(first.property("PERFORMANCE_HINT")) in ("LATENCY", "PerformanceMode.LATENCY")
    assert first.property("LOADED_FROM_CACHE") is False
    assert list(cache.glob("*.blob"))
    second = OpenVinoRunner(graph, threads=1, cache_dir=cache)
    assert second.property("LOADED_FROM_CACHE") is True
    third = create_runner("openvino", onnx_path=str(graph), threads=2, cache_dir=False, hint="THROUGHPUT")
    assert third.property("INFERENCE_NUM_THREADS") == 2 and third.property("LOADED_FROM_CACHE") is False
    assert first.load_ms > 0


def test_user_errors(graph, tmp_path):
    with pytest.raises(EdetError, match="not found"):
        OpenVinoRunner(tmp_path / "missing.onnx")
    with pytest.raises(EdetError, match="hint"):
        OpenVinoRunner(graph, hint="FASTEST")
    with pytest.raises(EdetError, match="needs an ONNX graph"):
        create_runner("openvino")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    write_metadata(bad, read_artifact_metadata(graph))
    with pytest.raises(EdetError, match="cannot read|does not match its metadata"):
        OpenVinoRunner(bad)
    ov = OpenVinoRunner(graph, cache_dir=False)
    with pytest.raises(EdetError, match="expected uint8"):
        ov.infer(np.zeros((1, 128, 128, 3), np.uint8))
    with pytest.raises(EdetError, match="outside"):
        ov.infer(np.zeros((5, 256, 256, 3), np.uint8))


def test_cli_detect_and_eval_with_openvino(graph, scenes, shapes_dir, tmp_path, capsys):
    outs = {}
    for backend in ("openvino", "onnxruntime"):  # parity: OpenVINO in f32, by name
        dst = tmp_path / f"{backend}.json"
        assert main(["detect", *map(str, scenes[:2]), "--onnx", str(graph), "--backend", backend, "--f32",
                     "--min-score", "0.3", "--json", str(dst)]) == 0
        outs[backend] = json.loads(dst.read_text())
    capsys.readouterr()
    for a, b in zip(outs["openvino"], outs["onnxruntime"]):
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        np.testing.assert_allclose([d["box"] for d in a["detections"]], [d["box"] for d in b["detections"]],
                                   atol=0.01)
    assert main(["detect", str(scenes[0]), "--onnx", str(graph), "--backend", "torch"]) == 2
    assert "--onnx runs on the" in capsys.readouterr().err
    stats = {}
    for backend in ("openvino", "onnxruntime"):
        dst = tmp_path / f"eval_{backend}.json"
        assert main(["eval", "--onnx", str(graph), "--backend", backend, "--f32", "--data", str(shapes_dir),
                     "--report", str(dst)]) == 0
        stats[backend] = json.loads(dst.read_text())["stats"]
    assert stats["onnxruntime"]["AP"] > 0.5  # the bundled model on real scenes
    assert stats["openvino"] == pytest.approx(stats["onnxruntime"], abs=1e-4)


def test_precision_is_pinned_whatever_the_cpu(graph):
    """OpenVINO runs FP32 graphs in bf16 by default on CPUs with bf16 instructions; ours runs f32 unless told,
    so parity and every FP32 number mean f32 on every machine."""
    assert OpenVinoRunner(graph, cache_dir=False).property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    with pytest.raises(EdetError, match="inference precision"):
        OpenVinoRunner(graph, inference_precision="fp8")


def test_default_precision_follows_the_cpu(graph, scenes, tmp_path, capsys, monkeypatch):
    """detect / eval run OpenVINO in bf16 where the CPU has bf16 instructions (f32 elsewhere), say so once with
    the CPU's name, and --f32 gives back the f32 reference."""
    from edet_deploy.measure import cpu_name
    want = "bf16" if cpu_has_bf16() else "f32"
    used = []
    real = ov_backend.OpenVinoRunner.__init__

    @functools.wraps(real)  # create_runner checks the options against the signature
    def spy(self, *a, **kw):
        real(self, *a, **kw)
        used.append(self.property("INFERENCE_PRECISION_HINT").get_type_name())
    monkeypatch.setattr(ov_backend.OpenVinoRunner, "__init__", spy)
    for flags, expected in (([], want), (["--f32"], "f32")):
        assert main(["detect", str(scenes[0]), "--onnx", str(graph), *flags, "--json", str(tmp_path / "d.json")]) == 0
        err = capsys.readouterr().err
        assert used.pop() == expected
        notes = [line for line in err.splitlines() if "OpenVINO runs the network in" in line]
        assert len(notes) == 1 and f"in {expected} (" in notes[0] and cpu_name() in notes[0], err
    assert main(["detect", str(scenes[0]), "--onnx", str(graph), "--backend", "onnxruntime", "--bf16"]) == 2
    assert main(["detect", str(scenes[0]), "--onnx", str(graph), "--f32", "--bf16"]) == 2
    capsys.readouterr()
    monkeypatch.undo()
    assert OpenVinoRunner(graph, cache_dir=False, inference_precision=None).property(
        "INFERENCE_PRECISION_HINT").get_type_name() == want
    assert OpenVinoRunner(graph, cache_dir=False).property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"


def test_bf16_needs_the_instructions(graph, monkeypatch):
    monkeypatch.setattr(ov_backend, "cpu_has_bf16", lambda core=None: False)
    with pytest.raises(EdetError, match="bf16 instructions"):
        OpenVinoRunner(graph, inference_precision="bf16", cache_dir=False)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions (AVX512_BF16 or AMX)")
def test_bf16_keeps_accuracy(graph, tmp_path_factory):
    """bf16 is not bit-exact, so it is held to the accuracy it keeps: COCO mAP on 120 generated scenes within
    0.5 points of ONNX Runtime FP32 (measured on the 300-image val split: 0.7538 vs 0.7535), and the confident
    detections the same objects."""
    data = generate_shapes(tmp_path_factory.mktemp("shapes120"), {"val": 120}, seed=5, progress=False)
    val = CocoDataset(data, "val")
    bf16 = Detector.from_onnx(graph, backend="openvino", bf16=True)
    assert bf16.runner.property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    ref = Detector.from_onnx(graph, backend="onnxruntime")
    got_ap = evaluate(bf16, val, progress=False)["stats"]["AP"]
    ref_ap = evaluate(ref, val, progress=False)["stats"]["AP"]
    assert ref_ap > 0.5 and abs(got_ap - ref_ap) <= 0.005, (got_ap, ref_ap)
    images = [val.image_path(i) for i in range(8)]
    matched = 0
    for got, want in zip(bf16.detect(images), ref.detect(images)):
        iou = box_iou(want.boxes, got.boxes) * (want.classes[:, None] == got.classes[None, :])
        confident = want.scores > 0.5
        assert (iou[confident].max(axis=1, initial=0) > 0.9).all()  # each confident object found again
        matched += int(confident.sum())
    assert matched >= 8


def test_cli_bf16_flag(graph, scenes, capsys):
    assert main(["detect", str(scenes[0]), "--onnx", str(graph), "--backend", "onnxruntime", "--bf16"]) == 2
    assert "--bf16 runs on the openvino backend" in capsys.readouterr().err
    assert main(["detect", str(scenes[0]), "--engine", str(graph), "--bf16"]) == 2  # not ignored beside --engine
    assert "--bf16 runs on the openvino backend, not tensorrt" in capsys.readouterr().err
    if cpu_has_bf16():
        assert main(["detect", str(scenes[0]), "--onnx", str(graph), "--bf16", "--json", "-"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["detections"]
