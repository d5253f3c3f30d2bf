"""The soft-NMS node's surgery (edet_deploy/nms/graph.py) on a hand-made candidate graph."""
import onnx
import pytest
from onnx import TensorProto, helper

from edet_deploy import EdetError
from edet_deploy.contract import CANDIDATES, OUTPUTS
from edet_deploy.nms import NmsSettings
from edet_deploy.nms import op as nms_op
from edet_deploy.nms.graph import (ORT_CONTRIB_DOMAIN, attach_nms, cut_at_nms, find_nms_node, for_onnxruntime,
                                   strip_nms)


def candidate_graph() -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 5, 4]),
           helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 5]),
           helper.make_tensor_value_info("c", TensorProto.INT32, [1, 5])]
    outs = [helper.make_tensor_value_info(n, v.type.tensor_type.elem_type, [1, 5, 4][:len(v.type.tensor_type.shape.dim)])
            for n, v in zip(CANDIDATES, ins)]
    nodes = [helper.make_node("Identity", [i.name], [o.name]) for i, o in zip(ins, outs)]
    return helper.make_model(helper.make_graph(nodes, "g", ins, outs), opset_imports=[helper.make_opsetid("", 17)])


def test_attach_then_strip_gives_the_candidate_graph_back():
    settings = NmsSettings(method="linear", max_detections=7)
    full = attach_nms(candidate_graph(), settings)
    assert [o.name for o in full.graph.output] == list(OUTPUTS)
    assert any(o.domain == nms_op.DOMAIN for o in full.opset_import)
    stripped, got = strip_nms(full)
    assert (got.method, got.max_detections) == ("linear", 7)  # floats come back as float32 attributes
    assert got.to_dict() == pytest.approx(settings.to_dict())
    assert [o.name for o in stripped.graph.output] == list(CANDIDATES)
    assert find_nms_node(stripped.graph) is None and not any(o.domain == nms_op.DOMAIN for o in stripped.opset_import)
    assert find_nms_node(full.graph) is not None  # the source is not touched
    again = attach_nms(stripped, got)  # what convert writes: the same node, no duplicated value_info
    assert [v.name for v in again.graph.value_info] == [v.name for v in full.graph.value_info]
    cut, cut_settings, names = cut_at_nms(full)
    assert names == list(CANDIDATES) and cut_settings == got and len(cut.graph.node) == 3


def test_graph_without_the_node_comes_back_unchanged():
    plain = candidate_graph()
    assert strip_nms(plain)[1] is None
    assert for_onnxruntime(plain) == (plain, False)


def test_onnxruntime_domain_remap():
    full = attach_nms(candidate_graph(), NmsSettings())
    proto, uses = for_onnxruntime(full)
    node = proto.graph.node[-1]
    assert uses and node.domain == ORT_CONTRIB_DOMAIN
    assert not {a.name for a in node.attribute} & set(nms_op.TRT_ATTRIBUTE_TYPES)
    assert {o.domain for o in proto.opset_import} == {"", ORT_CONTRIB_DOMAIN}


def test_a_second_node_is_refused():
    full = attach_nms(candidate_graph(), NmsSettings())
    full.graph.node.append(helper.make_node("other", [], [], domain=nms_op.DOMAIN))
    with pytest.raises(EdetError, match="expected one edet::soft_nms node"):
        strip_nms(full)
