"""Models a user brings: effdet / timm checkpoints in every wrapping their tools write, files that are not
checkpoints, and ONNX graphs whose weights live in an external data file. An acceptable file loads with exactly
its weights; an unusable one is one line and exit 2, naming what the file is and what to do."""
import argparse
import logging
import shutil
from pathlib import Path

import pytest
import torch

from edet_deploy import EdetError, create_model
from edet_deploy.cli import main
from edet_deploy.model.weights import guess_variants, load_weights, normalize_keys


@pytest.fixture(scope="module")
def ref():
    """A 4-class D0 at 256 px with non-default weights everywhere (batch-norm statistics included)."""
    torch.manual_seed(1)
    model = create_model("d0", num_classes=4, image_size=256)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def _shifted(state):
    return {k: (v + 0.5 if v.is_floating_point() else v.clone()) for k, v in state.items()}


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel / DDP
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},  # effdet's DetBenchTrain
    lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},  # older / ported files
], ids=["plain", "state_dict", "model", "module", "orig_mod", "module_orig_mod", "bench", "no_num_batches"])
def test_effdet_and_timm_wrappings_load_their_exact_weights(tmp_path, ref, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(ref), path)
    model = create_model("d0", weights=str(path), image_size=256)  # 4 classes: from the class head's shape
    assert model.config.num_classes == 4
    if any(k.endswith("num_batches_tracked") for k in wrap(ref)):
        _assert_loaded(model, ref)
    else:
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema"])
def test_training_checkpoint_uses_its_ema_weights_and_says_so(tmp_path, ref, caplog, ema_key):
    """What effdet's train.py (timm's CheckpointSaver) writes: args as an argparse.Namespace, the optimizer,
    the bench's "model." prefix, and the EMA weights, which timm's load_checkpoint prefers."""
    ema = _shifted(ref)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 7, "arch": "tf_efficientdet_d0", "args": argparse.Namespace(lr=0.09, model="d0"),
                "state_dict": {f"model.{k}": v for k, v in ref.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.09, "params": [0]}]},
                ema_key: {f"model.{k}": v for k, v in ema.items()}, "metric": 0.31}, path)
    with caplog.at_level(logging.INFO, logger="edet_deploy"):
        model = create_model("d0", weights=str(path), image_size=256)
    _assert_loaded(model, ema)
    assert any("EMA weights" in r.getMessage() and ema_key in r.getMessage() for r in caplog.records)


def test_safetensors_under_another_suffix_is_read_as_safetensors(tmp_path, ref):
    from safetensors.torch import save_file
    path = tmp_path / "model.bin"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    _assert_loaded(create_model("d0", weights=str(path), image_size=256), ref)


def _refusals(tmp_path: Path, ref) -> dict:
    full = tmp_path / "full.pth"
    torch.save(ref, full)
    data = full.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.jit.trace(torch.nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 8, 8)).save(str(tmp_path / "scripted.pt"))
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), tmp_path / "whole_model.pth")
    import pickle
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"weights": ref}, tmp_path / "other_wrapper.pth")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(4)}, str(tmp_path / "full.safetensors"))
    st = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) - 5])
    return {
        "truncated.pth": "truncated or corrupt",
        "truncated.safetensors": "truncated or corrupt",
        "empty.pth": "empty file, 0 bytes",
        "scripted.pt": "a TorchScript archive (torch.jit.save), not a checkpoint",
        "whole_model.pth": "a pickled model object (torch.nn.modules.container.Sequential), not a state_dict",
        "plain.pkl": "not written by torch.save",
        "list.pth": "holds no state_dict of tensors (a list;",
        "other_wrapper.pth": "holds no state_dict of tensors (a dict with keys weights;",
    }


def test_unusable_weight_files_are_one_line_exit_2(tmp_path, ref, capsys):
    for name, match in _refusals(tmp_path, ref).items():
        code = main(["export", "--model", "d0", "--weights", str(tmp_path / name), "--image-size", "256",
                     "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
        err = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 2, (name, captured.err)
        assert len(err) == 1 and match in err[0], (name, err)
        assert "Traceback" not in captured.err and "bug" not in err[0]
    assert not (tmp_path / "out").exists()


def test_another_variants_checkpoint_names_that_variant(tmp_path):
    torch.manual_seed(0)
    d1 = create_model("d1", num_classes=4, image_size=256).state_dict()
    assert guess_variants(normalize_keys(d1)) == ["d1"]
    path = tmp_path / "d1.pth"
    torch.save(d1, path)
    with pytest.raises(EdetError, match=r"looks like a d1 checkpoint: --model d1"):
        create_model("d0", weights=str(path), image_size=256)


def test_fine_tuning_can_start_a_new_class_head(tmp_path, ref):
    """A COCO (or other) checkpoint for another class count: refused as it is, with the class count to pass;
    with new_class_head (what fine-tuning needs) all but the class layer load."""
    path = tmp_path / "c4.pth"
    torch.save(ref, path)
    model = create_model("d0", num_classes=3, image_size=256)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EdetError, match=r"pass num_classes=4, or --num-classes 4"):
        load_weights(model, path)
    load_weights(model, path, new_class_head=True)
    got = model.state_dict()
    for k, v in got.items():
        expected = fresh[k] if k.startswith("class_net.predict.conv_pw.") else ref[k]
        assert torch.equal(v, expected), k


def test_torch_backend_takes_the_class_count_of_a_file_without_metadata(tmp_path, ref):
    from edet_deploy import Detector
    path = tmp_path / "effdet_style.pth"
    torch.save(ref, path)  # no metadata: an effdet file for 4 classes
    det = Detector.from_model("d0", weights=str(path), backend="torch")
    assert det.runner.metadata["num_classes"] == 4 and det.image_size == 512
    _assert_loaded(det.runner.graph.model, ref)


# --- ONNX graphs with external data ----------------------------------------------------------------------


def _external_copy(graph: Path, folder: Path) -> Path:
    """`graph` re-saved with its weights in a side file, with a sidecar that matches the re-saved graph."""
    import hashlib
    import json

    import onnx
    folder.mkdir()
    out = folder / graph.name
    onnx.save_model(onnx.load(str(graph)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=graph.name + ".data", size_threshold=1024)
    meta = json.loads(graph.with_suffix(".json").read_text())
    meta["onnx_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    out.with_suffix(".json").write_text(json.dumps(meta))
    return out


def test_external_data_graph_missing_its_data_is_named(tmp_path, random_d0_256, capsys):
    from edet_deploy.io import external_data_files, missing_external_data
    import onnx
    graph = _external_copy(Path(random_d0_256), tmp_path / "ext")
    assert external_data_files(onnx.load(str(graph), load_external_data=False)) == [graph.name + ".data"]
    assert missing_external_data(graph) is None
    (tmp_path / "elsewhere").mkdir()
    shutil.move(str(graph) + ".data", tmp_path / "elsewhere")
    assert "efficientdet_d0.onnx.data" in missing_external_data(graph)
    from PIL import Image
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    for argv in (["detect", str(tmp_path / "a.png"), "--onnx", str(graph), "--backend", "onnxruntime"],
                 ["triton-repo", "--onnx", str(graph), "--out", str(tmp_path / "repo"), "--engine-backend",
                  "onnxruntime"]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "keeps its weights in external data (efficientdet_d0.onnx.data)" in err[0], err
    assert not (tmp_path / "repo").exists()


def test_triton_repo_inlines_external_data(tmp_path, random_d0_256, capsys):
    """The repository's model.onnx is the only file its engine model loads: a graph with a side file is
    copied with its weights inline, detects exactly as the original and passes the served-repository check."""
    import numpy as np
    import onnx

    from edet_deploy import Detector
    from edet_deploy.io import external_data_files
    from edet_deploy.triton.verify import verify_served_repository
    graph = _external_copy(Path(random_d0_256), tmp_path / "ext")
    repo = tmp_path / "repo"
    assert main(["triton-repo", "--onnx", str(graph), "--out", str(repo), "--engine-backend", "onnxruntime"]) == 0
    copied = repo / "efficientdet_d0_engine" / "1" / "model.onnx"
    assert external_data_files(onnx.load(str(copied), load_external_data=False)) == []
    verify_served_repository(repo)
    image = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    want = Detector.from_onnx(random_d0_256, backend="onnxruntime").detect([image])[0].to_records()
    got = Detector.from_onnx(copied, backend="onnxruntime").detect([image])[0].to_records()
    assert got == want


def test_num_classes_against_the_weights_names_the_weights(tmp_path, capsys):
    """--num-classes that contradicts our checkpoint's metadata: the message blamed the class names
    ('4 class names given for 90 classes'), not the option."""
    from pathlib import Path

    from edet_deploy.cli import main

    weights = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_d0.safetensors"
    assert main(["export", "--model", "d0", "--weights", str(weights), "--num-classes", "90", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("detect 4 classes, not --num-classes 90 (leave it out: the weights say)"), err
    assert not (tmp_path / "x").exists()
