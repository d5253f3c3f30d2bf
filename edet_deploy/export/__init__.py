from ..artifacts import ExportResult, save_graph
from ..nms.graph import attach_nms
from .graph import CandidateGraph, DEFAULT_PRE_NMS_TOP_K, TRT_MAX_TOPK
from .onnx_export import export_onnx

__all__ = ["CandidateGraph", "DEFAULT_PRE_NMS_TOP_K", "TRT_MAX_TOPK", "ExportResult", "attach_nms", "export_onnx",
           "save_graph"]
