import pytest
import torch

from edet_deploy import EdetError, create_model, load_weights, save_weights
from edet_deploy.model.layers import StaticSameConv2d, StaticSameMaxPool2d, same_pad_amounts
from conftest import make_effdet

# effdet 0.4.1's parameter counts (the version the dev extra pins), counted from its models.
EFFDET_PARAMS = {"d0": 3_880_067, "d1": 6_625_898, "d2": 8_097_039, "d3": 12_032_296, "d4": 20_723_675,
                 "d5": 33_653_315, "d6": 51_871_782, "d7": 51_871_782, "d7x": 77_147_166,
                 "lite0": 3_243_470, "lite1": 4_248_318, "lite2": 5_252_334, "lite3": 8_350_862,
                 "lite3x": 9_280_862, "lite4": 15_130_894}


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(EFFDET_PARAMS))
def test_parameter_counts(name):
    # Building a model is cheap (no forward pass), so every variant runs in the default suite.
    assert _num_params(create_model(name)) == EFFDET_PARAMS[name]


def test_output_shapes_and_static_padding():
    model = create_model("d0", num_classes=5, image_size=256)
    with torch.no_grad():
        cls, box = model(torch.zeros(2, 3, 256, 256))
    assert [tuple(c.shape) for c in cls] == [(2, 45, s, s) for s in (32, 16, 8, 4, 2)]
    assert [tuple(b.shape) for b in box] == [(2, 36, s, s) for s in (32, 16, 8, 4, 2)]
    kinds = {type(m) for m in model.modules()}
    assert StaticSameConv2d in kinds and StaticSameMaxPool2d in kinds
    from timm.layers.conv2d_same import Conv2dSame
    assert Conv2dSame not in kinds


def test_same_padding_matches_tensorflow_rule():
    # TF SAME: out = ceil(in / stride); total pad = (out - 1) * stride + k - in, extra pixel at the end.
    assert same_pad_amounts((512, 512), (3, 3), (2, 2), (1, 1)) == (0, 1, 0, 1)
    assert same_pad_amounts((7, 7), (3, 3), (2, 2), (1, 1)) == (1, 1, 1, 1)
    assert same_pad_amounts((8, 8), (5, 5), (2, 2), (1, 1)) == (1, 2, 1, 2)


def test_trace_has_no_dynamic_shape_ops():
    model = create_model("d0", image_size=256)
    graph = torch.jit.trace(model, torch.zeros(1, 3, 256, 256), check_trace=False).inlined_graph
    kinds = {n.kind() for n in graph.nodes()}
    assert "aten::size" not in kinds  # the timm dynamic padding would read the input size here


def test_bad_image_size():
    with pytest.raises(EdetError, match="multiple of 128"):
        create_model("d0", image_size=500)


@pytest.mark.parametrize("name", ["d0", "d1", "lite0", "lite1"])
def test_conformance_with_effdet(name):
    _conformance(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["d2", "d3", "d4", "d5", "d6", "d7", "d7x", "lite2", "lite3", "lite3x", "lite4"])
def test_conformance_with_effdet_large(name):
    _conformance(name)


def test_lite_is_relu6_and_unweighted_sum():
    """What makes Lite quantize well is really there: no SiLU anywhere (backbone, BiFPN, heads), no fusion
    weights; and the non-multiple-of-128 native input (320) builds with effdet's ceil-rounded P7 (3x3)."""
    model = create_model("lite0")
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.ReLU6 in kinds and torch.nn.SiLU not in kinds
    assert not [n for n, _ in model.named_parameters() if "edge_weights" in n]
    with torch.no_grad():
        cls, _ = model(torch.zeros(1, 3, 320, 320))
    assert [c.shape[-1] for c in cls] == [40, 20, 10, 5, 3]
    with pytest.raises(EdetError, match="multiple of 64"):
        create_model("lite0", image_size=300)


def test_lite_flops_in_the_table_are_the_count():
    """The table's Lite FLOPs (none are published) are this count of multiply-adds at the native input."""
    from torch.utils.flop_counter import FlopCounterMode
    from edet_deploy import get_config

    model = create_model("lite0")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 320, 320))
    assert counter.get_total_flops() / 2e9 == pytest.approx(get_config("lite0").published["flops_b"], abs=0.005)


def _conformance(name):
    ref = make_effdet(name)
    ours = create_model(name)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and not unexpected
    size = ours.config.image_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a_cls, a_box = ours(x)
        b_cls, b_box = ref(x)
    assert len(a_cls) == len(b_cls) == ours.config.num_levels
    for a, b in zip(a_cls + a_box, b_cls + b_box):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4


def test_weights_roundtrip_pth_and_safetensors(tmp_path):
    src = create_model("d0", num_classes=3, image_size=256)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"w{suffix}"
        save_weights(src, path, {"class_names": ["a", "b", "c"]})
        dst = create_model("d0", num_classes=3, image_size=256)
        meta = load_weights(dst, path)
        assert meta["variant"] == "d0" and meta["class_names"] == ["a", "b", "c"]
        for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(a, b), k


def test_effdet_checkpoint_file_loads(tmp_path):
    ref = make_effdet("d0")
    path = tmp_path / "tf_efficientdet_d0.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("d0", weights=str(path))
    assert torch.equal(model.state_dict()["class_net.predict.conv_pw.bias"],
                       ref.state_dict()["class_net.predict.conv_pw.bias"])
    # The level-first head layout (effdet's toggle_head_bn_level_first) and a bench prefix load too.
    ref.toggle_head_bn_level_first()
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()}}, path)
    load_weights(create_model("d0"), path)


def test_effdet_lite_checkpoint_file_loads_through_the_cli(tmp_path):
    """An effdet tf_efficientdet_lite0 .pth goes through --weights like a D-variant's: exported, and the graph's
    metadata carries Lite's normalisation (mean = std = 127.5), which the graph applies."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    ref = make_effdet("lite0", num_classes=3)
    path = tmp_path / "tf_efficientdet_lite0.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("lite0", weights=str(path))
    assert model.config.num_classes == 3
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "edet_deploy", "export", "--model", "tf_efficientdet_lite0",
                           "--weights", str(path), "--image-size", "128", "--out", str(tmp_path / "out"),
                           "--no-progress"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert meta["variant"] == "lite0" and meta["mean"] == [127.5] * 3 and meta["std"] == [127.5] * 3


def test_mismatch_names_keys_and_leaves_model_untouched(tmp_path):
    path = tmp_path / "d1.pth"
    save_weights(create_model("d0", num_classes=3, image_size=256), path)
    model = create_model("d0", num_classes=5, image_size=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EdetError) as e:
        load_weights(model, path)
    assert "class_net.predict.conv_pw.weight" in str(e.value) and "shape mismatch" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(EdetError, match="missing keys"):
        load_weights(create_model("d1"), path)


def test_bad_weight_files(tmp_path):
    with pytest.raises(EdetError, match="not found"):
        load_weights(create_model("d0", image_size=256), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EdetError, match="cannot read weights"):
        load_weights(create_model("d0", image_size=256), bad)
