"""CIFAR ResNet-(6n+2) of He et al. 2016 (arXiv 1512.03385, section 4.2).

Three stages of n basic blocks with 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps. Shortcuts that change
shape use the paper's option A (stride-2 subsampling plus zero-padded channels), which adds no parameters: this
is what gives ResNet-20 its published 0.27M parameters and ResNet-110 its 1.7M.
"""

import torch
from torch import nn
import torch.nn.functional as F

MAX_CLASSES = 100_000  # a bound for numbers read from files: ImageNet-21k has about 21,800 classes


def classify(fc: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """The classifier head in fp32 even under bf16 autocast: bf16 logits carry about 8 significant bits, too few for
    the accuracy ties, NLL and ECE computed from them (the head is a sliver of the network's work)."""
    with torch.autocast(features.device.type, enabled=False):
        return fc(features.float())


def check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"model.num_classes must be between 1 and {MAX_CLASSES:,}, got {num_classes}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (option A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (other sizes work: the head pools globally); depth: 6n+2 (20, 32, 44, 56, 110)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        # Bounded, since a snapshot's metadata may come from anyone: ResNet-1202 is the deepest of He et al. 2016
        # (arXiv 1512.03385, section 4.2); a depth of 600002 would build for minutes and fill the memory.
        if not 8 <= depth <= 1202 or (depth - 2) % 6:
            raise ValueError(f"model.depth must be 6n+2 between 8 and 1202 (20, 32, 44, 56, 110), got {depth}")
        check_num_classes(num_classes)
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)  # He et al. 2015 (arXiv 1502.01852), as the paper uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return classify(self.fc, F.adaptive_avg_pool2d(out, 1).flatten(1))
