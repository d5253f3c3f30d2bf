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


def _scene(tmp_path: Path) -> None:
    """An image, a folder, a file and a stand-in graph + sidecar (never read: the checks run before any work)."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.onnx").write_bytes(b"graph bytes")
    (tmp_path / "g" / "m.json").write_text("{}")


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("argv,flag,match", [
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", ""], "--json", "an empty path"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "adir"], "--json", "adir is a folder"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "a" * 251 + ".json"], "--json", "longer than 255 bytes"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "afile/x.json"], "--json", "afile is not a folder"),
    (["train", "--data", "nowhere", "--out", "adir"], "--out", "adir is a folder"),
    (["train", "--data", "nowhere", "--out", ""], "--out", "an empty path"),
    (["eval", "--onnx", "g/m.onnx", "--data", "nowhere", "--report", "/proc/x.json"], "--report",
     "cannot write in /proc"),
    (["export", "--out", "afile"], "--out", "afile is a file, not a folder"),
    (["convert", "g/m.onnx", "--fp16", "--out", "fp16.json"], "--out", "metadata JSON"),
    (["calibrate", "g/m.onnx", "--data", "nowhere", "--out", "q.json"], "--out", "metadata JSON"),
    (["triton-repo", "--onnx", "g/m.onnx", "--resign", ""], "--resign", "an empty path"),
    (["--log-file", "adir", "models"], "--log-file", "adir is a folder"),
])
def test_output_paths_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, flag, match):
    """A path the command would write is checked while the command line is parsed: one line naming the user's
    path (never a temporary file), exit 2, and nothing written or created."""
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and match in err[0] and ".tmp" not in err[0], err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("argv,match", [
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "g/m.json"], "--json g/m.json would overwrite g/m.onnx's "
                                                                       "metadata m.json"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--draw", "a.jpg"], "--draw a.jpg would overwrite the input a.jpg"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "a.jpg"], "would overwrite the input a.jpg"),
    (["convert", "g/m.onnx", "--fp16", "--out", "g/m.onnx"], "--out g/m.onnx would overwrite the input g/m.onnx"),
    (["convert", "g/m.onnx", "--fp16", "--out", "g/../g/m.onnx"], "would overwrite the input g/m.onnx"),
    (["--log-file", "g/m.onnx", "detect", "a.jpg", "--onnx", "g/m.onnx"], "--log-file g/m.onnx would overwrite"),
    (["train", "--data", "nowhere", "--weights", "a.jpg", "--out", "a.jpg"], "--out a.jpg would overwrite"),
])
def test_an_output_never_overwrites_an_input(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert _snapshot(tmp_path) == before


def test_drawings_of_images_sharing_a_name_do_not_overwrite_each_other(tmp_path):
    from edet_deploy.visualize import draw_targets
    images = ["a/x.jpg", "b/x.jpg", "b/x.png", "y.jpg"]
    assert [t.name for t in draw_targets(tmp_path, images)] == ["x_det.png", "x_2_det.png", "x_3_det.png",
                                                               "y_det.png"]


def test_outputs_with_names_up_to_255_bytes_are_written(tmp_path):
    from edet_deploy.io import write_json
    path = tmp_path / ("a" * 250 + ".json")
    write_json(path, {"ok": 1})
    assert json.loads(path.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("argv,match", [
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--weights", "w.pth"], "--weights build a model from weights; "
                                                                      "--onnx brings its own"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--model", "d1"], "--model build a model"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--cuda-graph"], "--cuda-graph is for --engine"),
    (["-v", "detect", "a.jpg", "--onnx", "g/m.onnx", "-q"], "contradict each other"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


@pytest.mark.parametrize("argv,match", [
    (["detect", "adir", "--onnx", "g/m.onnx"], "adir is a folder, not an image"),
    (["detect", "", "--onnx", "g/m.onnx"], "no image given (an empty path)"),
    (["detect", "a.jpg", "--onnx", "adir"], "adir is a folder, not an ONNX graph"),
    (["convert", "", "--fp16"], "no ONNX graph given"),
])
def test_inputs_that_are_folders_or_empty_say_so(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_output_checks_follow_symlinks_and_survive_odd_paths(tmp_path, capsys, monkeypatch):
    """A graph reached through a link keeps its sidecar (beside the link and beside its target); a symlink loop
    and a path too long for the filesystem are one line, not a traceback."""
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "m.onnx").symlink_to(tmp_path / "g" / "m.onnx")
    before = _snapshot(tmp_path)
    for argv in (["detect", "a.jpg", "--onnx", "links/m.onnx", "--json", "links/m.json"],
                 ["detect", "a.jpg", "--onnx", "links/m.onnx", "--json", "g/m.json"],
                 ["build", "links/m.onnx", "--out", "links/m.plan"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "would overwrite links/m.onnx's metadata m.json" in err[0], (argv, err)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    deep = "/".join(["d" * 250] * 20)
    for argv in (["make-shapes", "--out", "loop"], ["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", deep]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0] and "--" in err[0], (argv, err)
    assert _snapshot(tmp_path) == {**before, "links/m.onnx": before["g/m.onnx"], "loop": None}


def test_an_option_left_at_its_default_is_not_checked_as_an_output(tmp_path, capsys, monkeypatch):
    """triton-repo --resign writes only DIR: its unused --out default must not be probed (here the working
    folder takes no files), and an existing log file is appended to wherever it is."""
    monkeypatch.chdir("/proc")
    assert main(["triton-repo", "--resign", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--out" not in err and "nowhere" in err, err
    log = tmp_path / "log.txt"
    log.write_text("")
    assert main(["--log-file", str(log), "models"]) == 0


@pytest.mark.parametrize("argv,match", [
    (["check", "empty.onnx"], "empty.onnx is empty (0 bytes): not an ONNX graph"),
    (["build", "nope.onnx", "--out", "x.plan"], "ONNX graph not found: nope.onnx"),
    (["detect", "a.jpg", "--weights", "a.jpg", "--backend", "torch"],
     "cannot read weights a.jpg: not a .pth / .safetensors checkpoint we can load (UnpicklingError"),
])
def test_unusable_inputs_are_named_plainly(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and len(err[0]) < 300, err


def test_exclude_patterns_that_match_nothing_or_everything_are_refused():
    from onnx import TensorProto, helper

    from edet_deploy import EdetError
    from edet_deploy.precision.int8 import NETWORK_PREFIX, network_nodes
    names = [f"{NETWORK_PREFIX}backbone/Conv", f"{NETWORK_PREFIX}fpn/Conv"]
    nodes = [helper.make_node("Conv", ["x", "w"], [f"y{i}"], name=n) for i, n in enumerate(names)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], []))
    assert network_nodes(proto, ["fpn"]) == ([names[0]], [names[1]])
    with pytest.raises(EdetError, match="'nomatch' matches no Conv"):
        network_nodes(proto, ["fpn", "nomatch"])
    with pytest.raises(EdetError, match="keeps every Conv in float"):
        network_nodes(proto, ["*"])


def test_outputs_get_the_usual_mode_even_from_writers_that_replace_the_file(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    from edet_deploy.io import atomic_path
    out = tmp_path / "w.safetensors"
    with atomic_path(out) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


def _drawing_scene(tmp_path: Path) -> None:
    """_scene, plus a folder of images whose names are those `--draw d` would give other images' drawings."""
    _scene(tmp_path)
    (tmp_path / "d").mkdir()
    for name, value in (("a.png", 0), ("a_det.png", 80), ("a_2_det.png", 160)):
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(tmp_path / "d" / name)


@pytest.mark.parametrize("argv,match", [
    # --draw d writes d/a_det.png for d/a.png: that is the second input
    (["detect", "d/a.png", "d/a_det.png", "--onnx", "g/m.onnx", "--draw", "d"],
     "--draw d (its d/a_det.png) would overwrite the input d/a_det.png; choose another path"),
    # a second image named a: d/a_2_det.png, an input too
    (["detect", "a.jpg", "d/a.png", "d/a_2_det.png", "--onnx", "g/m.onnx", "--draw", "d/"],
     "--draw d/ (its d/a_2_det.png) would overwrite the input d/a_2_det.png"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "out.png", "--draw", "out.png"],
     "--json out.png and --draw out.png would write the same file; give them different paths"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "d/a_det.png", "--draw", "d"],
     "--json d/a_det.png and --draw d (its d/a_det.png) would write the same file"),
    (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "./x.json", "--log-file", "x.json"],
     "--log-file x.json and --json ./x.json would write the same file"),
])
def test_outputs_never_overwrite_inputs_or_each_other_under_draw_dir(tmp_path, capsys, monkeypatch, argv, match):
    """`--draw DIR` names a drawing per image: each is checked against the inputs and the other outputs before
    any work (an input was once replaced by a drawing, and the JSON lost under one)."""
    monkeypatch.chdir(tmp_path)
    _drawing_scene(tmp_path)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert _snapshot(tmp_path) == before


def test_drawings_that_clash_with_nothing_pass_the_parser(tmp_path, monkeypatch):
    from edet_deploy.cli import build_parser
    from edet_deploy.cli_args import output_clash
    monkeypatch.chdir(tmp_path)
    _drawing_scene(tmp_path)
    parser = build_parser()
    for argv in (["detect", "a.jpg", "d/a.png", "--onnx", "g/m.onnx", "--draw", "d", "--json", "d/out.json"],
                 ["-v", "--log-file", "log.txt", "detect", "a.jpg", "--onnx", "g/m.onnx", "--log-file", "log.txt"],
                 ["detect", "a.jpg", "--onnx", "g/m.onnx", "--draw", "nowhere"]):  # refused later, by detect
        args = parser.parse_args(argv)
        assert output_clash(args, [*parser._actions, *parser.subcommands["detect"]._actions]) is None, argv


def test_detect_report_escapes_names_with_control_characters(tmp_path, capsys, monkeypatch):
    """A newline in an image name split a line of the text report in two; such names are printed as repr
    escapes them (the JSON escapes them itself), every other name as it is."""
    from edet_deploy.cli_args import SourceArgs, printable
    from edet_deploy.postprocess import Detections

    class OneBox:
        def detect(self, images):
            return [Detections(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([0.9]), np.array([0]), ["cat"])
                    for _ in images]

    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    names = ["new\nline.jpg", "tab\there.jpg", "ünï 图.jpg"]
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name, format="JPEG")
    monkeypatch.setattr(SourceArgs, "build", lambda self, args, min_score=0.0: OneBox())
    assert main(["detect", *names, "--onnx", "g/m.onnx", "--json", "r\n.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["'new\\nline.jpg': 1 detection(s)", "           cat  0.900  [1.0, 2.0, 3.0, 4.0]",
                   "'tab\\there.jpg': 1 detection(s)", "           cat  0.900  [1.0, 2.0, 3.0, 4.0]",
                   "ünï 图.jpg: 1 detection(s)", "           cat  0.900  [1.0, 2.0, 3.0, 4.0]",
                   "wrote 'r\\n.json'"]
    assert [e["image"] for e in json.loads((tmp_path / "r\n.json").read_text())] == names
    assert printable("x\udcff.jpg") == "'x\\udcff.jpg'"  # an undecodable byte, which stdout cannot encode
