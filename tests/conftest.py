import io
import os
from pathlib import Path

import numpy as np
import pytest

# effdet (the peer we test against) must never try to download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "edet_deploy" / "assets" / "shapes_d0.safetensors"
# Fixtures that start a real tritonserver: every test using one is marked `server` (see below).
SERVER_FIXTURES = {"served"}


def pytest_collection_modifyitems(items):
    """`make test-unit` (-m "not slow and not server") skips the tests that start a real server; a module whose
    every test does (the fault suite) carries `pytestmark = pytest.mark.server` itself."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


def encode(arr, fmt: str) -> bytes:
    """An image array as the bytes of a `fmt` (PNG, JPEG, ...) file."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def random_d0_256(tmp_path_factory) -> Path:
    """The seed-0, randomly initialised D0 at 256 px, dynamic batch up to 8: the graph the serving tests serve.
    Shared by the session: read it, copy it before changing anything beside it."""
    import torch

    from edet_deploy.export import export_onnx
    torch.manual_seed(0)
    return export_onnx("d0", tmp_path_factory.mktemp("d0-random-256"), image_size=256, dynamic_batch=8).onnx_path


@pytest.fixture(scope="session")
def bundled_d0(tmp_path_factory) -> Path:
    """The bundled shapes D0 (trained, 256 px, 4 classes), dynamic batch up to 4. Shared by the session."""
    if not BUNDLED_WEIGHTS.is_file():
        pytest.skip("bundled shapes model missing")
    from edet_deploy.export import export_onnx
    return export_onnx("d0", tmp_path_factory.mktemp("d0-bundled"), weights=str(BUNDLED_WEIGHTS),
                       dynamic_batch=4).onnx_path


@pytest.fixture(scope="session")
def effdet_module():
    return pytest.importorskip("effdet")


def make_effdet(name: str, num_classes: int = 90):
    import effdet
    from effdet.config.model_config import get_efficientdet_config

    config = get_efficientdet_config(f"tf_efficientdet_{name}")
    config.num_classes = num_classes
    model = effdet.EfficientDet(config, pretrained_backbone=False)
    return model.eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def assert_same_detections(got_boxes, got_scores, got_classes, ref_boxes, ref_scores, ref_classes,
                           box_atol, score_atol=1e-4):
    """Same detections up to the order of near-equal scores: the sorted score lists agree, and every detection
    has a partner with the same class, a box within box_atol and a score within score_atol."""
    got_boxes, ref_boxes = np.asarray(got_boxes), np.asarray(ref_boxes)
    assert len(got_scores) == len(ref_scores)
    np.testing.assert_allclose(got_scores, ref_scores, atol=score_atol, rtol=0)
    used = np.zeros(len(ref_scores), bool)
    for i in range(len(got_scores)):
        ok = (~used & (np.asarray(ref_classes) == got_classes[i])
              & (np.abs(np.asarray(ref_scores) - got_scores[i]) <= score_atol)
              & (np.abs(ref_boxes - got_boxes[i]).max(axis=1) <= box_atol))
        assert ok.any(), f"detection {i} (class {got_classes[i]}, score {got_scores[i]}) has no partner"
        used[np.flatnonzero(ok)[0]] = True


def relabelled_graph(graph, out_dir, **changes):
    """A copy of an exported graph whose metadata (the sidecar and the copy inside the graph, checksum
    recomputed) says `changes`: a graph that calls itself d2, int8 or named classes, without the cost of
    making one."""
    import json
    from pathlib import Path

    import onnx

    from edet_deploy.io import sha256_file
    from edet_deploy.metadata import ONNX_PROP, ArtifactMetadata, read_metadata, write_metadata

    model = onnx.load(str(graph))
    for prop in model.metadata_props:
        if prop.key == ONNX_PROP:
            prop.value = json.dumps({**json.loads(prop.value), **changes})
    dst = Path(out_dir) / Path(graph).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    meta = {**read_metadata(graph), **changes, "onnx_sha256": sha256_file(dst)}
    write_metadata(dst, ArtifactMetadata.from_dict(meta))
    return dst
