"""The EfficientDet network (backbone + BiFPN + heads) and its factory."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..configs import VariantConfig, get_config
from .bifpn import BiFpn
from .heads import HeadNet
from .layers import SeparableConv2d, batch_norm, make_padding_static


class EfficientDet(nn.Module):
    """`forward(x)` returns (class_outputs, box_outputs): per level (B, A*C, H, W) and (B, A*4, H, W),
    the same raw outputs as effdet's EfficientDet, with A = 9 anchors per location."""

    def __init__(self, config: VariantConfig):
        super().__init__()
        import timm  # timm imports are heavy; keep `import edet_deploy` light

        self.config = config
        # pretrained=False always: this toolkit never downloads weights.
        self.backbone = timm.create_model(config.backbone, features_only=True, out_indices=(2, 3, 4),
                                          pretrained=False, drop_path_rate=config.backbone_drop_path)
        channels = self.backbone.feature_info.channels()
        norm = batch_norm(config.bn_eps, config.bn_momentum)
        self.fpn = BiFpn(channels, config.image_size, config.fpn_channels, config.fpn_repeats,
                         config.min_level, config.max_level, config.fusion, norm, config.act)
        self.class_net = HeadNet(config.fpn_channels, config.head_repeats, config.num_levels,
                                 config.num_classes, config.num_anchors, norm, config.act)
        self.box_net = HeadNet(config.fpn_channels, config.head_repeats, config.num_levels, 4,
                               config.num_anchors, norm, config.act)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        features = self.fpn(self.backbone(x))
        return self.class_net(features), self.box_net(features)


def init_weights(model: EfficientDet) -> None:
    """TF-style initialisation of the non-backbone layers; the class bias starts at a 1% foreground prior."""
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for name, m in model.named_modules():
        if name.startswith("backbone"):
            continue
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            if name.startswith(("class_net", "box_net")):
                nn.init.normal_(m.weight, std=math.sqrt(1.0 / max(1, fan_in)))
            else:
                fan_out = m.weight.shape[0] * m.weight[0, 0].numel() // m.groups
                limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
                nn.init.uniform_(m.weight, -limit, limit)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    predict = model.class_net.predict
    assert isinstance(predict, SeparableConv2d)
    nn.init.constant_(predict.conv_pw.bias, prior_bias)


def create_model(name: Union[str, VariantConfig], num_classes: Optional[int] = None,
                 weights: Optional[str] = None, image_size: Optional[int] = None) -> EfficientDet:
    """Build an EfficientDet variant (`d0`, `efficientdet-d0` or `tf_efficientdet_d0`), optionally loading
    weights (ours or effdet's). `num_classes` defaults to the weights' (their metadata, else their class head's
    shape), else 90 (COCO); `image_size` to the weights' metadata, else the variant's own. Padding is made
    static for that size, so the model traces and exports without dynamic Pad. Returned in eval mode."""
    checkpoint = None
    if weights is not None:
        from .weights import checkpoint_num_classes, read_checkpoint
        checkpoint = read_checkpoint(weights)  # once: it gives the class count and then the tensors
    if isinstance(name, VariantConfig):
        config = name
    else:
        if checkpoint is not None:
            anchors = get_config(name).num_anchors
            num_classes = num_classes or checkpoint_num_classes(*checkpoint, anchors)
            image_size = image_size or checkpoint[1].get("image_size")
        overrides = {"num_classes": num_classes or 90}
        if image_size is not None:
            overrides["image_size"] = image_size
        config = get_config(name, **overrides)
    _check_image_size(config)
    model = EfficientDet(config)
    make_padding_static(model, config.image_size)
    if checkpoint is not None:
        from .weights import load_checkpoint
        load_checkpoint(model, *checkpoint, weights)
    return model.eval()


def _check_image_size(config: VariantConfig) -> None:
    from ..errors import EdetError

    step = config.input_multiple
    if config.image_size <= 0 or config.image_size % step:
        raise EdetError(f"image size {config.image_size} for {config.name} must be a positive multiple of {step}"
                        + (f" (the stride of level P{config.max_level})" if step == 2 ** config.max_level else ""))
