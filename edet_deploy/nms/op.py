"""The `edet::soft_nms` graph node: the one contract between the exporter, the ONNX Runtime custom op and the
TensorRT plugin.

Inputs: candidate_boxes [B,N,4] float32 (x1,y1,x2,y2, input pixels), candidate_scores [B,N] float32,
candidate_classes [B,N] int32. Outputs: num_detections [B,1] int32, detection_boxes [B,K,4] float32,
detection_scores [B,K] float32, detection_classes [B,K] int32 (K = max_detections). Attributes are scalars
only (TensorRT plugin attributes cannot be lists): method (string), sigma, iou_threshold, score_threshold
(float), max_detections, class_agnostic (int); plus `aot` = 1, read by TensorRT's ONNX parser alone: it asks for the
plugin's ahead-of-time implementation (kernel embedded in the engine, no Python at run time) whatever the
builder's network flags, so any Python build that registers the plugin (Polygraphy, a script) gets the same
AOT engine as `edet-deploy build`; the finished engine then runs anywhere (trtexec, Triton) without Python.
"""
from __future__ import annotations

from typing import Dict

from ..contract import CANDIDATE_SPECS, CANDIDATES, OUTPUT_SPECS, OUTPUTS
from .settings import NmsSettings

OP_TYPE = "soft_nms"
DOMAIN = "edet"
OP_VERSION = 1
INPUTS = CANDIDATES  # the node's input order; OUTPUTS, imported with it, is its output order
# ONNX element types of the outputs (onnx.TensorProto values)
OUTPUT_TYPES = {s.name: s.onnx_type for s in OUTPUT_SPECS}
ATTRIBUTE_TYPES = {"method": str, "sigma": float, "iou_threshold": float, "score_threshold": float,
                   "max_detections": int, "class_agnostic": int}
# Attributes for TensorRT's parser, not settings of the op: onnx-tensorrt reads `aot` (1 = STRICT_AOT,
# 0 = STRICT_JIT), `plugin_namespace` and `plugin_version` from the node; other runtimes ignore them.
TRT_ATTRIBUTE_TYPES = {"aot": int, "plugin_namespace": str, "plugin_version": str}
AOT = 1


def node_attributes(settings: NmsSettings) -> Dict[str, object]:
    return {"method": settings.method, "sigma": float(settings.sigma),
            "iou_threshold": float(settings.iou_threshold), "score_threshold": float(settings.score_threshold),
            "max_detections": int(settings.max_detections), "class_agnostic": int(settings.class_agnostic)}


def make_node(settings: NmsSettings, inputs=INPUTS, outputs=OUTPUTS, name: str = "soft_nms"):
    from onnx import helper
    return helper.make_node(OP_TYPE, list(inputs), list(outputs), name=name, domain=DOMAIN,
                            **node_attributes(settings), aot=AOT)


def settings_from_node(node) -> NmsSettings:
    """Read (and validate) the settings of an `edet::soft_nms` node."""
    from onnx import helper

    from ..errors import EdetError
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in TRT_ATTRIBUTE_TYPES}
    unknown = set(attrs) - set(ATTRIBUTE_TYPES)
    if unknown:
        raise EdetError(f"soft_nms node {node.name!r} has unknown attributes {sorted(unknown)}")
    if isinstance(attrs.get("method"), bytes):
        attrs["method"] = attrs["method"].decode()
    for key, typ in ATTRIBUTE_TYPES.items():
        if key in attrs and not isinstance(attrs[key], typ):
            raise EdetError(f"soft_nms attribute {key} must be a scalar {typ.__name__}, got {attrs[key]!r}")
    if "class_agnostic" in attrs:
        attrs["class_agnostic"] = bool(attrs["class_agnostic"])
    return NmsSettings(**attrs)


def register_onnx_schema() -> None:
    """Register the op's schema with onnx so that onnx.checker (full check) validates our nodes."""
    import onnx
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.AttrType
    attr_kind = {str: A.STRING, float: A.FLOAT, int: A.INT}
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, OP_VERSION, doc=__doc__ or "",
        inputs=[P(s.name, "I" if s.dtype == "int32" else "T") for s in CANDIDATE_SPECS],
        outputs=[P(s.name, "I" if s.dtype == "int32" else "T") for s in OUTPUT_SPECS],
        type_constraints=[("T", ["tensor(float)"], "boxes and scores"), ("I", ["tensor(int32)"], "counts, classes")],
        attributes=[defs.OpSchema.Attribute(k, attr_kind[t], "", required=False)
                    for k, t in {**ATTRIBUTE_TYPES, **TRT_ATTRIBUTE_TYPES}.items()],
    )
    defs.register_schema(schema)
    del onnx
