"""Wide ResNet-d-k of Zagoruyko & Komodakis 2016 (arXiv 1605.07146).

Pre-activation basic blocks (BN-ReLU-conv), widths 16k, 32k, 64k, (d-4)/6 blocks per stage, dropout between the two
convolutions of a block (the paper's WRN-28-10 with dropout uses 0.3). Projection shortcuts (1x1 conv) where the
shape changes, as in the paper: WRN-28-10 has 36.5M parameters.
"""

import torch
from torch import nn
import torch.nn.functional as F

from snapens.models.resnet import check_num_classes, classify


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        same = stride == 1 and in_planes == planes
        self.shortcut = None if same else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(o)))))
        # The projection sees the pre-activated input, as in the authors' code.
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs: depth 6n+4 (16, 22, 28, 40, ...), widen_factor k (the width
    multiplier), dropout the probability inside each block."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, num_classes: int = 10):
        super().__init__()
        if not 10 <= depth <= 1000 or (depth - 4) % 6:  # bounded: see CifarResNet
            raise ValueError(f"model.depth must be 6n+4 between 10 and 1000 (16, 22, 28, 40), got {depth}")
        if not 1 <= widen_factor <= 32:
            raise ValueError(f"model.widen_factor must be between 1 and 32 (4, 8, 10), got {widen_factor}")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be a probability in [0, 1), got {dropout}")
        check_num_classes(num_classes)
        n, k = (depth - 4) // 6, widen_factor
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, in_planes = [], 16
        for planes, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv(x))))
        return classify(self.fc, F.adaptive_avg_pool2d(out, 1).flatten(1))
