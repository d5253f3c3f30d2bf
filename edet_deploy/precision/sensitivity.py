"""INT8 sensitivity: which blocks cost the most mAP when quantized. Each block (backbone stage, BiFPN cell,
class head, box head) is kept in float (FP16: the INT8 twin is built on the FP16 one) in turn, the rest
quantized, and mAP measured on a small set; the blocks that recover the most are kept in float until the loss
against FP32 is within the budget."""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional

import onnx

from ..log import logger
from ..metadata import read_metadata
from .fp16 import NETWORK_PREFIX
from .int8 import Int8Options

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


def sensitivity_sweep(onnx_path: str | Path, data: str | Path, options: Optional[Int8Options] = None,
                      eval_images: int = 100, max_loss: float = 0.005, max_blocks: int = 4,
                      work_dir: Optional[Path] = None, progress: bool = True) -> Dict:
    """Run the sweep with the calibration `options` (their own `exclude` aside: each trial sets it); returns
    the table and the chosen exclusion patterns (as `calibrate --exclude` takes)."""
    from ..backends import REFERENCE_BACKEND
    from ..data import CocoDataset
    from ..detector import Detector
    from ..eval import evaluate
    from .convert import _load, to_int8

    path = Path(onnx_path)
    val = CocoDataset(data, "val")  # before anything is made: a --data without a val split leaves nothing
    options = options or Int8Options(num_images=100)
    # The user's --cache-dir holds; by default the trials share the cache beside the graph.
    options = replace(options, cache_dir=options.cache_dir or path.parent / ".calibration_cache")
    options = options.for_variant(read_metadata(path)["variant"])
    work = Path(work_dir or path.parent / "sensitivity")
    work.mkdir(parents=True, exist_ok=True)

    def twin(out: Path, exclude: Iterable[str]) -> Path:
        return to_int8(path, data, out, options, progress=False, exclude=tuple(exclude)).onnx_path

    def m_ap(graph: Path) -> float:
        return evaluate(Detector.from_onnx(graph, backend=REFERENCE_BACKEND), val, eval_images,
                        progress=False)["stats"]["AP"]

    _, _, candidate, _ = _load(path)
    blocks = conv_blocks(candidate)
    fp32 = m_ap(path)
    full = m_ap(twin(work / "all.onnx", ()))
    logger.info("sensitivity: FP32 %.4f, INT8 (all blocks) %.4f", fp32, full)
    rows = []
    for i, block in enumerate(blocks):
        ap = m_ap(twin(work / f"keep_{i}.onnx", [pattern_for(block)]))
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
        current = m_ap(twin(work / "chosen.onnx", [pattern_for(b) for b in chosen]))
    return {"fp32_mAP": round(fp32, 5), "int8_all_mAP": round(full, 5), "method": options.method,
            "eval_images": eval_images, "blocks": rows, "kept_in_float": chosen,
            "exclude_patterns": [pattern_for(b) for b in chosen], "int8_with_exclusions_mAP": round(current, 5)}


@dataclass
class Int8Result:
    """What `calibrate_int8` made: the INT8 graph, and with a sensitivity sweep its report and where it went."""
    graph: "ExportResult"
    sweep: Optional[Dict] = None
    sweep_path: Optional[Path] = None


@dataclass(frozen=True)
class Sensitivity:
    """`calibrate --sensitivity`: score each block's INT8 cost on `eval_images` val images and keep blocks in
    float until the mAP loss against FP32 is at most `max_loss`."""
    eval_images: int = 100
    max_loss: float = 0.005


def calibrate_int8(onnx_path: str | Path, data: str | Path, out: Optional[str | Path] = None,
                   options: Optional[Int8Options] = None, sensitivity: Optional[Sensitivity] = None,
                   progress: bool = True) -> Int8Result:
    """`edet-deploy calibrate`: with `sensitivity`, first sweep for the blocks that cost the most mAP in INT8
    (report written beside the graph; its per-block table goes to stdout) and keep them in float too; then
    `to_int8`, with one bar over its phases when `progress`."""
    from .convert import to_int8
    options = (options or Int8Options()).for_variant(read_metadata(onnx_path)["variant"])
    sweep = sweep_path = None
    if sensitivity is not None:
        from ..io import write_json
        sweep = sensitivity_sweep(onnx_path, data, options, sensitivity.eval_images, sensitivity.max_loss)
        sweep_path = Path(onnx_path).with_name(Path(onnx_path).stem + f".sensitivity-{options.method}.json")
        write_json(sweep_path, sweep)
        options = replace(options, exclude=options.exclude + tuple(sweep["exclude_patterns"]))
    graph = to_int8(onnx_path, data, out, options, progress=progress)
    return Int8Result(graph, sweep, sweep_path)
