"""Graph + sidecar pairs: verified on every read, never left disagreeing by an interrupted write."""
import json
from dataclasses import replace

import onnx
import pytest
from onnx import TensorProto, helper

from edet_deploy import EdetError
from edet_deploy import artifacts
from edet_deploy.io import sha256_file
from edet_deploy.metadata import (FORMAT, ArtifactMetadata, build_metadata, read_artifact_metadata, read_metadata,
                                  sidecar_path)
from edet_deploy.nms import NmsSettings


def tiny_graph(scale: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [scale])
    g = helper.make_graph([helper.make_node("Mul", ["images", "c"], ["y"])], "g", [x], [y], [c])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def meta(tag: str, **fields) -> ArtifactMetadata:
    """A tiny graph's metadata; `tag` (a key this version does not know) tells exports apart."""
    base = build_metadata(variant="d0", image_size=64, num_classes=2, class_names=["a", "b"], mean=[0.5] * 3,
                          std=[0.25] * 3, opset=17, batch=1, dynamic_batch=None, outputs=["y"], nms=None,
                          pre_nms_top_k=10, weights=None)
    return replace(base, extra={"tag": tag}, **fields)


def test_interrupted_export_never_leaves_a_disagreeing_pair(tmp_path, monkeypatch):
    path = tmp_path / "g.onnx"
    artifacts.save_graph(tiny_graph(1.0), path, meta("first"))
    assert read_metadata(path)["tag"] == "first"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt  # the process stops between the graph and its sidecar

    monkeypatch.setattr(artifacts, "write_metadata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_graph(tiny_graph(2.0), path, meta("second"))
    assert not sidecar_path(path).exists()  # the first export's sidecar is gone, not beside the new graph
    got = read_metadata(path)  # falls back to the copy inside the new graph: it describes that graph
    assert got["tag"] == "second"
    assert onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])[0] == 2.0


def test_graph_swapped_under_its_sidecar_is_refused(tmp_path):
    a, b = tmp_path / "a" / "g.onnx", tmp_path / "b" / "g.onnx"
    artifacts.save_graph(tiny_graph(1.0), a, meta("a"))
    artifacts.save_graph(tiny_graph(3.0), b, meta("a"))
    a.write_bytes(b.read_bytes())
    with pytest.raises(EdetError, match="does not match its metadata"):
        read_metadata(a)
    assert read_metadata(a, verify=False)["tag"] == "a"


def test_edited_sidecar_is_refused(tmp_path):
    path = tmp_path / "g.onnx"
    artifacts.save_graph(tiny_graph(1.0), path, meta("a"))
    side = json.loads(sidecar_path(path).read_text())
    side["class_names"] = ["b", "a"]  # swapped labels, checksum untouched
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(EdetError, match="disagrees .*class_names"):
        read_metadata(path)


@pytest.mark.parametrize("checksum", [None, "drop", 7])
def test_sidecar_without_its_checksum_is_refused(tmp_path, checksum):
    """Deleting (or nulling) the checksum must not switch the checks off: the edited labels are refused."""
    path = tmp_path / "g.onnx"
    artifacts.save_graph(tiny_graph(1.0), path, meta("a"))
    side = json.loads(sidecar_path(path).read_text())
    side["class_names"] = ["dog", "cat"]
    if checksum == "drop":
        del side["onnx_sha256"]
    else:
        side["onnx_sha256"] = checksum
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(EdetError, match="has no onnx_sha256 for g.onnx"):
        read_metadata(path)


def test_graph_path_that_is_its_own_sidecar_is_refused(tmp_path):
    with pytest.raises(EdetError, match="metadata"):
        artifacts.save_graph(tiny_graph(1.0), tmp_path / "g.json", meta("a"))
    assert list(tmp_path.iterdir()) == []


def test_repository_generator_owns_what_it_writes(tmp_path):
    pytest.importorskip("tritonclient")
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.verify import verify_served_repository

    graph = tmp_path / "g.onnx"
    artifacts.save_graph(tiny_graph(1.0), graph, meta("x", nms={"max_detections": 10},
                                                        batch={"dynamic": True, "max": 8}))
    out = tmp_path / "repo"
    (out).mkdir()
    (out / "README.md").write_text("notes beside the models are not served")
    generate_repository(out, variant="d0", onnx=str(graph))
    generate_repository(out, variant="d0", onnx=str(graph))  # regenerating our own repository is fine
    verify_served_repository(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.onnx", "repo"]  # nothing outside --out
    shim = out / "efficientdet_d0_preprocess" / "1" / "model.py"
    shim.write_text(shim.read_text() + "import os; os.system('id')\n")
    with pytest.raises(EdetError, match="not our shim"):
        verify_served_repository(out)
    with pytest.raises(EdetError, match="did not generate"):
        generate_repository(out, variant="d0", onnx=str(graph))
    generate_repository(out, variant="d0", onnx=str(graph), force=True)  # told to: overwrites the shim
    verify_served_repository(out)
    (out / "other" / "1").mkdir(parents=True)
    (out / "other" / "config.pbtxt").write_text('name: "other"\n')
    with pytest.raises(EdetError, match="other/"):
        verify_served_repository(out)
    verify_served_repository(out, force=True)
    engine = out / "efficientdet_d0_engine" / "1" / "model.onnx"
    engine.write_bytes(tiny_graph(5.0).SerializeToString())
    with pytest.raises(EdetError, match="does not match"):
        verify_served_repository(out, force=True)  # checksums are checked even when forced


def _old_export_dict(weights, created, producer):
    """The sidecar as the exporter spelled it out before ArtifactMetadata (the same inputs as _typed_export)."""
    return {
        "format": FORMAT, "producer": producer, "created": created, "variant": "d0", "image_size": 256,
        "num_classes": 3, "class_names": ["circle", "square", "triangle"], "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "precision": "fp32", "opset": 17,
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", 256, 256, 3]},
        "batch": {"dynamic": True, "max": 4}, "outputs": ["num_detections", "detection_boxes", "detection_scores",
                                                          "detection_classes"],
        "nms": NmsSettings().to_dict(), "pre_nms_top_k": 1000,
        "weights": {"path": str(weights), "sha256": sha256_file(weights)},
    }


def _typed_export(weights):
    return build_metadata(variant="d0", image_size=256, num_classes=3, class_names=("circle", "square", "triangle"),
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), opset=17, batch=1,
                          dynamic_batch=4, outputs=("num_detections", "detection_boxes", "detection_scores",
                                                    "detection_classes"),
                          nms=NmsSettings(), pre_nms_top_k=1000, weights=weights)


def _same_json(typed: ArtifactMetadata, old: dict) -> None:
    """Byte-compatible: the same keys in the same order with the same values, as written to disk."""
    assert json.dumps(typed.to_dict(), indent=2) == json.dumps(old, indent=2)
    assert ArtifactMetadata.from_dict(old) == typed  # and the JSON reads back to the same metadata


def test_typed_metadata_writes_what_the_dicts_wrote(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    typed = _typed_export(weights)
    export = _old_export_dict(weights, typed.created, typed.producer)
    _same_json(typed, export)
    assert typed.producer.startswith("edet-deploy ") and typed.to_dict()["class_names"] == ["circle", "square",
                                                                                           "triangle"]
    fp32 = dict(export, onnx_sha256="a" * 64)  # save_graph's sidecar
    _same_json(replace(typed, onnx_sha256="a" * 64), fp32)
    # convert (INT8; FP16 is the same without `int8`), then save_graph drops the stale checksum and adds its own
    source, info, census = {"onnx": "g.onnx", "sha256": "a" * 64}, {"method": "entropy", "images": 8}, {"fp16": 1.0}
    old = dict(fp32, precision="int8", source=source, int8=info, fp16={"kept_fp32": ["n"]}, census=census)
    old["outputs"] = ["num_detections"]
    old = dict({k: v for k, v in old.items() if k != "onnx_sha256"}, onnx_sha256="b" * 64)
    int8 = replace(typed, onnx_sha256="a" * 64, precision="int8", source=source, int8=info,
                   fp16={"kept_fp32": ["n"]}, census=census, outputs=("num_detections",))
    int8 = replace(replace(int8, onnx_sha256=None), onnx_sha256="b" * 64)
    _same_json(int8, old)
    # the TensorRT builder's sidecar: its own section, the profile's batch, the plan's checksum
    trt = {"version": "11.4.0", "gpu": "H100", "batch_profile": [1, 2, 4], "onnx_sha256": "b" * 64}
    _same_json(replace(int8, tensorrt=trt, batch={"dynamic": True, "max": 4, "min": 1}, plan_sha256="c" * 64),
               dict(old, tensorrt=trt, batch={"dynamic": True, "max": 4, "min": 1}, plan_sha256="c" * 64))


def test_typed_metadata_keeps_unknown_keys_and_names_missing_ones(tmp_path):
    path = tmp_path / "g.onnx"
    artifacts.save_graph(tiny_graph(1.0), path, meta("kept"))
    typed = read_artifact_metadata(path)
    assert typed.extra == {"tag": "kept"} and typed.class_names == ("a", "b") and typed.onnx_sha256
    assert typed.to_dict() == read_metadata(path)
    with pytest.raises(EdetError, match="metadata lacks image_size, opset"):
        ArtifactMetadata.from_dict({k: v for k, v in typed.to_dict().items() if k not in ("image_size", "opset")})


def test_converted_graphs_are_named_by_the_contract(tmp_path):
    from edet_deploy.precision.convert import _twin_path

    typed = meta("x")
    assert _twin_path(tmp_path / "efficientdet_d0.onnx", typed, "fp16", True).name == "efficientdet_d0.fp16.onnx"
    assert _twin_path(tmp_path / "efficientdet_d0_nonms.onnx", typed, "int8-minmax", False).name == \
        "efficientdet_d0_nonms.int8-minmax.onnx"
    assert _twin_path(tmp_path / "mine.onnx", typed, "int8-entropy", True) == tmp_path / "mine.int8-entropy.onnx"
