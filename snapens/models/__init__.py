"""CIFAR model families, ResNet-(6n+2) and Wide ResNet-d-k, any torchvision or timm model by name (library.py), and
the one allow-list that rebuilds a model from a snapshot's metadata."""

import torch

from snapens.errors import SnapensError
from snapens.models.library import library_model
from snapens.models.resnet import CifarResNet
from snapens.models.wrn import WideResNet

MODEL_CLASSES = {"snapens.models.CifarResNet": CifarResNet, "snapens.models.WideResNet": WideResNet,
                 "snapens.models.library_model": library_model}
MODEL_ARGS = {"depth": int, "widen_factor": int, "dropout": float, "num_classes": int, "library": str, "name": str,
              "kwargs": dict}
# The short name snapshot metadata gives each model, from its config's values (else its class path).
SHORT_NAMES = {"snapens.models.CifarResNet": "resnet{depth}", "snapens.models.WideResNet": "wrn{depth}_{widen_factor}",
               "snapens.models.library_model": "{library}.{name}"}
# A file's model is counted before it is built: 1 billion parameters is 27 times WRN-28-10 (36.5 million), and bounds
# the memory a crafted file can take (a WRN of depth 994 and width 32 would be 12 billion).
MAX_PARAMETERS = 1_000_000_000


def model_from_metadata(config: dict, source: str) -> torch.nn.Module:
    """A snapshot's model from the model config stored in its metadata, without Hydra's instantiate: the file may
    come from anyone, and instantiate would call whatever `_target_` (at any depth) the file names. Only our model
    classes and plain numeric arguments are accepted; `source` names the file in the error."""
    config = dict(config or {})
    config.pop("weights", None)  # the run's starting weights, replaced by the snapshot's own: the path is not read
    cls = MODEL_CLASSES.get(config.pop("_target_", None))
    bad = [k for k, v in config.items() if k not in MODEL_ARGS or type(v) not in (MODEL_ARGS[k], int)]
    if cls is None or bad:
        raise SnapensError(f"{source} names a model snapens cannot build safely ({config or 'no model config'}); "
                           f"only {', '.join(MODEL_CLASSES)} with numeric {', '.join(MODEL_ARGS)}")
    try:
        check_size(cls, config, source)
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise SnapensError(f"{source}: {e}") from None


def check_size(cls, config: dict, source: str) -> None:
    """The model's parameters counted on the meta device (shapes only, no memory) before it is built for real."""
    with torch.device("meta"):
        size = sum(p.numel() for p in cls(**config).parameters())
    if size > MAX_PARAMETERS:
        raise SnapensError(f"{source} names a model of {size:,} parameters, more than the {MAX_PARAMETERS:,} snapens "
                           "builds from a file")


def short_name(config: dict) -> str:
    """resnet20, wrn28_10, torchvision.resnet18, or the class path of another model."""
    pattern = SHORT_NAMES.get(config.get("_target_"))
    return pattern.format(**config) if pattern else str(config.get("_target_"))


__all__ = ["CifarResNet", "WideResNet", "library_model", "model_from_metadata", "short_name"]
