"""The EfficientDet family as data: one row per variant, one lookup function.

Numbers follow the published EfficientDet family (automl's README and model configs, as effdet builds them):
input size, backbone, BiFPN width and depth, head depth, fusion method, activation, anchor scale, pyramid
levels and input normalisation. D0-D7x and the edge family Lite0-Lite4 (+ Lite3x) are rows of one table built
by one factory. The variant table in docs/models.md (and README) is this table; tests/test_docs.py compares
them cell by cell.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from .errors import EdetError

# ImageNet normalisation in 0..255 pixel units (the graph takes uint8 input).
MEAN_RGB: Tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_RGB: Tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Lite normalisation: effdet's mean = std = 0.5 (x 255 in its loader), i.e. (x - 127.5) / 127.5, inputs in [-1, 1].
# (automl's TFLite models use 127 / 128; effdet's is what its weights were ported and evaluated with.)
LITE_MEAN_RGB: Tuple[float, float, float] = (127.5, 127.5, 127.5)
LITE_STD_RGB: Tuple[float, float, float] = (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class VariantConfig:
    name: str  # canonical short name: d0 .. d7, d7x, lite0 .. lite4, lite3x
    image_size: int
    backbone: str  # timm model name
    fpn_channels: int
    fpn_repeats: int
    head_repeats: int
    fusion: str = "fastattn"  # "fastattn" (relu(w) / (sum + 1e-4)) or "sum"
    act: str = "silu"  # BiFPN and head activation: "silu" (D-family) or "relu6" (Lite; the backbone's own too)
    anchor_scale: float = 4.0
    min_level: int = 3
    max_level: int = 7
    num_scales: int = 3
    # (x, y) stretch per aspect ratio, as effdet's pretrained weights were trained with.
    aspect_ratios: Tuple[Tuple[float, float], ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
    num_classes: int = 90
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    backbone_drop_path: float = 0.2
    mean: Tuple[float, float, float] = MEAN_RGB
    std: Tuple[float, float, float] = STD_RGB
    # INT8 activation ranges unless asked otherwise (precision/int8.METHODS). Measured on the shapes data
    # (benchmarks/results/precision_accuracy.md, one run): entropy keeps D0 within 1.8 points and minmax loses
    # 3.2; on Lite0 minmax loses 0.24 points and entropy 26 (docs/precision.md, "Why entropy breaks Lite0").
    calib_method: str = "entropy"
    # Published COCO numbers for reports (see _pub / _pub_lite): AP, params (M), FLOPs (B), latency, source.
    published: dict = field(default_factory=dict, compare=False, hash=False)
    # Input sizes must be multiples of this; None = the stride of the coarsest level (2 ** max_level). Lite's
    # native 320 and 448 are not multiples of 128: effdet runs them with ceil-rounded coarse levels (P7 of 320 is
    # 3x3, stride 106.7), which our network, anchors and graph compute the same way.
    size_multiple: Optional[int] = None

    @property
    def input_multiple(self) -> int:
        return self.size_multiple or 2 ** self.max_level

    @property
    def display_name(self) -> str:
        """As tables write it: D0, D7x, Lite0, Lite3x."""
        return f"Lite{self.name[4:]}" if self.name.startswith("lite") else self.name.upper().replace("X", "x")

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location."""
        return self.num_scales * len(self.aspect_ratios)

    @property
    def effdet_name(self) -> str:
        return f"tf_efficientdet_{self.name}"

    def with_overrides(self, **kwargs) -> "VariantConfig":
        return replace(self, **kwargs)


def _pub(ap: float, params: float, flops: float, latency_ms: float) -> dict:
    """automl's README (D-family): AP on COCO test-dev, params, FLOPs, V100 latency. Checked against a stored
    copy (2025-03-01), https://github.com/google/automl/blob/6a54c8741e7c3265d4547c4f35f47a0391122dc5/efficientdet/README.md
    section 2's checkpoint table (AP test, #params, #FLOPs) and section 4's end-to-end V100 table (batch-1
    latency): every figure equal."""
    return {"coco_ap": ap, "params_m": params, "flops_b": flops, "v100_latency_ms": latency_ms,
            "source": "automl README (test-dev)"}


def _pub_lite(ap: float, int8_ap: float, params: float, flops: float, mobile_ms: float) -> dict:
    """automl's EfficientDet-Lite table (AP on COCO val2017, FP32 and post-training INT8, params, Pixel 4 CPU
    latency), checked against a stored copy of the same README (section 2's "mobile-size lite models" table):
    every figure equal. That table does not name its split; effdet's README, stored copy
    https://github.com/rwightman/efficientdet-pytorch/blob/c6dff775a36cea0bf9b76c58e59f936411c5ce01/README.md
    lists the same APs, rounded, as "mAP (TF official val2017)", and its params (3.24M .. 15.1M) round to automl's.
    Neither automl nor effdet publishes Lite FLOPs: `flops_b` is the multiply-add count of our network (= effdet
    0.4.1's, to the parameter) at the native input by torch.utils.flop_counter, a count that gives D0 2.49B
    against automl's 2.54B and D1 6.00B against 6.10B (tests/test_model.py recounts Lite0)."""
    return {"coco_ap": ap, "int8_coco_ap": int8_ap, "params_m": params, "flops_b": flops,
            "mobile_latency_ms": mobile_ms, "source": "automl EfficientDet-Lite table (val2017); FLOPs counted"}


def _lite(name: str, size: int, backbone: str, width: int, repeats: int, head: int, anchor_scale: float,
          published: dict, drop_path: float = 0.2) -> "VariantConfig":
    """A Lite row: effdet's tf_efficientdet_lite_common (sum fusion, ReLU6, mean = std = 0.5) + its own sizes."""
    return VariantConfig(name, size, backbone, width, repeats, head, fusion="sum", act="relu6",
                         anchor_scale=anchor_scale, backbone_drop_path=drop_path, mean=LITE_MEAN_RGB,
                         std=LITE_STD_RGB, published=published, size_multiple=64,
                         calib_method="minmax")


VARIANTS: dict[str, VariantConfig] = {
    cfg.name: cfg
    for cfg in (
        VariantConfig("d0", 512, "tf_efficientnet_b0", 64, 3, 3, published=_pub(34.6, 3.9, 2.54, 10.2)),
        VariantConfig("d1", 640, "tf_efficientnet_b1", 88, 4, 3, published=_pub(40.5, 6.6, 6.10, 13.5)),
        VariantConfig("d2", 768, "tf_efficientnet_b2", 112, 5, 3, published=_pub(43.9, 8.1, 11.0, 17.7)),
        VariantConfig("d3", 896, "tf_efficientnet_b3", 160, 6, 4, published=_pub(47.2, 12.0, 24.9, 28.0)),
        VariantConfig("d4", 1024, "tf_efficientnet_b4", 224, 7, 4, published=_pub(49.7, 20.7, 55.2, 42.8)),
        VariantConfig("d5", 1280, "tf_efficientnet_b5", 288, 7, 4, published=_pub(51.5, 33.7, 130.0, 72.5)),
        VariantConfig("d6", 1280, "tf_efficientnet_b6", 384, 8, 5, fusion="sum",
                      published=_pub(52.6, 51.9, 226.0, 92.8)),
        VariantConfig("d7", 1536, "tf_efficientnet_b6", 384, 8, 5, fusion="sum", anchor_scale=5.0,
                      published=_pub(53.7, 51.9, 325.0, 122.0)),
        VariantConfig("d7x", 1536, "tf_efficientnet_b7", 384, 8, 5, fusion="sum", max_level=8,
                      published=_pub(55.1, 77.0, 410.0, 153.0)),
        # effdet 0.4.1 model_config.py tf_efficientdet_lite*: lite3 and lite4 keep the default anchor scale 4.
        _lite("lite0", 320, "tf_efficientnet_lite0", 64, 3, 3, 3.0, _pub_lite(26.41, 26.10, 3.2, 0.97, 36.0),
              drop_path=0.0),
        _lite("lite1", 384, "tf_efficientnet_lite1", 88, 4, 3, 3.0, _pub_lite(31.50, 31.12, 4.2, 1.97, 49.0)),
        _lite("lite2", 448, "tf_efficientnet_lite2", 112, 5, 3, 3.0, _pub_lite(35.06, 34.69, 5.3, 3.37, 69.0)),
        _lite("lite3", 512, "tf_efficientnet_lite3", 160, 6, 4, 4.0, _pub_lite(38.77, 38.42, 8.4, 7.48, 116.0)),
        _lite("lite3x", 640, "tf_efficientnet_lite3", 200, 6, 4, 3.0, _pub_lite(42.64, 41.87, 9.3, 13.98, 208.0)),
        _lite("lite4", 640, "tf_efficientnet_lite4", 224, 7, 4, 4.0, _pub_lite(43.18, 42.83, 15.1, 20.17, 260.0)),
    )
}


def canonical_name(name: str) -> str:
    """Map `d0`, `efficientdet-d0`, `efficientdet_d0` and `tf_efficientdet_d0` (any case) to `d0`."""
    key = name.strip().lower().replace("-", "_")
    for prefix in ("tf_efficientdet_", "efficientdet_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key not in VARIANTS:
        raise EdetError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)} "
                        f"(also as efficientdet-d0 / efficientdet-lite0 or tf_efficientdet_d0)")
    return key


def get_config(name: str, **overrides) -> VariantConfig:
    """The variant's config, with optional field overrides (for example num_classes or image_size)."""
    cfg = VARIANTS[canonical_name(name)]
    return cfg.with_overrides(**overrides) if overrides else cfg


def parse_model_list(spec: str) -> list[str]:
    """`d0-d3,d7x` -> ['d0', 'd1', 'd2', 'd3', 'd7x'] in table order."""
    names = list(VARIANTS)
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part and not part.lower().startswith(("efficientdet-", "tf_")):
            lo, hi = (canonical_name(p) for p in part.split("-", 1))
            i, j = names.index(lo), names.index(hi)
            if i > j:
                raise EdetError(f"empty model range {part!r}")
            out.extend(names[i:j + 1])
        else:
            out.append(canonical_name(part))
    return list(dict.fromkeys(out))
