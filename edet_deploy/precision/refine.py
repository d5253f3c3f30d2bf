"""Output-aware refinement of calibrated thresholds. Entropy calibration picks each activation's clipping
threshold from that tensor's own histogram. What the network loses is the error at the output of the layer the
tensor feeds, and the two disagree where rounding noise, not clipping, dominates: at the input of the box head's
last layer every rounding error goes straight into the box codes, and clipping harder cuts that noise more than
it costs in clipped values (the threshold the histogram picks cost ~2.5 mAP points there).

So each threshold is tightened by the factor in `GRID` (never widened: the histogram's threshold is the upper
bound) that minimises the squared error of the layer it feeds, on a few calibration images, with the tensor and
the layer's weights quantized as the INT8 graph quantizes them. The layer is the Conv the tensor feeds or, for a
depthwise Conv whose output feeds one quantized Conv, the separable pair (EfficientDet's SeparableConv2d; the
pair's middle tensor at its own threshold). At the heads' last layers (box codes and class logits) the error of
each position is weighted by the FP32 class confidence there: the box codes of background anchors are never
decoded into a detection. Labels are not used; ranges of other tensors are left as they are."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .equalize import tensor_session
from .qdq import _consumers, _scale, fusible_residual_inputs, quantize_weight

if TYPE_CHECKING:
    import torch

GRID = tuple(round(0.4 + 0.05 * i, 2) for i in range(13))  # 0.4 .. 1.0
HEAD_PREDICT = ("/box_net/predict/", "/class_net/predict/")
CLASS_PREDICT = "/class_net/predict/"


def _attrs(n: onnx.NodeProto) -> Dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _supported(node: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> bool:
    """A 2-D Conv with explicit pads and its weights (and bias) as initializers: what `_Conv` computes."""
    a = _attrs(node)
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    bias_ok = len(node.input) < 3 or not node.input[2] or node.input[2] in inits
    return (w is not None and w.ndim == 4 and bias_ok
            and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


class _Conv:
    """One ONNX Conv in torch, with its weights in FP32 and quantized per output channel as qdq.py does
    (scales in `scale_dtype`: float16 for the INT8 twin, whose network is FP16)."""

    def __init__(self, node: onnx.NodeProto, inits: Mapping[str, np.ndarray], scale_dtype=np.float16):
        import torch

        a = _attrs(node)
        self.name, self.input = node.name, node.input[0]
        w = np.array(inits[node.input[1]], np.float32)
        q, scale = quantize_weight(w, scale_dtype)
        self.w = torch.from_numpy(w)
        self.wq = torch.from_numpy(q.astype(np.float32) * scale.astype(np.float32).reshape(-1, 1, 1, 1))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        self.b = torch.from_numpy(np.array(inits[bias], np.float32)) if bias else None
        pads = list(a.get("pads", [0, 0, 0, 0]))
        self.pre_pad = (pads[1], pads[3], pads[0], pads[2]) if pads[:2] != pads[2:] else None
        self.padding = (0, 0) if self.pre_pad else tuple(pads[:2])
        self.stride = tuple(a.get("strides", [1, 1]))
        self.dilation = tuple(a.get("dilations", [1, 1]))
        self.group = int(a.get("group", 1))

    def __call__(self, x, quantized: bool):
        import torch.nn.functional as F
        if self.pre_pad:
            x = F.pad(x, self.pre_pad)
        return F.conv2d(x, self.wq if quantized else self.w, self.b, self.stride, self.padding, self.dilation,
                        self.group)


def _fake_quant(x, amax: float, scale_dtype=np.float16):
    """QuantizeLinear -> DequantizeLinear as ONNX defines them (ties to even, saturation to [-128, 127]), with
    the scale qdq.py writes."""
    import torch
    scale = torch.tensor(float(_scale(amax, scale_dtype)), dtype=torch.float32)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def _confidence_by_size(logits: Sequence[np.ndarray]) -> Dict[Tuple[int, ...], "torch.Tensor"]:
    """FP32 class confidence per position (max over anchors and classes) of each pyramid level, keyed by the
    level's spatial size. A size shared by two levels, or a level with no confident position, weighs nothing:
    its layers fall back to the plain error."""
    import torch
    by_size: Dict[Tuple[int, ...], List] = {}
    for v in logits:
        by_size.setdefault(tuple(v.shape[2:]), []).append(torch.sigmoid(torch.from_numpy(v)).amax(1, keepdim=True))
    return {size: w[0] for size, w in by_size.items() if len(w) == 1 and float(w[0].sum()) > 0}


def refine_thresholds(candidate: onnx.ModelProto, amax: Mapping[str, float], quantized_convs: Iterable[str],
                      feeds: Sequence[Mapping[str, np.ndarray]], grid: Sequence[float] = GRID,
                      scale_dtype=np.float16, bar=None) -> Tuple[Dict[str, float], Dict]:
    """`amax` with the input threshold of every Conv in `quantized_convs` tightened as the module says, measured
    on `feeds` (graph inputs) of the FP32 `candidate`. A tensor that is also the residual input of a fused Add
    (one Q/DQ pair serves both) counts the Add's error too: its own quantization error. Convs `_Conv` cannot
    compute (not 2-D, auto_pad, weights not initializers) keep their input's threshold. Returns (ranges, info)."""
    import torch

    from ..progress import ticking

    g = candidate.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers = _consumers(g)
    quantized = set(quantized_convs)
    nodes = {n.name: n for n in g.node}
    convs = {n.name: _Conv(n, inits, scale_dtype) for n in g.node if n.name in quantized and _supported(n, inits)}

    def layer(conv: str) -> List[_Conv]:
        n = nodes[conv]
        nxt = consumers.get(n.output[0], [])
        if (convs[conv].group > 1 and len(nxt) == 1 and nxt[0].name in convs and nxt[0].input[0] == n.output[0]
                and amax.get(n.output[0], 0.0) > 0):
            return [convs[conv], convs[nxt[0].name]]
        return [convs[conv]]

    users: Dict[str, List[List[_Conv]]] = {}
    unsupported = {nodes[name].input[0] for name in quantized if name not in convs}
    for name in sorted(convs):
        t = nodes[name].input[0]
        if amax.get(t, 0.0) > 0 and t not in unsupported:
            users.setdefault(t, []).append(layer(name))
    residual = {nodes[add].input[k] for add, k in fusible_residual_inputs(g, quantized).items()} & set(users)
    # the class head's logits: the output of its last Conv (quantized or kept in float)
    confidence = [n.output[0] for n in g.node if n.op_type == "Conv" and CLASS_PREDICT in n.name
                  and not any(c.op_type == "Conv" for c in consumers.get(n.output[0], []))]
    tensors = sorted(users)
    session = tensor_session(candidate, tensors + confidence)
    errors = {t: np.zeros(len(grid)) for t in tensors}
    with torch.inference_mode():
        # one image at a time: a large model's activations of many images do not fit
        for feed in ticking(feeds, bar, "refining thresholds"):
            values = dict(zip(tensors + confidence, session.run(tensors + confidence, dict(feed))))
            weights = _confidence_by_size([values[c] for c in confidence])
            for t in tensors:
                x = torch.from_numpy(values[t])
                for convs_of_layer in users[t]:
                    ref = x
                    for c in convs_of_layer:
                        ref = c(ref, False)
                    w = weights.get(tuple(ref.shape[2:])) if any(h in convs_of_layer[-1].name
                                                                  for h in HEAD_PREDICT) else None
                    for i, f in enumerate(grid):
                        y = convs_of_layer[0](_fake_quant(x, amax[t] * f, scale_dtype), True)
                        if len(convs_of_layer) == 2:  # the middle tensor at its calibrated threshold
                            y = convs_of_layer[1](_fake_quant(y, amax[convs_of_layer[1].input], scale_dtype), True)
                        d = ((y - ref) ** 2).mean(1, keepdim=True)
                        errors[t][i] += float((d * w).sum() / w.sum() if w is not None else d.mean())
                if t in residual:  # the skip path of a fused Add adds the tensor's own error to the Add's output
                    for i, f in enumerate(grid):
                        errors[t][i] += float(((_fake_quant(x, amax[t] * f, scale_dtype) - x) ** 2).mean())
    refined = dict(amax)
    factors = {}
    for t in tensors:
        factors[t] = float(grid[int(np.argmin(errors[t]))])
        refined[t] = float(amax[t]) * factors[t]
    f = np.array(list(factors.values())) if factors else np.ones(1)
    return refined, {"images": len(feeds), "tensors": len(factors), "with_residual_add": len(residual),
                     "tightened": int((f < 1).sum()),
                     "min_factor": float(f.min()), "median_factor": float(np.median(f))}
