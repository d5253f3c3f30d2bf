"""Class and box prediction heads: convolutions shared across levels, one batch norm per level."""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn

from .layers import SeparableConv2d, activation


class HeadNet(nn.Module):
    def __init__(self, channels: int, repeats: int, num_levels: int, num_outputs: int, num_anchors: int,
                 norm_layer: Callable, act: str = "silu"):
        super().__init__()
        self.num_levels = num_levels
        self.conv_rep = nn.ModuleList([SeparableConv2d(channels, channels, bias=True) for _ in range(repeats)])
        # bn_rep[repeat][level].bn: the layout of the original TF weights.
        self.bn_rep = nn.ModuleList([
            nn.ModuleList([nn.Sequential() for _ in range(num_levels)]) for _ in range(repeats)])
        for per_level in self.bn_rep:
            for seq in per_level:
                seq.add_module("bn", norm_layer(channels))
        self.act = activation(act)
        self.predict = SeparableConv2d(channels, num_outputs * num_anchors, bias=True)

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        outputs = []
        for level in range(self.num_levels):
            y = x[level]
            for conv, bn in zip(self.conv_rep, self.bn_rep):
                y = self.act(bn[level](conv(y)))
            outputs.append(self.predict(y))
        return outputs
