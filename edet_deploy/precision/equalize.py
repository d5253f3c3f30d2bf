"""Channel equalization before INT8 calibration (SmoothQuant's migration, Xiao et al. 2023, applied where the
network is linear: a depthwise Conv feeding a pointwise Conv, nothing between them). TensorRT quantizes
activations per tensor and weights per channel. In the box head's last layer the depthwise output has a few
channels 30-40x wider than the median one, so one per-tensor scale leaves most channels a handful of int8
levels. Scaling channel i of the depthwise output by 1/s_i and the pointwise Conv's input channel i by s_i
computes the same function in FP32, and with s_i = sqrt(a_i / w_i) (a_i: the activation's range, w_i: the
pointwise weights' range on that channel) both sides share the spread. The depthwise weights stay exact in
int8 since they are quantized per channel.

The rewritten graph is the FP32 graph with other weights: calibration, placement and the TensorRT path are the
same. A depthwise Conv reused across pyramid levels (shared weights) gets one scale from all its levels."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fp16 import NETWORK_PREFIX
from .qdq import _consumers

ALPHA = 0.5  # SmoothQuant's migration strength: 0.5 splits the spread evenly between activation and weights
MIN_INPUT_SPREAD = 8.0  # a depthwise input gets a scaling Mul only this uneven (the box head's last layer: 12-32x)


def _is_depthwise(n: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    group = next((a.i for a in n.attribute if a.name == "group"), 1)
    w = inits.get(n.input[1]) if len(n.input) > 1 else None
    return group > 1 and w is not None and w.dims[0] == group and w.dims[1] == 1


def _depthwise_by_weight(g: onnx.GraphProto, inits: Mapping[str, onnx.TensorProto]
                         ) -> Dict[str, List[onnx.NodeProto]]:
    """Network depthwise Convs by weight initializer (a head's Conv reused across pyramid levels shares one)."""
    by_weight: Dict[str, List[onnx.NodeProto]] = {}
    for n in g.node:
        if n.op_type == "Conv" and n.name.startswith(NETWORK_PREFIX) and _is_depthwise(n, inits):
            by_weight.setdefault(n.input[1], []).append(n)
    return by_weight


def equalization_groups(proto: onnx.ModelProto) -> List[Tuple[List[onnx.NodeProto], List[onnx.NodeProto]]]:
    """(depthwise Convs sharing one weight, the pointwise Convs they feed) for every network pair whose
    depthwise output goes to one plain Conv only and whose pointwise weights belong to that group alone."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers = _consumers(g)
    outputs = {o.name for o in g.output}

    def pointwise(dw: onnx.NodeProto) -> Optional[onnx.NodeProto]:
        nxt = consumers.get(dw.output[0], [])
        pw = nxt[0] if len(nxt) == 1 else None
        ok = (pw is not None and pw.op_type == "Conv" and dw.output[0] not in outputs and pw.input[0] == dw.output[0]
              and pw.input[1] in inits and next((a.i for a in pw.attribute if a.name == "group"), 1) == 1
              and len(dw.input) == 2)  # a depthwise bias would need scaling too; ours have none
        return pw if ok else None

    groups = []
    for dws in _depthwise_by_weight(g, inits).values():
        pws = [pointwise(dw) for dw in dws]
        # a pointwise weight shared with nodes outside the group could not take the group's scales
        if all(pws) and all(len(consumers[w]) == sum(p.input[1] == w for p in pws) for w in {p.input[1] for p in pws}):
            groups.append((dws, pws))
    return groups


def tensor_session(proto: onnx.ModelProto, tensors: Sequence[str]):
    """An ONNX Runtime (CPU) session of a copy of the FP32 graph whose outputs are `tensors`, in that order."""
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(proto.SerializeToString())
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def channel_ranges(proto: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]],
                   bar=None) -> Dict[str, np.ndarray]:
    """max |x| per channel (axis 1) of each tensor over `feeds`, in ONNX Runtime (one `bar` step per feed)."""
    from ..progress import ticking

    session = tensor_session(proto, tensors)
    out: Dict[str, np.ndarray] = {}
    for feed in ticking(feeds, bar, "equalizing channels"):
        for t, v in zip(tensors, session.run(list(tensors), dict(feed))):
            r = np.abs(np.asarray(v, np.float32)).max(axis=tuple(i for i in range(v.ndim) if i != 1))
            out[t] = np.maximum(out[t], r) if t in out else r
    return out


def depthwise_groups(proto: onnx.ModelProto) -> List[List[onnx.NodeProto]]:
    """Network depthwise Convs grouped by shared weight, each input produced by a node and read by it alone."""
    g = proto.graph
    consumers = _consumers(g)
    produced = {o for n in g.node for o in n.output}
    return [dws for dws in _depthwise_by_weight(g, {i.name: i for i in g.initializer}).values()
            if all(dw.input[0] in produced and len(consumers[dw.input[0]]) == 1 and len(dw.input) == 2 for dw in dws)]


def _equalize_inputs(model: onnx.ModelProto, groups: Sequence[List[onnx.NodeProto]],
                     ranges: Mapping[str, np.ndarray], min_spread: float = MIN_INPUT_SPREAD) -> int:
    """In place: where a depthwise Conv's input has channels wider than `min_spread` x the median one (after a
    SiLU, which no scale passes through), put a per-channel Mul by 1/s_i in front of it and multiply its weights
    by s_i, s_i = the channel's range (floored at 1/100 of the widest): every channel then spans the same int8
    range. The depthwise weights are quantized per channel, so they lose nothing. Returns Convs rewritten."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    inserts: Dict[str, onnx.NodeProto] = {}
    for dws in groups:
        a = np.max([ranges[dw.input[0]] for dw in dws], axis=0).astype(np.float64)
        if a.max() <= 0 or a.max() < min_spread * np.median(a):
            continue
        s = np.maximum(a, a.max() / 100)
        s /= np.exp(np.mean(np.log(s)))
        w_name = dws[0].input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
        inits[w_name].CopyFrom(numpy_helper.from_array((w * s.reshape(-1, 1, 1, 1)).astype(np.float32), w_name))
        inv = f"{w_name}__equalize_inverse"
        g.initializer.append(numpy_helper.from_array((1 / s).reshape(1, -1, 1, 1).astype(np.float32), inv))
        for dw in dws:
            out = f"{dw.input[0]}__equalized"
            inserts[dw.name] = helper.make_node("Mul", [dw.input[0], inv], [out], name=f"{dw.name}/equalize/Mul")
            dw.input[0] = out
    nodes = []
    for n in g.node:
        if n.name in inserts:
            nodes.append(inserts[n.name])
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return len(inserts)


def equalize(proto: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], alpha: float = ALPHA,
             bar=None) -> Tuple[onnx.ModelProto, Dict]:
    """A copy of the FP32 graph `proto` with the inputs of depthwise Convs (`_equalize_inputs`) and every
    depthwise -> pointwise pair equalized on `feeds`. Returns (model, info: Convs rewritten, widest channel
    spread of a depthwise output before and after)."""
    model = onnx.ModelProto.FromString(proto.SerializeToString())
    input_groups, groups = depthwise_groups(model), equalization_groups(model)
    # One pass measures both: the input step leaves every depthwise output as it was (same FP32 function).
    tensors = [dw.input[0] for dws in input_groups for dw in dws] + [dw.output[0] for dws, _ in groups for dw in dws]
    ranges = channel_ranges(model, tensors, feeds, bar) if tensors else {}
    inputs = _equalize_inputs(model, input_groups, ranges)
    if not groups:
        return model, {"pairs": 0, "inputs": inputs}
    inits = {i.name: i for i in model.graph.initializer}
    spread_before, spread_after, pairs = [], [], 0
    for dws, pws in groups:
        a = np.max([ranges[dw.output[0]] for dw in dws], axis=0).astype(np.float64)
        pw_weights = {p.input[1]: numpy_helper.to_array(inits[p.input[1]]).astype(np.float64) for p in pws}
        w = np.max([np.abs(v).max(axis=(0, 2, 3)) for v in pw_weights.values()], axis=0)
        s = np.ones_like(a)
        live = (a > 0) & (w > 0)
        s[live] = a[live] ** alpha / w[live] ** (1 - alpha)
        s[live] /= np.exp(np.mean(np.log(s[live])))  # geometric mean 1: the overall magnitude stays put
        dw_name = dws[0].input[1]
        dw_w = numpy_helper.to_array(inits[dw_name]).astype(np.float64)
        inits[dw_name].CopyFrom(numpy_helper.from_array((dw_w / s.reshape(-1, 1, 1, 1)).astype(np.float32), dw_name))
        for name, v in pw_weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((v * s.reshape(1, -1, 1, 1)).astype(np.float32), name))
        med = np.median(a[live]) if live.any() else 1.0
        spread_before.append(float(a.max() / med) if med else 1.0)
        after = a / s
        spread_after.append(float(after.max() / np.median(after[live])) if live.any() else 1.0)
        pairs += len(dws)
    return model, {"pairs": pairs, "inputs": inputs, "groups": len(groups), "images": len(feeds),
                   "max_channel_spread_before": round(max(spread_before), 1),
                   "max_channel_spread_after": round(max(spread_after), 1)}
