import pytest

from edet_deploy import EdetError, VARIANTS, get_config
from edet_deploy.configs import canonical_name, parse_model_list


@pytest.mark.parametrize("alias", ["d0", "D0", "efficientdet-d0", "efficientdet_d0", "tf_efficientdet_d0"])
def test_aliases(alias):
    assert canonical_name(alias) == "d0"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(EdetError) as e:
        get_config("d9")
    for name in VARIANTS:
        assert name in str(e.value)


def test_table_follows_reference():
    # The published table (automl's README; its phi formulas are rounded there: D5 is 1280 / 7 repeats).
    table = {"d0": (512, 64, 3, 3), "d1": (640, 88, 4, 3), "d2": (768, 112, 5, 3), "d3": (896, 160, 6, 4),
             "d4": (1024, 224, 7, 4), "d5": (1280, 288, 7, 4), "d6": (1280, 384, 8, 5), "d7": (1536, 384, 8, 5),
             "d7x": (1536, 384, 8, 5)}
    for name, row in table.items():
        cfg = get_config(name)
        assert (cfg.image_size, cfg.fpn_channels, cfg.fpn_repeats, cfg.head_repeats) == row
    assert get_config("d7").anchor_scale == 5.0 and get_config("d7x").max_level == 8
    assert get_config("d7").backbone == "tf_efficientnet_b6" and get_config("d7x").backbone == "tf_efficientnet_b7"
    assert {n for n in VARIANTS if get_config(n).fusion == "sum" and n.startswith("d")} == {"d6", "d7", "d7x"}


def test_lite_rows_follow_effdet():
    """Every Lite row against effdet 0.4.1's own config (model_config.py): sizes, widths, depths, anchor scale,
    backbone, activation, fusion and normalisation (effdet's 0.5 / 0.5 in 0..1 units, x 255 in its loader)."""
    from effdet.config.model_config import get_efficientdet_config

    lite = [n for n in VARIANTS if n.startswith("lite")]
    assert lite == ["lite0", "lite1", "lite2", "lite3", "lite3x", "lite4"]
    for name in lite:
        ours, ref = get_config(name), get_efficientdet_config(f"tf_efficientdet_{name}")
        assert (ours.image_size, ours.fpn_channels, ours.fpn_repeats, ours.head_repeats, ours.anchor_scale,
                ours.backbone) == (ref.image_size[0], ref.fpn_channels, ref.fpn_cell_repeats,
                                   ref.box_class_repeats, ref.anchor_scale, ref.backbone_name)
        assert (ours.act, ref.act_type, ours.fusion, ref.fpn_name) == ("relu6", "relu6", "sum", "bifpn_sum")
        assert ours.mean == tuple(m * 255 for m in ref.mean) and ours.std == tuple(s * 255 for s in ref.std)
        assert ours.backbone_drop_path == ref.backbone_args["drop_path_rate"]
    assert canonical_name("efficientdet-lite3x") == "lite3x" and canonical_name("tf_efficientdet_lite0") == "lite0"
    assert parse_model_list("lite2-lite4") == ["lite2", "lite3", "lite3x", "lite4"]


def test_overrides_and_ranges():
    assert get_config("d1", num_classes=3).num_classes == 3
    assert parse_model_list("d0-d2,d7x") == ["d0", "d1", "d2", "d7x"]
    assert parse_model_list("d0-d7") == [f"d{i}" for i in range(8)]
    with pytest.raises(EdetError):
        parse_model_list("d3-d1")
