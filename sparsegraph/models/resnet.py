"""A CIFAR-style ResNet (3x3 stem, no max-pool, BasicBlocks), as in the Sparse-IFT CIFAR experiments."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut: 1x1 conv + BN
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (N, c_out, H', W')
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] = (2, 2, 2, 2),
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)  # stem
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c_in = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            c_in = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)  # head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (N, w0, H, W)
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, w_last)
        return self.fc(x)
