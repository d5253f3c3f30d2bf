"""Graph + sidecar pairs: verified on every read, never left disagreeing by an interrupted write."""
import json

import onnx
import pytest
from onnx import TensorProto, helper

from edet_deploy import EdetError
from edet_deploy.export import onnx_export
from edet_deploy.metadata import FORMAT, read_metadata, sidecar_path


def tiny_graph(scale: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [scale])
    g = helper.make_graph([helper.make_node("Mul", ["images", "c"], ["y"])], "g", [x], [y], [c])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def meta(tag: str) -> dict:
    return {"format": FORMAT, "variant": "d0", "tag": tag, "class_names": ["a", "b"]}


def test_interrupted_export_never_leaves_a_disagreeing_pair(tmp_path, monkeypatch):
    path = tmp_path / "g.onnx"
    onnx_export.save_graph(tiny_graph(1.0), path, meta("first"))
    assert read_metadata(path)["tag"] == "first"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt  # the process stops between the graph and its sidecar

    monkeypatch.setattr(onnx_export, "write_metadata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.save_graph(tiny_graph(2.0), path, meta("second"))
    assert not sidecar_path(path).exists()  # the first export's sidecar is gone, not beside the new graph
    got = read_metadata(path)  # falls back to the copy inside the new graph: it describes that graph
    assert got["tag"] == "second"
    assert onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])[0] == 2.0


def test_graph_swapped_under_its_sidecar_is_refused(tmp_path):
    a, b = tmp_path / "a" / "g.onnx", tmp_path / "b" / "g.onnx"
    onnx_export.save_graph(tiny_graph(1.0), a, meta("a"))
    onnx_export.save_graph(tiny_graph(3.0), b, meta("a"))
    a.write_bytes(b.read_bytes())
    with pytest.raises(EdetError, match="does not match its metadata"):
        read_metadata(a)
    assert read_metadata(a, verify=False)["tag"] == "a"


def test_edited_sidecar_is_refused(tmp_path):
    path = tmp_path / "g.onnx"
    onnx_export.save_graph(tiny_graph(1.0), path, meta("a"))
    side = json.loads(sidecar_path(path).read_text())
    side["class_names"] = ["b", "a"]  # swapped labels, checksum untouched
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(EdetError, match="disagrees .*class_names"):
        read_metadata(path)


def test_repository_generator_owns_what_it_writes(tmp_path):
    pytest.importorskip("tritonclient")
    from edet_deploy.triton.repo import generate_repository, verify_served_repository

    graph = tmp_path / "g.onnx"
    onnx_export.save_graph(tiny_graph(1.0), graph, dict(meta("x"), image_size=64, nms={"max_detections": 10},
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
