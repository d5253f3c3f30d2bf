"""INT8 sensitivity: which blocks cost the most mAP when quantized. Each block (backbone stage, BiFPN cell,
class head, box head) is kept in float (FP16: the INT8 twin is built on the FP16 one) in turn, the rest
quantized, and mAP measured on a small set; the blocks that recover the most are kept in float until the loss
against FP32 is within the budget."""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional

import onnx

from ..log import logger
from .fp16 import NETWORK_PREFIX

if TYPE_CHECKING:
    from ..artifacts import ExportResult


def block_of(node_name: str) -> str:
    """'/model/backbone/blocks.3/blocks.3.1/conv_pw/Conv' -> 'backbone/blocks.3'; heads and cells likewise."""
    rest = node_name[len(NETWORK_PREFIX):]
    m = re.match(r"(backbone/blocks\.\d+|backbone/conv_stem|fpn/cell\.\d+|fpn/resample\.\d+|class_net|box_net)", rest)
    return m.group(1) if m else rest.split("/")[0]


def conv_blocks(candidate: onnx.ModelProto) -> "OrderedDict[str, List[str]]":
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for n in candidate.graph.node:
        if n.op_type == "Conv" and n.name.startswith(NETWORK_PREFIX):
            groups.setdefault(block_of(n.name), []).append(n.name)
    return groups


def pattern_for(block: str) -> str:
    return f"{NETWORK_PREFIX}{block}/*"


def sensitivity_sweep(onnx_path: str | Path, data: str | Path, method: str = "entropy", num_images: int = 100,
                      eval_images: int = 100, max_loss: float = 0.005, max_blocks: int = 4,
                      work_dir: Optional[Path] = None, progress: bool = True, equalize: bool = True,
                      refine: bool = True) -> Dict:
    """Run the sweep; returns the table and the chosen exclusion patterns (as `calibrate --exclude` takes)."""
    from ..backends import REFERENCE_BACKEND
    from ..data import CocoDataset
    from ..detector import Detector
    from ..eval import evaluate
    from .convert import _load, to_int8

    path = Path(onnx_path)
    work = Path(work_dir or path.parent / "sensitivity")
    work.mkdir(parents=True, exist_ok=True)
    cache = path.parent / ".calibration_cache"
    val = CocoDataset(data, "val")

    def m_ap(graph: Path) -> float:
        return evaluate(Detector.from_onnx(graph, backend=REFERENCE_BACKEND), val, eval_images,
                        progress=False)["stats"]["AP"]

    _, _, candidate, _ = _load(path)
    blocks = conv_blocks(candidate)
    fp32 = m_ap(path)
    full = m_ap(to_int8(path, data, work / "all.onnx", num_images, method, (), cache, False, equalize,
                        refine).onnx_path)
    logger.info("sensitivity: FP32 %.4f, INT8 (all blocks) %.4f", fp32, full)
    rows = []
    for i, block in enumerate(blocks):
        g = to_int8(path, data, work / f"keep_{i}.onnx", num_images, method, [pattern_for(block)], cache, False,
                    equalize, refine).onnx_path
        ap = m_ap(g)
        rows.append({"block": block, "convs": len(blocks[block]), "mAP_with_block_in_float": round(ap, 5),
                     "recovered": round(ap - full, 5)})
        if progress:
            print(f"  {block:22s} {len(blocks[block]):3d} convs  mAP {ap:.4f}  ({ap - full:+.4f})", flush=True)
    rows.sort(key=lambda r: r["recovered"], reverse=True)
    chosen: List[str] = []
    current = full
    for r in rows:
        if fp32 - current <= max_loss or len(chosen) >= max_blocks or r["recovered"] <= 0:
            break
        chosen.append(r["block"])
        g = to_int8(path, data, work / "chosen.onnx", num_images, method, [pattern_for(b) for b in chosen],
                    cache, False, equalize, refine).onnx_path
        current = m_ap(g)
    return {"fp32_mAP": round(fp32, 5), "int8_all_mAP": round(full, 5), "method": method,
            "eval_images": eval_images, "blocks": rows, "kept_in_float": chosen,
            "exclude_patterns": [pattern_for(b) for b in chosen], "int8_with_exclusions_mAP": round(current, 5)}


@dataclass
class Int8Result:
    """What `calibrate_int8` made: the INT8 graph, and with a sensitivity sweep its report and where it went."""
    graph: "ExportResult"
    sweep: Optional[Dict] = None
    sweep_path: Optional[Path] = None


def calibrate_int8(onnx_path: str | Path, data: str | Path, out: Optional[str | Path] = None, num_images: int = 500,
                   method: str = "entropy", exclude: Iterable[str] = (), cache_dir: Optional[str | Path] = None,
                   sensitivity: bool = False, eval_images: int = 100, max_loss: float = 0.005,
                   progress: bool = True, equalize: bool = True, refine: bool = True) -> Int8Result:
    """`edet-deploy calibrate`: with `sensitivity`, first sweep for the blocks that cost the most mAP in INT8
    (report written beside the graph; its per-block table goes to stdout) and keep them in float too; then
    `to_int8`, with a bar per calibration image when `progress`."""
    from .convert import to_int8
    exclude = list(exclude)
    sweep = sweep_path = None
    if sensitivity:
        from ..io import write_json
        sweep = sensitivity_sweep(onnx_path, data, method, num_images, eval_images, max_loss, equalize=equalize,
                                  refine=refine)
        sweep_path = Path(onnx_path).with_name(Path(onnx_path).stem + f".sensitivity-{method}.json")
        write_json(sweep_path, sweep)
        exclude += sweep["exclude_patterns"]
    graph = to_int8(onnx_path, data, out, num_images, method, exclude, cache_dir, progress, equalize, refine)
    return Int8Result(graph, sweep, sweep_path)
