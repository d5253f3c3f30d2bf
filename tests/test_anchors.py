import math

import numpy as np
import pytest
import torch

from edet_deploy.anchors import anchors_for, generate_anchors, level_sizes
from edet_deploy.box_coding import decode_boxes, encode_boxes
from edet_deploy.configs import get_config


def test_hand_computed_first_anchors():
    a = generate_anchors(128)
    # P3: stride 8, first centre (4, 4), base size 4 * 8 = 32.
    np.testing.assert_allclose(a[0], [-12, -12, 20, 20])
    np.testing.assert_allclose(a[1], [4 - 22.4, 4 - 11.2, 4 + 22.4, 4 + 11.2], rtol=1e-6)  # aspect (1.4, 0.7)
    half = 32 * 2 ** (1 / 3) / 2
    np.testing.assert_allclose(a[3], [4 - half, 4 - half, 4 + half, 4 + half], rtol=1e-6)  # octave 1
    # Second location of P3 is one stride to the right (row-major order).
    np.testing.assert_allclose(a[9], a[0] + [8, 0, 8, 0])
    # Last anchor: P7 (stride 128, one location, centre 64), octave 2, aspect (0.7, 1.4).
    base = 4 * 128 * 2 ** (2 / 3)
    np.testing.assert_allclose(a[-1], [64 - base * 0.35, 64 - base * 0.7, 64 + base * 0.35, 64 + base * 0.7],
                               rtol=1e-6)


def test_counts_and_levels():
    assert level_sizes(512, 3, 7) == [64, 32, 16, 8, 4]
    assert level_sizes(1536, 3, 8) == [192, 96, 48, 24, 12, 6]
    assert anchors_for(get_config("d0")).shape == (9 * sum(s * s for s in [64, 32, 16, 8, 4]), 4)
    assert anchors_for(get_config("d7x")).shape[0] == 9 * sum(s * s for s in [192, 96, 48, 24, 12, 6])


@pytest.mark.parametrize("name", ["d0", "d7"])
def test_matches_effdet_anchors(effdet_module, name):
    from effdet.anchors import Anchors
    from effdet.config.model_config import get_efficientdet_config

    ref = Anchors.from_config(get_efficientdet_config(f"tf_efficientdet_{name}")).boxes.numpy()  # yxyx
    ours = anchors_for(get_config(name))
    np.testing.assert_allclose(ours, ref[:, [1, 0, 3, 2]], atol=1e-3)


def test_decode_hand_computed():
    anchor = np.array([[0.0, 0.0, 10.0, 20.0]], np.float32)  # w 10, h 20, centre (5, 10)
    codes = np.array([[0.5, 0.1, math.log(2.0), 0.0]], np.float32)
    # y = 10 + 0.5 * 20 = 20, x = 5 + 0.1 * 10 = 6, h = 40, w = 10
    np.testing.assert_allclose(decode_boxes(codes, anchor), [[1, 0, 11, 40]], atol=1e-5)


def test_encode_decode_roundtrip_numpy_and_torch(rng):
    anchors = generate_anchors(256)[:500]
    codes = rng.normal(0, 0.5, size=(500, 4)).astype(np.float32)
    boxes = decode_boxes(codes, anchors)
    np.testing.assert_allclose(encode_boxes(boxes, anchors), codes, atol=1e-4)
    boxes_t = decode_boxes(torch.from_numpy(codes), torch.from_numpy(anchors))
    assert isinstance(boxes_t, torch.Tensor)
    np.testing.assert_allclose(boxes_t.numpy(), boxes, rtol=1e-6, atol=1e-4)


def test_decode_clamps_huge_scales():
    anchor = np.array([[0.0, 0.0, 16.0, 16.0]], np.float32)
    out = decode_boxes(np.array([[0, 0, 100.0, 100.0]], np.float32), anchor)
    assert np.isfinite(out).all() and out[0, 2] - out[0, 0] == pytest.approx(1000.0, rel=1e-4)
