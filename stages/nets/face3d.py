"""Deep3DFaceRecon's coefficient regressor as SadTalker uses it: a ResNet-50 (torchvision key layout, no fc) with
seven 1x1 heads giving the 257 BFM coefficients of a 224x224 aligned face.

Loads the official `face_3drecon.` state dict strictly (prefix stripped). SadTalker keeps only expression, angles and
translation (`coefficients_70`); the crop parameters that complete its 73 columns come from the alignment, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

# Head order and sizes in the checkpoint (final_layers.0 ... final_layers.6).
HEADS: tuple[tuple[str, int], ...] = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27),
                                      ("txy", 2), ("tz", 1))
COEFFS = sum(size for _, size in HEADS)  # 257


def _offsets() -> Mapping[str, slice]:
    """Each head's columns in the 257-vector (translation = txy + tz, contiguous)."""
    spans, start = {}, 0
    for name, size in HEADS:
        spans[name] = slice(start, start + size)
        start += size
    spans["trans"] = slice(spans["txy"].start, spans["tz"].stop)
    return MappingProxyType(spans)


COLUMNS = _offsets()  # id 0:80, exp 80:144, tex 144:224, angle 224:227, gamma 227:254, trans 254:257


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50Trunk(nn.Module):
    """ResNet-50 up to global average pooling: (B, 3, H, W) -> (B, 2048, 1, 1)."""

    layer1: nn.Sequential   # made in a loop below, under the names the checkpoint keys use
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for index, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(channels, width, stride if block == 0 else 1))
                channels = width * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class ReconNet(nn.Module):
    """Face image -> 257 3DMM coefficients (id, exp, tex, angle, gamma, txy, tz)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50Trunk()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, size, 1) for _, size in HEADS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, 224, 224) RGB in [0, 1], not mean/std normalised (as trained) -> (B, 257)."""
        pooled = self.backbone(image)
        return torch.cat([head(pooled) for head in self.final_layers], dim=1).flatten(1)


def coefficients_70(coeffs257: torch.Tensor) -> torch.Tensor:
    """(..., 257) -> (..., 70) = exp 64 | angle 3 | trans 3: SadTalker's per-frame coefficients before crop params."""
    return torch.cat([coeffs257[..., COLUMNS["exp"]], coeffs257[..., COLUMNS["angle"]],
                      coeffs257[..., COLUMNS["trans"]]], dim=-1)
