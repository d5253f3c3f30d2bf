"""INT8 calibration into explicit Q/DQ (what TensorRT 11 accepts: symmetric, zero point 0, per-channel
weights), with ONNX Runtime's quantization tools on CPU, on the graph without the custom op; the soft-NMS node
is re-attached afterwards. Calibration ranges are cached, so a second run with the same inputs is instant."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..errors import EdetError
from ..log import logger
from ..nms import NmsSettings
from ..nms import op as nms_op
from .fp16 import NETWORK_PREFIX

METHODS = ("entropy", "percentile", "minmax")
QUANTIZED_OPS = ("Conv",)
# Entropy calibration as TensorRT does it: a 2048-bin histogram searched for the 128-bin window of least KL
# divergence. ONNX Runtime's defaults (128 bins for both) leave no window to search: entropy would equal min-max.
CALIB_OPTIONS = {"CalibNumBins": 2048, "CalibNumQuantizedBins": 128}


def strip_nms(proto: onnx.ModelProto) -> Tuple[onnx.ModelProto, Optional[NmsSettings]]:
    """The candidate graph (no custom op) and the NMS settings of a full detection graph."""
    from ..export.graph import CANDIDATE_OUTPUTS

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    nms_nodes = [n for n in g.node if n.domain == nms_op.DOMAIN]
    if not nms_nodes:
        return proto, None
    settings = nms_op.settings_from_node(nms_nodes[0])
    keep = [n for n in g.node if n.domain != nms_op.DOMAIN]
    del g.node[:]
    g.node.extend(keep)
    infos = {v.name: v for v in g.value_info}
    if not all(name in infos for name in CANDIDATE_OUTPUTS):
        raise EdetError("cannot find the candidate tensors in front of the soft-NMS node")
    del g.output[:]
    g.output.extend(infos[name] for name in CANDIDATE_OUTPUTS)
    imports = [o for o in proto.opset_import if o.domain != nms_op.DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    return proto, settings


class ImageReader:
    """ONNX Runtime CalibrationDataReader over letterboxed images, one per batch."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size, self.i = list(paths), size, 0

    def get_next(self):
        from ..preprocess import decode_image, letterbox
        if self.i >= len(self.paths):
            return None
        img, _ = letterbox(decode_image(self.paths[self.i]), self.size)
        self.i += 1
        return {"images": img[None]}

    def rewind(self) -> None:
        self.i = 0


def calibration_images(data: str | Path, num_images: int, split: str = "calib") -> List[Path]:
    """Images for calibration: a COCO-format split (`calib`, else `train`) or a plain folder of images."""
    from ..data import CocoDataset
    from ..preprocess import decode_image

    data = Path(data)
    if not data.exists():
        raise EdetError(f"calibration data not found: {data}")
    paths: List[Path] = []
    for name in (split, "train"):
        try:
            ds = CocoDataset(data, name)
            paths = [ds.image_path(i) for i in range(len(ds))]
            break
        except EdetError:
            continue
    if not paths and data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    if not paths:
        raise EdetError(f"no calibration images in {data} (expected a COCO split or image files)")
    paths = paths[:num_images]
    bad = []
    for p in paths:  # refuse unreadable data up front, naming the files
        try:
            decode_image(p)
        except EdetError as e:
            bad.append(str(e))
    if bad:
        raise EdetError(f"{len(bad)} unreadable calibration image(s): {'; '.join(bad[:3])}")
    return paths


def network_nodes(proto: onnx.ModelProto, exclude: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """(nodes to quantize, nodes excluded): network Convs not matching any exclude pattern (fnmatch on names)."""
    patterns = list(exclude)
    include, excluded = [], []
    for n in proto.graph.node:
        if n.op_type not in QUANTIZED_OPS or not n.name.startswith(NETWORK_PREFIX):
            continue
        (excluded if any(fnmatch.fnmatch(n.name, p) or p in n.name for p in patterns) else include).append(n.name)
    return include, excluded


def cache_key(candidate: onnx.ModelProto, images: Sequence[Path], method: str) -> str:
    h = hashlib.sha256(candidate.SerializeToString())
    h.update(method.encode())
    h.update(json.dumps(CALIB_OPTIONS, sort_keys=True).encode())
    for p in images:
        h.update(str(Path(p).resolve()).encode())
        h.update(str(Path(p).stat().st_size).encode())
    return h.hexdigest()[:20]


def quantize_candidates(candidate: onnx.ModelProto, images: Sequence[Path], method: str = "entropy",
                        exclude: Iterable[str] = (), cache_dir: Optional[Path] = None, image_size: int = 512
                        ) -> Tuple[onnx.ModelProto, Dict]:
    """Q/DQ-quantize the network Convs of a candidate graph. Returns (model, info)."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if method not in METHODS:
        raise EdetError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    include, excluded = network_nodes(candidate, exclude)
    key = cache_key(candidate, images, method)
    t = time.perf_counter()
    calib_method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                    "minmax": CalibrationMethod.MinMax}[method]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "ranges.json"
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            cache = cache_dir / f"calib-{method}-{key}.json"
        hit = cache.is_file()
        if not hit:
            # Calibrate here rather than inside quantize_static, which does not pass the histogram sizes on.
            src = Path(tmp) / "candidate.onnx"
            onnx.save(candidate, str(src))
            calibrator = create_calibrator(src, list(QUANTIZED_OPS), str(Path(tmp) / "augmented.onnx"),
                                           calib_method, extra_options={
                                               "symmetric": True, "percentile": 99.999,
                                               "num_bins": CALIB_OPTIONS["CalibNumBins"],
                                               "num_quantized_bins": CALIB_OPTIONS["CalibNumQuantizedBins"]})
            calibrator.collect_data(ImageReader(images, image_size))
            save_tensors_data(calibrator.compute_data(), cache)
            del calibrator
        out = Path(tmp) / "q.onnx"
        # Biases stay float: TensorRT fuses them itself and wants Q/DQ on activations and weights only.
        quantize_static(candidate, str(out), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=include,
                        calibrate_method=calib_method, calibration_cache_path=str(cache),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})
        quantized = onnx.load(str(out))
    info = {"method": method, "num_images": len(images), "quantized_convs": len(include),
            "excluded_convs": excluded, "cache": str(cache) if cache_dir is not None else None, "cache_hit": hit,
            "seconds": round(time.perf_counter() - t, 1)}
    logger.info("INT8: %d convs quantized, %d kept in float (%s, %s)", len(include), len(excluded), method,
                "cached ranges" if hit else f"{len(images)} calibration images")
    return quantized, info


def check_qdq(proto: onnx.ModelProto) -> Dict[str, int]:
    """Verify the Q/DQ structure TensorRT needs: zero points all 0 (int8), every quantized Conv weight
    per-channel (one scale per output channel). Raises EdetError otherwise; returns counts."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        if len(n.input) < 3 or n.input[2] not in inits:
            raise EdetError(f"{n.name}: Q/DQ without a constant zero point")
        zp = inits[n.input[2]]
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise EdetError(f"{n.name}: zero point must be int8 0 (symmetric), got {zp.dtype} {zp.ravel()[:4]}")
    per_channel = 0
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    for conv in convs:
        w = producer.get(conv.input[1])
        if w is None or w.op_type != "DequantizeLinear":
            continue
        scale = inits.get(w.input[1])
        weight = inits.get(w.input[0])
        axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
        if scale is None or weight is None or scale.size != weight.shape[0] or axis != 0:
            raise EdetError(f"{conv.name}: weight is not per-channel quantized")
        per_channel += 1
    return {"qdq_nodes": len(qdq), "per_channel_convs": per_channel, "convs": len(convs)}
