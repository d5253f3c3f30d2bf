"""Every operation on the `edet::soft_nms` node of a detection graph, torch-free: attach it to a candidate graph
(export), strip it to get the network part back (precision transforms), cut the graph at its inputs (runtimes
that run soft-NMS themselves) and move it to the domain ONNX Runtime serves it from. Each works on a copy or in
memory: the file on disk stays exactly the graph TensorRT consumes."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

from ..contract import CANDIDATE_SPECS, CANDIDATES, OUTPUT_SPECS
from ..errors import EdetError
from . import op
from .settings import NmsSettings

if TYPE_CHECKING:
    import onnx

# onnxruntime-extensions serves its Python custom ops from this domain.
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"


def find_nms_node(graph: "onnx.GraphProto"):
    """The graph's soft-NMS node, or None for a graph without one (exported with --nms none). Anything else in
    our domain, or a second node, is refused."""
    nodes = [n for n in graph.node if n.domain == op.DOMAIN]
    if not nodes:
        return None
    if len(nodes) > 1 or nodes[0].op_type != op.OP_TYPE:
        raise EdetError(f"expected one {op.DOMAIN}::{op.OP_TYPE} node, found "
                        f"{[f'{n.domain}::{n.op_type}' for n in nodes]}")
    return nodes[0]


def _drop_opset(proto: "onnx.ModelProto") -> None:
    imports = [o for o in proto.opset_import if o.domain != op.DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)


def attach_nms(proto: "onnx.ModelProto", settings: NmsSettings) -> "onnx.ModelProto":
    """Append the soft-NMS node to a candidate graph (in place) and make its outputs the graph outputs."""
    from onnx import helper

    graph = proto.graph
    names = [o.name for o in graph.output]
    if names != list(CANDIDATES):
        raise EdetError(f"expected a candidate graph with outputs {list(CANDIDATES)}, got {names}")
    batch_dim = graph.output[0].type.tensor_type.shape.dim[0]
    b = batch_dim.dim_param or batch_dim.dim_value
    k = settings.max_detections
    graph.node.append(op.make_node(settings))
    # Keep the candidate tensors' types as value_info so shape inference, tools and strip_nms still see them.
    known = {v.name for v in graph.value_info}
    graph.value_info.extend(o for o in graph.output if o.name not in known)
    del graph.output[:]
    for spec in OUTPUT_SPECS:
        graph.output.append(helper.make_tensor_value_info(spec.name, spec.onnx_type, list(spec.shape(b, k))))
    if not any(o.domain == op.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(op.DOMAIN, op.OP_VERSION))
    return proto


def cut_at_nms(proto: "onnx.ModelProto") -> Tuple["onnx.ModelProto", Optional[NmsSettings], List[str]]:
    """The graph up to the soft-NMS node's inputs (a copy: the nodes the candidates need, the candidates as
    outputs, no `edet` opset), the node's settings and its input names. A graph without the node comes back as
    a copy with settings None and its own output names."""
    import onnx
    from onnx import helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    node = find_nms_node(g)
    if node is None:
        return proto, None, [o.name for o in g.output]
    settings = op.settings_from_node(node)
    if list(node.output) != [o.name for o in g.output]:
        raise EdetError("the soft_nms node's outputs must be the graph's outputs")
    # Keep only what the candidate tensors depend on (the node is the graph's last step, but do not assume it).
    needed, keep = set(node.input), []
    for n in reversed([n for n in g.node if n is not node]):
        if needed & set(n.output):
            keep.append(n)
            needed |= set(n.input)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    infos = {v.name: v for v in g.value_info}
    del g.output[:]
    g.output.extend(infos.get(name) or helper.make_tensor_value_info(name, spec.onnx_type, None)
                    for name, spec in zip(node.input, CANDIDATE_SPECS))
    _drop_opset(proto)
    return proto, settings, list(node.input)


def strip_nms(proto: "onnx.ModelProto") -> Tuple["onnx.ModelProto", Optional[NmsSettings]]:
    """The network part of a detection graph (`cut_at_nms`'s copy) and the node's settings: what the precision
    transforms work on, and what `attach_nms` turns back into the detection graph."""
    candidate, settings, _ = cut_at_nms(proto)
    return candidate, settings


def for_onnxruntime(proto: "onnx.ModelProto") -> Tuple["onnx.ModelProto", bool]:
    """In place: the soft-NMS node (its settings validated) moved into the domain onnxruntime-extensions serves,
    without the attributes only TensorRT's parser reads (the extensions' loader rejects unknown ones). Returns
    the graph and whether it has the node."""
    from onnx import helper

    node = find_nms_node(proto.graph)
    if node is None:
        return proto, False
    op.settings_from_node(node)
    keep = [a for a in node.attribute if a.name not in op.TRT_ATTRIBUTE_TYPES]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.domain = ORT_CONTRIB_DOMAIN
    _drop_opset(proto)
    if not any(o.domain == ORT_CONTRIB_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1))
    return proto, True
