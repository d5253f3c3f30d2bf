import json

import numpy as np
import pytest
from PIL import Image

from edet_deploy.cli import main


@pytest.fixture(scope="module")
def onnx_graph(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["export", "--model", "d0", "--image-size", "256", "--out", str(out)]) == 0
    return out / "efficientdet_d0.onnx"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(d / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)).save(d / "b.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 64)
    (d / "notes.txt").write_text("not an image")
    Image.new("L", (20000, 20000)).save(d / "huge.png")
    return d


def test_models_and_help(capsys):
    assert main(["models"]) == 0
    assert "d7x" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    from edet_deploy.configs import VARIANTS
    assert [r["model"] for r in rows] == list(VARIANTS) and rows[0]["image_size"] == 512
    assert {"d7x", "lite0", "lite3x"} <= {r["model"] for r in rows}
    assert rows[0]["coco_ap"] == 34.6
    with pytest.raises(SystemExit) as e:
        main(["detect", "--help"])
    assert e.value.code == 0
    assert "--min-score" in capsys.readouterr().out


def test_detect_jpeg_and_png(onnx_graph, pictures, tmp_path, capsys):
    out_json = tmp_path / "d.json"
    rc = main(["detect", str(pictures / "a.jpg"), str(pictures / "b.png"), "--onnx", str(onnx_graph),
               "--min-score", "0", "--json", str(out_json), "--draw", str(tmp_path / "drawn.png")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "a.jpg: 100 detection(s)" in printed and "b.png: 100 detection(s)" in printed
    report = json.loads(out_json.read_text())
    boxes = np.array([d["box"] for d in report[1]["detections"]])
    assert (boxes[:, [0, 2]] <= 120).all() and (boxes[:, [1, 3]] <= 200).all()  # original pixels, clipped
    assert Image.open(tmp_path / "drawn.png").size == (400, 300)


@pytest.mark.parametrize("name,match", [("corrupt.jpg", "corrupt|not a decodable"),
                                        ("notes.txt", "not a decodable image"),
                                        ("huge.png", "too large"), ("missing.jpg", "not found")])
def test_detect_bad_inputs_one_line_exit_2(onnx_graph, pictures, capsys, name, match):
    rc = main(["detect", str(pictures / name), "--onnx", str(onnx_graph)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    import re
    assert re.search(match, err) and err.startswith("edet-deploy detect: error:")


def test_check_command(onnx_graph, tmp_path, capsys):
    assert main(["check", str(onnx_graph)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and out.splitlines()[-1] == f"{onnx_graph}: OK, nothing TensorRT would reject"
    assert main(["check", str(onnx_graph), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["problems"] == [] and report["summary"].endswith("OK, nothing TensorRT "
                                                                                           "would reject")
    assert report["plugins"] and 0 <= report["precision"]["fp32"] <= 1
    assert main(["check", str(tmp_path / "none.onnx")]) == 2


def test_check_problems_summary_and_json(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, None)
    path = tmp_path / "unique.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "g", [x], [u])),
              str(path))
    assert main(["check", str(path)]) == 1  # scripts: 0 clean, 1 problems, 2 unusable input
    assert capsys.readouterr().out.splitlines()[-1] == f"{path}: 1 problem(s)"
    assert main(["check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["summary"] == f"{path}: 1 problem(s)"
    assert report["problems"][0]["op"] == "Unique" and "not supported" in report["problems"][0]["text"]


def test_detect_json_to_stdout_matches_the_file(onnx_graph, pictures, tmp_path, capsys):
    images = [str(pictures / "a.jpg"), str(pictures / "b.png")]
    out_json = tmp_path / "d.json"
    common = [*images, "--onnx", str(onnx_graph), "--min-score", "0", "--backend", "onnxruntime"]
    assert main(["detect", *common, "--json", str(out_json)]) == 0
    capsys.readouterr()
    assert main(["detect", *common, "--json", "-", "--draw", str(tmp_path / "drawn.png")]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout holds the JSON and nothing else ("drew" goes to stderr)
    assert printed == json.loads(out_json.read_text())
    assert [r["image"] for r in printed] == images and "drew" in captured.err
    assert set(printed[0]["detections"][0]) == {"box", "score", "class_id", "label"}


def test_client_json_to_stdout(pictures, monkeypatch, capsys):
    from edet_deploy.postprocess import Detections
    from edet_deploy.triton import client as triton_client

    class FakeClient:  # the server's answer; what is tested is the command's JSON
        def __init__(self, *args, **kwargs):
            pass

        def detect(self, encoded, min_score=0.0):
            return [Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.9], np.float32),
                               np.array([3]), ["a", "b", "c", "square"])]

        def close(self):
            pass

    monkeypatch.setattr(triton_client, "TritonDetectorClient", FakeClient)
    images = [str(pictures / "a.jpg"), str(pictures / "b.png")]
    assert main(["client", *images, "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == [{"image": img, "detections": [{"class_id": 3, "label": "square", "score": 0.9,
                                                      "box": [1.0, 2.0, 30.0, 40.0]}]} for img in images]
    assert main(["client", images[0]]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{images[0]}: 1 detection(s)"


def test_nms_args_build():
    import argparse

    from edet_deploy.cli_args import NmsArgs
    from edet_deploy.nms import NmsSettings

    nms = NmsArgs()
    p = argparse.ArgumentParser()
    nms.add_to(p)
    assert nms.build(p.parse_args([])) == NmsSettings()
    assert nms.build(p.parse_args(["--nms", "none"])) is None
    built = nms.build(p.parse_args(["--nms", "hard", "--iou-threshold", "0.6", "--score-threshold", "0.2",
                                    "--max-detections", "50", "--class-agnostic"]))
    assert built == NmsSettings("hard", NmsSettings().sigma, 0.6, 0.2, 50, True)


def test_progress_only_on_a_terminal(monkeypatch):
    import argparse
    import sys

    from edet_deploy.cli_args import ProgressArgs

    progress = ProgressArgs()
    p = argparse.ArgumentParser()
    progress.add_to(p)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.build(p.parse_args([])) and not progress.build(p.parse_args(["--no-progress"]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress.build(p.parse_args([]))


def test_triton_repo_from_model_checks_max_batch_before_exporting(tmp_path):
    from edet_deploy import EdetError
    from edet_deploy.triton.repo import generate_repository_from_model

    with pytest.raises(EdetError, match=">= 1"):
        generate_repository_from_model(tmp_path / "repo", model="d0", max_batch_size=0)
    assert not (tmp_path / "repo").exists()


def test_bench_no_progress_reaches_the_harness(monkeypatch, tmp_path):
    """`bench --no-progress` turns the sweep's bar off, as the other long commands do."""
    import sys

    from edet_deploy import bench
    from edet_deploy.cli import main

    seen = {}

    def fake_run_bench(*args, **kwargs):
        seen["progress"] = args[9] if len(args) > 9 else kwargs.get("progress")
        return {"results": [{"status": "ok"}]}  # one measured row: a sweep that measured nothing exits 1
    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["bench", "--models", "d0", "--backends", "onnxruntime", "--out", str(tmp_path)]) == 0
    assert seen["progress"] is True
    assert main(["bench", "--models", "d0", "--backends", "onnxruntime", "--no-progress", "--out", str(tmp_path)]) == 0
    assert seen["progress"] is False
