"""The graph contract has one home (edet_deploy/contract.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import edet_deploy
from edet_deploy import contract

PACKAGE = Path(edet_deploy.__file__).parent


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("name", contract.OUTPUTS)
def test_output_names_written_only_in_contract(name):
    pattern = re.compile(rf"""["']{name}["']""")
    holders = [str(p.relative_to(PACKAGE)) for p in _sources() if pattern.search(p.read_text())]
    assert holders == ["contract.py"]


def test_output_specs_match_design():
    shapes = {s.name: (s.dtype, s.shape("B", 100)) for s in contract.OUTPUT_SPECS}
    assert shapes == {"num_detections": ("int32", ("B", 1)), "detection_boxes": ("float32", ("B", 100, 4)),
                      "detection_scores": ("float32", ("B", 100)), "detection_classes": ("int32", ("B", 100))}
    assert (contract.INPUT_NAME, contract.INPUT_DTYPE, contract.INPUT_LAYOUT) == ("images", "uint8", "NHWC")


def test_consumers_use_the_contract():
    from edet_deploy.nms import op
    from edet_deploy.trt import plugin

    assert op.OUTPUTS == contract.OUTPUTS
    assert op.OUTPUT_TYPES == {"num_detections": 6, "detection_boxes": 1, "detection_scores": 1,
                               "detection_classes": 6}
    assert plugin.output_specs("b", 500, 7) == [("num_detections", "int32", ("b", 1)),
                                                ("detection_boxes", "float32", ("b", 7, 4)),
                                                ("detection_scores", "float32", ("b", 7)),
                                                ("detection_classes", "int32", ("b", 7))]


def test_names():
    assert contract.artifact_name("d0") == "efficientdet_d0"
    assert contract.artifact_name("d3", "fp16") == "efficientdet_d3.fp16"
    assert contract.artifact_name("d0", "int8-minmax") == "efficientdet_d0.int8-minmax"
    assert contract.artifact_name("d0", nms=False) == "efficientdet_d0_nonms"
    assert contract.member_names("efficientdet_d0") == ("efficientdet_d0_preprocess", "efficientdet_d0_engine",
                                                        "efficientdet_d0_postprocess")
    assert contract.ensemble_name("m", "decoded") == "m_decoded"
    assert contract.preprocess_name("m", "decoded") == "m_preprocess_decoded"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path))
    assert contract.cache_dir() == tmp_path
    monkeypatch.delenv("EDET_DEPLOY_CACHE")
    assert contract.cache_dir() == Path.home() / ".cache" / "edet_deploy"
