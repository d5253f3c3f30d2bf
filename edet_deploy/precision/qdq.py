"""Explicit Q/DQ placement for TensorRT 11 (strongly typed) and the check of its rules.

Placement follows TensorRT's Q/DQ placement recommendations (developer guide, "Q/DQ Layer-Placement
Recommendations"; NVIDIA ModelOpt's ONNX PTQ implements the same):
- quantize the inputs of weighted layers (every Conv, depthwise included): activation per-tensor, weight
  per-channel (axis 0), both symmetric with an int8 zero point 0; biases stay float;
- do not quantize the outputs of weighted layers: a Conv's output reaches int8 only as the input of the next
  Conv, so head outputs feeding sigmoid / box decoding never pass through int8;
- quantize the residual input of an Add only where TensorRT fuses that Add into the Conv producing its other
  input (a quantized Conv whose output feeds nothing else): ModelOpt's "non-residual input" rule.

Scales have the activation's float type: with the FP16 network that is float16, which needs opset >= 19
(QuantizeLinear-19 takes y_scale of x's type, DequantizeLinear-19 outputs its scale's type; TensorRT's
Quantize / Dequantize operators take the scale in the input / output float type). Older opsets would force
float32 scales and a Cast around every Q/DQ pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdetError

QDQ_OPSET = 19
WEIGHTED_OPS = ("Conv",)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16: scales below it lose precision
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
CAST_SUFFIXES = ("__to_fp16", "__to_fp32")
WEIGHT_SUFFIX = "__fp16"


def source_name(tensor: str) -> str:
    """The FP32 graph's name of a tensor of the FP16 twin (casts and converted weights carry a suffix)."""
    for s in CAST_SUFFIXES + (WEIGHT_SUFFIX,):
        if tensor.endswith(s):
            return tensor[: -len(s)]
    return tensor


def _consumers(graph: onnx.GraphProto) -> Dict[str, List[onnx.NodeProto]]:
    out: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _constants(graph: onnx.GraphProto) -> Set[str]:
    names = {i.name for i in graph.initializer}
    names |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return names


def fusible_residual_inputs(graph: onnx.GraphProto, quantized_convs: Iterable[str]) -> Dict[str, int]:
    """Adds that TensorRT fuses into a quantized Conv: {add node name: index of its residual input}.

    An Add is fusible when one input comes straight from a quantized Conv whose output feeds only this Add
    (the Conv's epilogue can do the addition); the other, non-constant input is the residual. When both
    inputs qualify the graph is ambiguous and the Add is left alone (no Q/DQ: it simply runs in float)."""
    quantized = set(quantized_convs)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    constants = _constants(graph) | {i.name for i in graph.input}
    out: Dict[str, int] = {}
    for n in graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(i in constants for i in n.input):
            continue
        fused = []
        for k, name in enumerate(n.input):
            p = producer.get(name)
            if p is not None and p.op_type in WEIGHTED_OPS and p.name in quantized and len(consumers[name]) == 1:
                fused.append(k)
        if len(fused) == 1:
            out[n.name] = 1 - fused[0]
    return out


@dataclass
class QdqPlan:
    """Which tensors get a Q/DQ pair: activation tensors (FP32 names) and the weighted nodes they feed."""
    convs: List[str]
    activations: Set[str] = field(default_factory=set)
    residual_adds: Dict[str, int] = field(default_factory=dict)


def plan_qdq(graph: onnx.GraphProto, quantized_convs: Iterable[str]) -> QdqPlan:
    convs = list(quantized_convs)
    wanted = set(convs)
    plan = QdqPlan(convs)
    for n in graph.node:
        if n.name in wanted:
            plan.activations.add(source_name(n.input[0]))
    plan.residual_adds = fusible_residual_inputs(graph, convs)
    adds = {n.name: n for n in graph.node if n.name in plan.residual_adds}
    for name, k in plan.residual_adds.items():
        plan.activations.add(source_name(adds[name].input[k]))
    return plan


def _scale(amax: np.ndarray, dtype) -> np.ndarray:
    """Symmetric int8 scale amax / 127 in the scale's float type, never zero or subnormal in float16."""
    s = np.asarray(amax, np.float64) / 127.0
    floor = FP16_TINY if dtype == np.float16 else float(np.finfo(np.float32).tiny)
    return np.maximum(s, floor).astype(dtype)


def quantize_weight(w: np.ndarray, scale_dtype) -> Tuple[np.ndarray, np.ndarray]:
    """A weight quantized as TensorRT takes it: symmetric int8 per output channel (axis 0), [-127, 127].
    Returns (int8 values, scales in `scale_dtype`)."""
    w = np.asarray(w, np.float32)
    scale = _scale(np.abs(w.reshape(w.shape[0], -1)).max(axis=1), scale_dtype)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return np.clip(np.round(w / scale.astype(np.float32).reshape(shape)), -127, 127).astype(np.int8), scale


def insert_qdq(model: onnx.ModelProto, quantized_convs: Iterable[str], amax: Mapping[str, float],
               fp32_weights: Mapping[str, np.ndarray]) -> Tuple[onnx.ModelProto, Dict]:
    """Put Q/DQ on the inputs of `quantized_convs` (and on fusible residual Add inputs) of a graph whose
    network may already be FP16. `amax`: calibrated |max| per activation tensor (FP32 names);
    `fp32_weights`: the FP32 graph's initializers (weights are quantized from full precision).
    Returns the model (opset QDQ_OPSET) and counts."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < QDQ_OPSET:
        from onnx import version_converter
        model = version_converter.convert_version(model, QDQ_OPSET)
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    plan = plan_qdq(g, quantized_convs)
    missing = sorted(t for t in plan.activations if t not in amax)
    if missing:
        raise EdetError(f"no calibrated range for {len(missing)} tensor(s), e.g. {missing[0]}: recalibrate")
    new_inits: List[onnx.TensorProto] = []
    dq_of: Dict[str, str] = {}  # activation tensor -> its DQ output (one shared pair per tensor)
    before: Dict[int, List[onnx.NodeProto]] = {}  # node index -> Q/DQ nodes to insert in front of it

    def activation(tensor: str, index: int) -> str:
        if tensor in dq_of:
            return dq_of[tensor]
        ftype = types.get(tensor)
        if ftype not in NP_TYPES:
            raise EdetError(f"cannot quantize {tensor}: not a float16/float32 tensor")
        scale = f"{tensor}_scale"
        zp = f"{tensor}_zero_point"
        new_inits.append(numpy_helper.from_array(_scale(amax[source_name(tensor)], NP_TYPES[ftype]), scale))
        new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zp))
        q, dq = f"{tensor}_QuantizeLinear", f"{tensor}_DequantizeLinear"
        before.setdefault(index, []).extend([
            helper.make_node("QuantizeLinear", [tensor, scale, zp], [q + "_Output"], name=q),
            helper.make_node("DequantizeLinear", [q + "_Output", scale, zp], [dq + "_Output"], name=dq)])
        dq_of[tensor] = dq + "_Output"
        return dq_of[tensor]

    wanted = set(plan.convs)
    w_dq: Dict[str, str] = {}
    for index, n in enumerate(g.node):
        if n.name in wanted:
            n.input[0] = activation(n.input[0], index)
            w_name = n.input[1]
            if w_name in w_dq:  # weights shared by several Convs (the heads, across levels): one DQ
                n.input[1] = w_dq[w_name]
                continue
            w = np.asarray(fp32_weights[source_name(w_name)], np.float32)
            q, scale = quantize_weight(w, NP_TYPES[types.get(w_name, TensorProto.FLOAT)])
            base = source_name(w_name)
            new_inits += [numpy_helper.from_array(q, f"{base}_quantized"),
                          numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{base}_zero_point")]
            dq = f"{base}_DequantizeLinear"
            before.setdefault(index, []).append(helper.make_node(
                "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"], [dq + "_Output"],
                name=dq, axis=0))
            n.input[1] = w_dq[w_name] = dq + "_Output"
        elif n.name in plan.residual_adds:
            k = plan.residual_adds[n.name]
            n.input[k] = activation(n.input[k], index)
    nodes = []
    for index, n in enumerate(g.node):
        nodes.extend(before.get(index, []))
        nodes.append(n)
    # A Q/DQ pair shared by several consumers must sit in front of the first one: topological order holds
    # because each pair was inserted before the first consumer in graph order.
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + [i for i in new_inits if i.name in used])
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    return model, {"quantized_convs": len(wanted), "quantized_weights": len(w_dq), "qdq_activations": len(dq_of),
                   "residual_adds": len(plan.residual_adds), "opset": QDQ_OPSET}


# -- the rules, checked -----------------------------------------------------------------------------------

def qdq_violations(proto: onnx.ModelProto) -> List[str]:
    """Every way the graph departs from the placement rules above ([] = it follows them)."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    problems: List[str] = []

    def const(name: str) -> Optional[np.ndarray]:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            problems.append(f"{n.name}: no constant zero point (the default is uint8, asymmetric)")
        elif zp.dtype != np.int8 or np.any(zp != 0):
            problems.append(f"{n.name}: zero point must be int8 0 (symmetric), got {zp.dtype} {zp.ravel()[:4]}")
        scale = const(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale is not a constant")
        elif not np.all(np.isfinite(scale.astype(np.float32))) or np.any(scale <= 0):
            problems.append(f"{n.name}: scale must be finite and positive")
    for n in qdq:
        if n.op_type != "QuantizeLinear":
            continue
        p = producer.get(n.input[0])
        for dq in consumers.get(n.output[0], []):
            if dq.op_type != "DequantizeLinear":
                problems.append(f"{n.name}: QuantizeLinear must feed a DequantizeLinear, feeds {dq.op_type}")
                continue
            for c in consumers.get(dq.output[0], []):
                if c.op_type in WEIGHTED_OPS and c.input[0] == dq.output[0]:
                    continue  # input of a weighted layer
                if c.op_type == "Add" and dq.output[0] in c.input:
                    other = c.input[1 - list(c.input).index(dq.output[0])]
                    q = producer.get(other)
                    if q is not None and q.op_type in WEIGHTED_OPS and _is_int8_weighted(q, producer) \
                            and len(consumers.get(other, [])) == 1:
                        continue  # residual input of an Add that TensorRT fuses into that Conv
                what = f"{p.op_type} {p.name!r} output" if p is not None else f"tensor {n.input[0]!r}"
                if p is not None and p.op_type in WEIGHTED_OPS:
                    problems.append(f"{what} is quantized and feeds {c.op_type} {c.name!r}: quantize the inputs "
                                    f"of weighted layers, not their outputs")
                else:
                    problems.append(f"{what} is quantized for {c.op_type} {c.name!r}, which TensorRT does not "
                                    f"fuse with Q/DQ there (it would add a int8 round trip)")
    for conv in (n for n in g.node if n.op_type in WEIGHTED_OPS):
        w = producer.get(conv.input[1])
        x = producer.get(conv.input[0])
        if len(conv.input) > 2 and conv.input[2] and (producer.get(conv.input[2]) is not None
                                                        and producer[conv.input[2]].op_type == "DequantizeLinear"):
            problems.append(f"{conv.name}: bias must stay float (TensorRT fuses it), found a DequantizeLinear")
        w_q = w is not None and w.op_type == "DequantizeLinear"
        x_q = x is not None and x.op_type == "DequantizeLinear"
        if w_q != x_q:
            problems.append(f"{conv.name}: {'weight' if w_q else 'input'} quantized but not its "
                            f"{'input' if w_q else 'weight'} (TensorRT would run it in float with a Q/DQ round trip)")
        if w_q:
            scale, weight = const(w.input[1]), const(w.input[0])
            wq = producer.get(w.input[0])
            if weight is None and wq is not None and wq.op_type == "QuantizeLinear":
                weight = const(wq.input[0])  # float weight quantized in the graph (TensorRT folds it)
            elif weight is not None and weight.dtype != np.int8:
                problems.append(f"{conv.name}: quantized weight must be int8, got {weight.dtype}")
            axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
            if scale is None or weight is None or scale.size != weight.shape[0] or axis != 0:
                problems.append(f"{conv.name}: weight is not per-channel quantized (one scale per output channel)")
        if x_q:
            scale = const(x.input[1])
            if scale is not None and scale.size != 1:
                problems.append(f"{conv.name}: activation must be quantized per tensor")
    return problems


def _is_int8_weighted(node: onnx.NodeProto, producer: Dict[str, onnx.NodeProto]) -> bool:
    x, w = producer.get(node.input[0]), producer.get(node.input[1])
    return all(p is not None and p.op_type == "DequantizeLinear" for p in (x, w))


def check_qdq(proto: onnx.ModelProto) -> Dict[str, int]:
    """Verify the Q/DQ placement rules; raises EdetError listing the violations, else returns counts."""
    problems = qdq_violations(proto)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise EdetError(f"{len(problems)} Q/DQ rule violation(s): {'; '.join(problems[:5])}{more}")
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type in WEIGHTED_OPS]
    per_channel = sum(1 for c in convs if producer.get(c.input[1]) is not None
                      and producer[c.input[1]].op_type == "DequantizeLinear")
    qdq = sum(1 for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return {"qdq_nodes": qdq, "per_channel_convs": per_channel, "convs": len(convs)}
