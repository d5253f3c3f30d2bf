"""Day-one edges of the CLI that need no exported graph: `check` on a graph that is not ours, `detect --draw`
targets refused before any work, report names that keep two graphs apart, and the bundled weights loading
with their own class count."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edet_deploy.cli import main

BUNDLED = Path(__file__).resolve().parent.parent / "edet_deploy" / "assets" / "shapes_d0.safetensors"


def test_check_says_when_a_graph_is_not_ours(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [y])),
              str(path))
    onnx.checker.check_model(str(path), full_check=True)
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{path}: nothing TensorRT would reject, but not an edet-deploy detection graph"
    assert any(ln.startswith("not an edet-deploy detection graph: it carries no edet-deploy metadata") for ln in out)
    # A JSON sidecar alone does not make it ours: the graph's input is not the contract's.
    path.with_suffix(".json").write_text("{}")
    assert main(["check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["edet_graph"] is False and "'images'" in report["not_ours"]


@pytest.mark.parametrize("draw,match", [
    ("missing/dir/out.png", "is not an existing directory"),
    ("out.txt", r"\.txt is not an image format"),
    ("no_such_dir", "no such directory"),
])
def test_detect_draw_target_refused_before_any_work(tmp_path, capsys, monkeypatch, draw, match):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.jpg")
    before = sorted(p.name for p in tmp_path.iterdir())
    # The graph does not exist: the draw target is checked first, so that is not what is reported.
    assert main(["detect", "a.jpg", "--onnx", "nowhere.onnx", "--draw", draw]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draw" in err[0], err
    assert __import__("re").search(match, err[0]), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_eval_report_names_keep_graphs_apart():
    import argparse

    from edet_deploy.cli_args import SourceArgs
    names = {SourceArgs.slug(argparse.Namespace(engine=None, onnx=o, model="d0", weights=None))
             for o in ("g/efficientdet_d0.onnx", "g/efficientdet_d0.int8-entropy.onnx")}
    names.add(SourceArgs.slug(argparse.Namespace(engine=None, onnx=None, model="d0", weights=str(BUNDLED))))
    assert names == {"efficientdet_d0", "efficientdet_d0.int8-entropy", "d0_shapes_d0"}


def test_bundled_weights_bring_their_class_count_and_a_hint_that_says_so():
    import edet_deploy
    from edet_deploy.errors import EdetError
    model = edet_deploy.create_model("d0", weights=str(BUNDLED))  # the README's snippet, with the bundled file
    assert (model.config.num_classes, model.config.image_size) == (4, 256)
    with pytest.raises(EdetError, match=r"the file has 4 classes, the model 90: pass num_classes=4"):
        edet_deploy.create_model("d0", num_classes=90, weights=str(BUNDLED))
