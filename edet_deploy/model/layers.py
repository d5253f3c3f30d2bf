"""Reusable layers of the EfficientDet network, and the pass that makes TensorFlow 'same' padding static.

Module and parameter names follow rwightman's efficientdet-pytorch so that its checkpoints load unchanged.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_conv2d, create_pool2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame


def batch_norm(eps: float, momentum: float) -> Callable[[int], nn.BatchNorm2d]:
    return partial(nn.BatchNorm2d, eps=eps, momentum=momentum)


# The activations a variant names (VariantConfig.act): SiLU for D0-D7x, ReLU6 for Lite (it quantizes well).
_ACTIVATIONS = {"silu": nn.SiLU, "relu6": nn.ReLU6}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name](inplace=True)


class ConvBn(nn.Module):
    """1x1 channel projection used when resampling a feature map: conv (+ batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: Optional[Callable] = None):
        super().__init__()
        # The original TF models keep a bias in front of the batch norm; kept for weight compatibility.
        self.conv = create_conv2d(in_channels, out_channels, 1, padding="same", bias=True)
        self.bn = norm_layer(out_channels) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, optional batch norm and activation."""

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True,
                 norm_layer: Optional[Callable] = None, act: Optional[str] = None):
        super().__init__()
        self.conv_dw = create_conv2d(in_channels, in_channels, 3, padding="same", depthwise=True)
        self.conv_pw = create_conv2d(in_channels, out_channels, 1, padding="same", bias=bias)
        self.bn = norm_layer(out_channels) if norm_layer is not None else None
        self.act = activation(act) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pw(self.conv_dw(x))
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


def max_pool_same(kernel_size: int, stride: int) -> nn.Module:
    """TF 'same' max pooling (dynamic until `make_padding_static` fixes it for an input size)."""
    return create_pool2d("max", kernel_size=kernel_size, stride=stride, padding="same")


# --- static 'same' padding -------------------------------------------------------------------------------------

def same_pad_amounts(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding as (left, right, top, bottom) for an input of spatial `size` (h, w)."""
    pads = []
    for x, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class StaticSameConv2d(nn.Conv2d):
    """A Conv2dSame whose padding was computed once for a fixed input size: exports as a constant Pad."""

    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StaticSameMaxPool2d(nn.MaxPool2d):
    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.static_pad):
            x = F.pad(x, self.static_pad, value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)


class StaticSameAvgPool2d(nn.AvgPool2d):
    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return F.avg_pool2d(x, self.kernel_size, self.stride, 0, self.ceil_mode, self.count_include_pad)


_STATIC_OF = {Conv2dSame: StaticSameConv2d, MaxPool2dSame: StaticSameMaxPool2d,
              AvgPool2dSame: StaticSameAvgPool2d}
_DYNAMIC = tuple(_STATIC_OF) + tuple(_STATIC_OF.values())


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def make_padding_static(model: nn.Module, image_size: int) -> int:
    """Replace every dynamic TF 'same' padding in `model` by padding fixed for a `image_size` square input.

    The input size of each layer is found by one shape-only forward pass (FakeTensorMode: no arithmetic, no
    memory), then each layer's class is swapped for a static twin with identical parameters, so state_dict
    keys and values do not change. Returns the number of layers fixed. Safe to call again for another size.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[-2:])))
             for m in model.modules() if isinstance(m, _DYNAMIC)]
    was_training = model.training
    model.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            model(mode.from_tensor(torch.empty(1, 3, image_size, image_size)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for m, size in sizes.items():
        if type(m) in _STATIC_OF:
            m.__class__ = _STATIC_OF[type(m)]
        m.static_pad = same_pad_amounts((int(size[0]), int(size[1])), _pair(m.kernel_size), _pair(m.stride),
                                        _pair(m.dilation) if hasattr(m, "dilation") else (1, 1))
    return len(sizes)
