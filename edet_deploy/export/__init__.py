from .graph import CandidateGraph, DEFAULT_PRE_NMS_TOP_K, TRT_MAX_TOPK
from .onnx_export import ExportResult, attach_nms, export_onnx, save_graph

__all__ = ["CandidateGraph", "DEFAULT_PRE_NMS_TOP_K", "TRT_MAX_TOPK", "ExportResult", "attach_nms", "export_onnx",
           "save_graph"]
