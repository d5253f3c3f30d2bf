"""Precision transforms on the ONNX candidate graph (before the soft-NMS node is attached): FP16 conversion
and INT8 calibration into explicit Q/DQ. TensorRT 11 is strongly typed: the graph itself decides precision."""
