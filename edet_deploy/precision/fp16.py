"""FP16 conversion: the network (backbone, BiFPN, heads) computes in float16; input normalisation, candidate
selection, sigmoid/exp and box decoding stay float32, with explicit Casts at the boundaries. Input stays
uint8, outputs stay float32."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Set

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NETWORK_PREFIX = "/model/"  # node-name prefix of the torch module `CandidateGraph.model` in the export
FP16_MAX = 65504.0
# Ops converted to float16, and which of their inputs carry float data (None: all float inputs).
FP16_OPS: Dict[str, Optional[Set[int]]] = {
    "Conv": None, "Mul": None, "Add": None, "Sub": None, "Div": None, "Sigmoid": None, "Relu": None,
    "ReduceMean": {0}, "MaxPool": None, "AveragePool": None, "GlobalAveragePool": None, "Resize": {0},
    "Concat": None, "Transpose": None, "Reshape": {0}, "Pad": {0, 2}, "Clip": None, "HardSigmoid": None,
    "HardSwish": None, "Identity": None,
}


def _float_tensors(model: onnx.ModelProto) -> Set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    vi = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    floats = {v.name for v in vi if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    return floats


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = (),
                    prefix: str = NETWORK_PREFIX) -> onnx.ModelProto:
    """Return a copy whose network nodes run in float16 (except the node names in `keep_fp32`)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    keep = set(keep_fp32)
    floats = _float_tensors(model)
    inits = {i.name: i for i in g.initializer}
    # by position: protobuf may hand out a new wrapper object on every access, so id() is no identity
    fp16_nodes = {i for i, n in enumerate(g.node)
                  if n.name.startswith(prefix) and n.op_type in FP16_OPS and n.name not in keep}
    half: Set[str] = set()  # tensors that are float16 after conversion
    casts: Dict[tuple, str] = {}
    new_nodes, new_inits = [], {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast"))
            casts[key] = out
        return casts[key]

    for index, node in enumerate(g.node):
        is16 = index in fp16_nodes
        data_inputs = FP16_OPS.get(node.op_type) if is16 else set()
        for i, name in enumerate(node.input):
            if not name or name not in floats:
                continue
            want16 = is16 and (data_inputs is None or i in data_inputs)
            if name in inits:
                if want16:
                    new_name = f"{name}__fp16"
                    if new_name not in new_inits:
                        arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                        new_inits[new_name] = numpy_helper.from_array(arr, new_name)
                    node.input[i] = new_name
                continue
            if want16 and name not in half:
                node.input[i] = cast(name, TensorProto.FLOAT16)
            elif not want16 and name in half:
                node.input[i] = cast(name, TensorProto.FLOAT)
        new_nodes.append(node)
        if is16:
            half.update(o for o in node.output if o in floats)
    # graph outputs must stay float32
    for out in g.output:
        if out.name in half:
            produced = out.name + "__fp16_value"
            for n in new_nodes:
                n.output[:] = [produced if o == out.name else o for o in n.output]
                n.input[:] = [produced if x == out.name else x for x in n.input]
            new_nodes.append(helper.make_node("Cast", [produced], [out.name], to=TensorProto.FLOAT,
                                              name=f"{out.name}_to_fp32"))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {x for n in g.node for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + [t for name, t in new_inits.items() if name in used])
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def overflow_nodes(model: onnx.ModelProto, feeds: Iterable[Dict[str, np.ndarray]], prefix: str = NETWORK_PREFIX,
                   margin: float = 0.5, bar=None) -> Set[str]:
    """Network nodes whose float32 outputs exceed margin * FP16_MAX on the given inputs: keep them FP32 (one
    `bar` step per feed)."""
    import onnxruntime as ort

    from ..progress import ticking

    model = onnx.ModelProto.FromString(model.SerializeToString())
    floats = _float_tensors(model)
    producer = {o: n.name for n in model.graph.node if n.name.startswith(prefix) for o in n.output if o in floats}
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in producer if t not in existing)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    peak: Dict[str, float] = {}
    for feed in ticking(feeds, bar, "FP16 overflow check"):
        for name, value in zip(names, sess.run(names, feed)):
            if name in producer and value.size:
                peak[name] = max(peak.get(name, 0.0), float(np.abs(value).max()))
    return {producer[t] for t, v in peak.items() if v > margin * FP16_MAX}
