"""CIFAR model families: ResNet-(6n+2) and Wide ResNet-d-k."""

from snapens.models.resnet import CifarResNet
from snapens.models.wrn import WideResNet

__all__ = ["CifarResNet", "WideResNet"]
