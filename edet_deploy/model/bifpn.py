"""BiFPN: the bidirectional feature pyramid with fast normalized (or plain sum) fusion."""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvBn, SeparableConv2d, activation, max_pool_same


def feature_sizes(image_size: int, max_level: int) -> list[int]:
    """Spatial size of every pyramid level 0..max_level (TF 'same' stride-2 rounding)."""
    sizes = [image_size]
    for _ in range(max_level):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    return sizes


def bifpn_nodes(min_level: int, max_level: int) -> list[tuple[int, tuple[int, ...]]]:
    """The BiFPN graph as (output level, input node ids); ids 0..L-1 are the cell's inputs, then the nodes."""
    num_levels = max_level - min_level + 1
    ids = {min_level + i: [i] for i in range(num_levels)}
    nodes: list[tuple[int, tuple[int, ...]]] = []
    for level in range(max_level - 1, min_level - 1, -1):  # top-down
        nodes.append((level, (ids[level][-1], ids[level + 1][-1])))
        ids[level].append(num_levels + len(nodes) - 1)
    for level in range(min_level + 1, max_level + 1):  # bottom-up, with the skip from the cell input
        nodes.append((level, (*ids[level], ids[level - 1][-1])))
        ids[level].append(num_levels + len(nodes) - 1)
    return nodes


class ResampleFeatureMap(nn.Sequential):
    """Project channels (1x1 conv + BN) and/or resize (max pool down, nearest up) to a target level."""

    def __init__(self, in_channels: int, out_channels: int, in_size: int, out_size: int,
                 norm_layer: Callable):
        super().__init__()
        if in_channels != out_channels:
            self.add_module("conv", ConvBn(in_channels, out_channels, norm_layer))
        if in_size > out_size:
            stride = (in_size - 1) // out_size + 1
            self.add_module("downsample", max_pool_same(stride + 1, stride))
        elif in_size < out_size:
            self.add_module("upsample", nn.Upsample(size=(out_size, out_size), mode="nearest"))


class FpnCombine(nn.Module):
    def __init__(self, in_channels: Sequence[int], in_sizes: Sequence[int], inputs: Sequence[int],
                 fpn_channels: int, out_size: int, fusion: str, norm_layer: Callable):
        super().__init__()
        self.inputs = tuple(inputs)
        self.fusion = fusion
        self.resample = nn.ModuleDict({
            str(i): ResampleFeatureMap(in_channels[i], fpn_channels, in_sizes[i], out_size, norm_layer)
            for i in inputs})
        if fusion == "fastattn":
            self.edge_weights = nn.Parameter(torch.ones(len(inputs)))
        elif fusion == "sum":
            self.edge_weights = None
        else:
            raise ValueError(f"unknown fusion {fusion!r}")

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        nodes = [resample(x[i]) for i, resample in zip(self.inputs, self.resample.values())]
        # Plain Add chains (not stack + reduce): fewer, fusable ops in ONNX / TensorRT.
        if self.edge_weights is None:
            out = nodes[0]
            for n in nodes[1:]:
                out = out + n
            return out
        # Fast normalized fusion (EfficientDet paper, eq. 3).
        w = F.relu(self.edge_weights.to(nodes[0].dtype))
        w = w / (w.sum() + 1e-4)
        out = nodes[0] * w[0]
        for i, n in enumerate(nodes[1:], start=1):
            out = out + n * w[i]
        return out


class Fnode(nn.Module):
    def __init__(self, combine: nn.Module, after_combine: nn.Module):
        super().__init__()
        self.combine = combine
        self.after_combine = after_combine

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        return self.after_combine(self.combine(x))


class BiFpnLayer(nn.Module):
    def __init__(self, in_channels: Sequence[int], sizes: Sequence[int], fpn_channels: int, min_level: int,
                 max_level: int, fusion: str, norm_layer: Callable, act: str = "silu"):
        super().__init__()
        self.num_levels = max_level - min_level + 1
        channels, node_sizes = list(in_channels), [sizes[min_level + i] for i in range(self.num_levels)]
        self.fnode = nn.ModuleList()
        for level, inputs in bifpn_nodes(min_level, max_level):
            combine = FpnCombine(channels, node_sizes, inputs, fpn_channels, sizes[level], fusion, norm_layer)
            after = nn.Sequential()
            after.add_module("act", activation(act))
            after.add_module("conv", SeparableConv2d(fpn_channels, fpn_channels, bias=True, norm_layer=norm_layer))
            self.fnode.append(Fnode(combine, after))
            channels.append(fpn_channels)
            node_sizes.append(sizes[level])

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        x = list(x)
        for fnode in self.fnode:
            x.append(fnode(x))
        return x[-self.num_levels:]


class BiFpn(nn.Module):
    """Adds the coarser levels missing from the backbone, then repeats the BiFPN cell."""

    def __init__(self, backbone_channels: Sequence[int], image_size: int, fpn_channels: int, repeats: int,
                 min_level: int, max_level: int, fusion: str, norm_layer: Callable, act: str = "silu"):
        super().__init__()
        sizes = feature_sizes(image_size, max_level)
        self.resample = nn.ModuleDict()
        channels = list(backbone_channels)
        for level in range(len(backbone_channels), max_level - min_level + 1):
            prev = min_level + level - 1
            self.resample[str(level)] = ResampleFeatureMap(channels[-1], fpn_channels, sizes[prev],
                                                           sizes[prev + 1], norm_layer)
            channels.append(fpn_channels)
        self.cell = nn.Sequential()
        for rep in range(repeats):
            self.cell.add_module(str(rep), BiFpnLayer(channels, sizes, fpn_channels, min_level, max_level,
                                                      fusion, norm_layer, act))
            channels = [fpn_channels] * len(channels)

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        x = list(x)
        for resample in self.resample.values():
            x.append(resample(x[-1]))
        for cell in self.cell:
            x = cell(x)
        return x
