"""A TensorRT parseability check that needs no TensorRT: the ops and patterns TensorRT's ONNX parser rejects.

Operator data follows the support matrix of onnx-tensorrt
(https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md, TensorRT 10.x/11.x): ops listed
there as supported, and the restrictions that matter for detection graphs (constant Pad / TopK K / axes,
TopK K <= 3840, Resize modes, QDQ zero points).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import numpy as np

from ..io import load_onnx
from ..nms import op as nms_op
from . import parser_rules
from ..nms.settings import TRT_MAX_TOPK
from .versions import OPS_SINCE, readiness, readiness_line

SUPPORTED_OPS: Set[str] = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DFT DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()) | set(OPS_SINCE)  # those only from some release on: `check` says which TensorRT is ready
RESIZE_MODES = {"nearest", "linear", "cubic"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
# Inputs that TensorRT needs as build-time constants, by op: input index -> what it is.
CONSTANT_INPUTS = {"Pad": {1: "pads"}, "TopK": {1: "K"}, "Slice": {3: "axes"}, "Squeeze": {1: "axes"},
                   "Unsqueeze": {1: "axes"}, "Conv": {1: "weights"}, "ConvTranspose": {1: "weights"},
                   "CumSum": {1: "axis"}}
# Shape-carrying inputs that should be constants in a static-batch graph.
SHAPE_INPUTS = {"Reshape": {1: "shape"}, "Expand": {1: "shape"}, "Tile": {1: "repeats"}}


def graph_report(path) -> Dict:
    """Everything `edet-deploy check` says of a graph, read once: what TensorRT's parser would reject, how it
    turns plugin nodes into plugins, the precision census, and whether it is an edet-deploy detection graph.
    `ok` (exit 0) needs no problem and one of our graphs; `summary` is the line scripts read."""
    from pathlib import Path

    from ..errors import EdetError
    from ..precision.census import census

    path = Path(path)
    model = load_onnx(path)
    try:
        findings = check_trt_compat(model)
    except Exception as e:  # noqa: BLE001 - a malformed file is the user's problem
        raise EdetError(f"cannot read {path} as ONNX: {e}") from None
    foreign = not_ours_reason(model, path)
    ready = tensorrt_readiness(model)
    ok = not findings and foreign is None and any(not why for why in ready.values())
    summary = (f"{path}: {len(findings)} problem(s)" if findings
               else f"{path}: {readiness_line(ready)}" if ok is False and foreign is None
               else f"{path}: OK, nothing TensorRT would reject" if ok
               else f"{path}: nothing TensorRT would reject, but not an edet-deploy detection graph")
    return {"path": str(path), "ok": ok, "edet_graph": foreign is None, "not_ours": foreign,
            "problems": [dict(vars(f), text=str(f)) for f in findings], "plugins": plugin_report(model),
            "precision": census(model), "tensorrt": ready, "tensorrt_line": readiness_line(ready),
            "summary": summary}


def tensorrt_readiness(model) -> Dict[str, List[str]]:
    """For each TensorRT series we build with (10.13, 11.x), why its parser would not import the graph
    ([] = ready), from what the graph needs: its ONNX opset and its ops."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    return readiness([n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")], opset)


def not_ours_reason(model, path) -> Optional[str]:
    """Why `model` is not an edet-deploy detection graph, None when it is: `check` reads any ONNX, and a clean
    parser report on another graph must not read as ready for `build` or `triton-repo`."""
    from ..contract import INPUT_DTYPE, INPUT_LAYOUT, INPUT_NAME, ONNX_TYPES, OUTPUTS
    from ..metadata import ONNX_PROP, sidecar_path

    if not sidecar_path(path).is_file() and ONNX_PROP not in {p.key for p in model.metadata_props}:
        return "it carries no edet-deploy metadata (no JSON beside it, none inside)"
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type.tensor_type.elem_type != ONNX_TYPES[INPUT_DTYPE]:
        return f"its inputs are {[i.name for i in inputs]}, not {INPUT_NAME!r} ({INPUT_DTYPE} {INPUT_LAYOUT})"
    outputs = [o.name for o in model.graph.output]
    if any(n.op_type == nms_op.OP_TYPE for n in model.graph.node) and outputs != list(OUTPUTS):
        return f"its outputs are {outputs}, not {list(OUTPUTS)}"
    return None


@dataclass
class Finding:
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.op} {self.node!r}: {self.message}"


def plugin_report(model) -> List[str]:
    """Lines saying how TensorRT's parser turns each plugin node into a plugin: id, lookup, fields with the
    types the parser gives them, and AOT or JIT."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = load_onnx(model, external_data=False)
    lines = []
    for n in model.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type != nms_op.OP_TYPE:
            continue
        res = parser_rules.resolve(n)
        if res.found is None:
            lines.append(f"plugin node {res.node!r}: TensorRT's parser finds no plugin for it (see below)")
            continue
        lines.append(f"plugin node {res.node!r}: {res.found.plugin_id} version {res.found.version} "
                     f"(found by {res.found_by})")
        lines.append("  fields as the parser builds them: " + "; ".join(str(f) for f in res.fields))
        if res.implementation:
            lines.append(f"  implementation: {res.implementation} ({res.request}; "
                         f"{'node attribute aot' if res.request.startswith('STRICT') else 'network flags of edet-deploy build'})")
            if not res.request.startswith("STRICT"):
                lines.append("  note: no aot attribute on the node: only builds with PREFER_AOT_PYTHON_PLUGINS "
                             "(edet-deploy build) choose AOT; re-export to add aot=1")
        try:
            lines.append(f"  settings: {parser_rules.decoded_settings(res.fields).to_dict()}")
        except Exception:  # noqa: BLE001 - already a finding of check_trt_compat
            pass
    return lines


def check_trt_compat(model, static_batch: Optional[bool] = None) -> List[Finding]:
    """Return what TensorRT 10/11's ONNX parser would reject or a deployment should fix ([] = clean)."""
    import onnx
    from onnx import numpy_helper

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = load_onnx(model)
    g = model.graph
    constants: Dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    constants[n.output[0]] = numpy_helper.to_array(a.t)
    # Build-time constants propagate through Q/DQ and casts (explicit quantization keeps weights as
    # DequantizeLinear(QuantizeLinear(constant)), which TensorRT folds).
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity") and all(
                i in constants for i in n.input if i):
            for o in n.output:
                constants.setdefault(o, np.zeros(0))
    if static_batch is None:
        dim = g.input[0].type.tensor_type.shape.dim[0]
        static_batch = bool(dim.dim_value) and not dim.dim_param
    findings: List[Finding] = []
    for n in g.node:
        def add(msg: str) -> None:
            findings.append(Finding(n.name or n.output[0], f"{n.domain + '::' if n.domain else ''}{n.op_type}", msg))

        if n.domain == nms_op.DOMAIN or n.op_type == nms_op.OP_TYPE:
            problems = parser_rules.resolve(n).problems
            for problem in problems:
                add(problem)
            if not problems:  # TensorRT would take it; is it also what our exporter writes?
                try:
                    nms_op.settings_from_node(n)
                except Exception as e:  # noqa: BLE001 - report, don't raise
                    add(f"not edet-deploy's soft_nms contract: {e}")
            if len(n.input) != 3 or len(n.output) != 4:
                add("the soft_nms plugin takes 3 inputs and gives 4 outputs")
            continue
        if n.domain not in ("", "ai.onnx"):
            add(f"custom domain {n.domain!r}: TensorRT needs a plugin for it")
            continue
        if n.op_type not in SUPPORTED_OPS:
            add("not supported by TensorRT's ONNX parser")
            continue
        for index, what in CONSTANT_INPUTS.get(n.op_type, {}).items():
            if index < len(n.input) and n.input[index] and n.input[index] not in constants:
                add(f"{what} must be a constant (found a computed tensor: dynamic {n.op_type})")
        if static_batch:
            for index, what in SHAPE_INPUTS.get(n.op_type, {}).items():
                if index < len(n.input) and n.input[index] not in constants:
                    add(f"{what} is computed at run time although the graph's shapes are static")
        if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] in constants:
            k = int(np.asarray(constants[n.input[1]]).reshape(-1)[0])
            if k > TRT_MAX_TOPK:
                add(f"K = {k} exceeds TensorRT's TopK limit of {TRT_MAX_TOPK}")
        if n.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            mode = attrs.get("mode", b"nearest").decode()
            coord = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
            if mode not in RESIZE_MODES:
                add(f"Resize mode {mode!r} is not supported")
            if coord not in RESIZE_COORDINATES:
                add(f"Resize coordinate mode {coord!r} is not supported")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = constants.get(n.input[2])
            if zp is None or np.any(zp != 0):
                add("zero point must be a constant 0 (symmetric quantization)")
    return findings
