"""Precision census: the share of a graph's multiply-adds that TensorRT 11 would run in int8 / fp16 / fp32.

Under strong typing the graph's types are the engine's precisions, so the census is read from the ONNX alone:
MACs of every Conv / ConvTranspose / MatMul / Gemm from the inferred shapes, each counted in int8 when both its
data input and its weight come from a DequantizeLinear of int8 (TensorRT fuses the pair into an int8 kernel),
otherwise in its input's float type. It is the CPU-side proxy for GPU speed until an engine can be timed."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto

MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FLOAT_NAMES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
               TensorProto.DOUBLE: "fp64"}
PRECISIONS = ("int8", "fp16", "fp32")


def _dims(vi) -> Optional[list]:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    # a symbolic (batch) dimension counts as 1: the census is per image
    return [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]


def _macs(node: onnx.NodeProto, shape) -> int:
    if node.op_type in ("Conv", "ConvTranspose"):
        w, y, x = shape(node.input[1]), shape(node.output[0]), shape(node.input[0])
        if not w or not y:
            return 0
        if node.op_type == "Conv":  # each output element: Cin/group * kernel MACs
            return int(np.prod(y[1:], dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        return int(np.prod(x[1:], dtype=np.int64) * np.prod(w[1:], dtype=np.int64)) if x else 0
    a, y = shape(node.input[0]), shape(node.output[0])
    if not a or not y:
        return 0
    if node.op_type == "Gemm":
        trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    else:
        k = a[-1]
    return int(np.prod(y, dtype=np.int64) * k)


def census(model: Union[onnx.ModelProto, str, Path]) -> Dict:
    """{'int8': share, 'fp16': share, 'fp32': share, 'gmacs': total, 'macs': {precision: MACs},
    'nodes': {precision: count}} over the graph's weighted layers (shares in [0, 1])."""
    if not isinstance(model, onnx.ModelProto):
        from ..io import load_onnx
        model = load_onnx(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a custom op's missing schema must not stop the count
        inferred = model
    g = inferred.graph
    infos = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def shape(name: str):
        if name in inits:
            return list(inits[name].dims)
        return _dims(infos.get(name))

    def elem_type(name: str) -> int:
        if name in inits:
            return inits[name].data_type
        vi = infos.get(name)
        return vi.type.tensor_type.elem_type if vi is not None else TensorProto.UNDEFINED

    def int8_dq(name: str) -> bool:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        return elem_type(dq.input[0]) == TensorProto.INT8

    macs: Dict[str, int] = {p: 0 for p in PRECISIONS}
    nodes: Dict[str, int] = {p: 0 for p in PRECISIONS}
    for n in g.node:
        if n.op_type not in MAC_OPS:
            continue
        if int8_dq(n.input[0]) and int8_dq(n.input[1]):
            prec = "int8"
        else:
            prec = FLOAT_NAMES.get(elem_type(n.input[0]), "other")
        macs[prec] = macs.get(prec, 0) + _macs(n, shape)
        nodes[prec] = nodes.get(prec, 0) + 1
    total = sum(macs.values())
    out: Dict = {p: (macs.get(p, 0) / total if total else 0.0) for p in macs}
    out.update({"gmacs": round(total / 1e9, 4), "macs": macs, "nodes": nodes})
    return out


def format_census(c: Dict) -> str:
    """One line: 'precision census: int8 99.8% | fp16 0.2% | fp32 0.0% of 0.41 GMAC (214 Conv/MatMul/Gemm)'."""
    parts = [f"{p} {100 * c.get(p, 0.0):.1f}%" for p in PRECISIONS]
    parts += [f"{p} {100 * c[p]:.1f}%" for p in c["macs"] if p not in PRECISIONS and c["macs"][p]]
    return (f"precision census (share of multiply-adds): {' | '.join(parts)} of {c['gmacs']:.3g} GMAC per image "
            f"({sum(c['nodes'].values())} weighted layers)")
