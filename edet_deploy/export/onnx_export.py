"""PyTorch -> ONNX: one detection graph for every runtime (ONNX Runtime on CPU, TensorRT on GPU)."""
from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import onnx

from ..artifacts import ExportResult, save_graph
from ..configs import get_config
from ..contract import CANDIDATES, EXPORT_OPSETS, INPUT_NAME, artifact_name
from ..errors import EdetError
from ..log import logger
from ..metadata import build_metadata
from ..nms import NmsSettings
from ..nms.graph import attach_nms
from .graph import DEFAULT_PRE_NMS_TOP_K, TRT_MAX_TOPK, CandidateGraph



def graph_name(variant: str, nms: bool = True) -> str:
    return artifact_name(variant, nms=nms)


def export_onnx(name: str, out_dir: str | Path, *, weights: Optional[str] = None, num_classes: Optional[int] = None,
                image_size: Optional[int] = None, batch: int = 1, dynamic_batch: Optional[int] = None,
                opset: int = 17, nms: Optional[NmsSettings] = NmsSettings(),
                pre_nms_top_k: int = DEFAULT_PRE_NMS_TOP_K, class_names: Optional[Sequence[str]] = None,
                simplify: bool = True, filename: Optional[str] = None, progress: bool = False) -> ExportResult:
    """Export a variant to `out_dir/<filename or efficientdet_dN>.onnx` plus its metadata JSON.

    `nms=None` stops at the decoded candidates (`--nms none`). Weights may be ours (their metadata supplies
    class count, input size and class names) or effdet's; without weights the network is randomly initialised.
    `progress` shows a bar of the export's stages on stderr for the large variants (D3 and up: minutes)."""
    import torch

    from ..model import create_model
    from ..model.weights import checkpoint_metadata

    ckpt_meta = checkpoint_metadata(weights) if weights else {}
    if ckpt_meta.get("variant") and get_config(name).name != ckpt_meta["variant"]:
        raise EdetError(f"weights {weights} are for {ckpt_meta['variant']}, not {name}")
    if num_classes and ckpt_meta.get("num_classes") and num_classes != ckpt_meta["num_classes"]:
        raise EdetError(f"weights {weights} detect {ckpt_meta['num_classes']} classes, not --num-classes "
                        f"{num_classes} (leave it out: the weights say)")
    # None: the weights' class head says (effdet .pth files carry no metadata), else 90 (create_model).
    num_classes = num_classes or ckpt_meta.get("num_classes") or (None if weights else 90)
    image_size = image_size or ckpt_meta.get("image_size")
    class_names = list(class_names or ckpt_meta.get("class_names") or [])
    if class_names and num_classes and len(class_names) != num_classes:
        raise EdetError(f"{len(class_names)} class names given for {num_classes} classes")
    if pre_nms_top_k > TRT_MAX_TOPK:
        raise EdetError(f"pre_nms_top_k {pre_nms_top_k} exceeds TensorRT's TopK limit {TRT_MAX_TOPK}")
    if dynamic_batch is not None and dynamic_batch < 1 or batch < 1:
        raise EdetError("batch sizes must be >= 1")
    if not EXPORT_OPSETS[0] <= opset <= EXPORT_OPSETS[1]:
        raise EdetError(f"opset {opset} is not supported ({EXPORT_OPSETS[0]}..{EXPORT_OPSETS[1]})")

    from tqdm import tqdm

    t0 = time.perf_counter()
    # Even D0 takes seconds here (minutes from D3 on): every export shows its stages.
    bar = tqdm(total=4, desc=f"export {name}", unit="stage", leave=False, disable=not progress)
    bar.set_postfix_str("build model")
    model = create_model(name, num_classes=num_classes, weights=weights, image_size=image_size)
    cfg = model.config
    if class_names and len(class_names) != cfg.num_classes:
        raise EdetError(f"{len(class_names)} class names given for {cfg.num_classes} classes")
    graph = CandidateGraph(model, pre_nms_top_k).eval()
    size = cfg.image_size
    example = torch.zeros(batch if dynamic_batch is None else min(2, dynamic_batch), size, size, 3, dtype=torch.uint8)
    buf = io.BytesIO()
    bar.update(1)
    bar.set_postfix_str("trace")
    dyn = {INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in CANDIDATES}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constant folding and list outputs
        torch.onnx.export(graph, (example,), buf, opset_version=opset, dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(CANDIDATES), dynamic_axes=dyn, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    logger.info("traced %s in %.1f s (%d nodes)", cfg.name, time.perf_counter() - t0, len(proto.graph.node))
    bar.update(1)
    bar.set_postfix_str("simplify")
    if simplify:
        proto = simplify_graph(proto)
    if nms is not None:
        proto = attach_nms(proto, nms)
    bar.update(1)
    bar.set_postfix_str("save")

    meta = build_metadata(variant=cfg.name, image_size=size, num_classes=cfg.num_classes, class_names=class_names,
                          mean=cfg.mean, std=cfg.std, opset=opset, batch=batch, dynamic_batch=dynamic_batch,
                          outputs=[o.name for o in proto.graph.output], nms=nms, pre_nms_top_k=graph.top_k,
                          weights=weights)
    out_dir = Path(out_dir)
    onnx_path = out_dir / f"{filename or graph_name(cfg.name, nms is not None)}.onnx"
    result = save_graph(proto, onnx_path, meta)
    bar.update(1)
    bar.close()
    logger.info("exported %s (%.1f s)", onnx_path, time.perf_counter() - t0)
    return result


def simplify_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    before = len(proto.graph.node)
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        logger.warning("onnxsim could not validate the simplified graph; keeping the original")
        return proto
    simplified = constants_to_initializers(simplified)
    logger.info("onnxsim: %d -> %d nodes", before, len(simplified.graph.node))
    return simplified


def constants_to_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn tensor-valued Constant nodes into initializers: quantizers and TensorRT's parser look for weights
    there (onnxsim leaves some folded weights as Constant nodes)."""
    g = proto.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 \
                and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return proto


