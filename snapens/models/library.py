"""Any torchvision or timm classification model, by the name its library's registry knows it under:
`model=torchvision model.name=resnet18`, `model=timm model.name=resnet18 +model.kwargs.drop_rate=0.1` (timm: the
`timm` extra). Built with random weights through the library's own constructor (torchvision.models.get_model,
timm.create_model): nothing is downloaded; pretrained weights come from a local safetensors file
(`model.weights=PATH`). A snapshot's metadata keeps the library, the name and the keyword
arguments, and `snapens.models.model_from_metadata` rebuilds it through this same function, so a file can only
name a model its library registers, with plain keyword values: it runs no code of its own choosing.
"""

import logging
import math
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from snapens.files import file_digest
from snapens.models.resnet import check_num_classes

PLAIN = (bool, int, float, str)  # the keyword values a file may carry


log = logging.getLogger(__name__)
RESERVED = {"num_classes", "weights", "pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"}


def library_model(library: str, name: str, num_classes: int, kwargs: dict | None = None,
                  weights: str = "") -> nn.Module:
    """`name` from `library`'s registry with `num_classes` outputs and `kwargs` passed through, with random weights or
    those of the safetensors file `weights`; ValueError naming the key when the library, the name, a keyword value
    or the weights are not allowed."""
    check_num_classes(num_classes)
    kwargs = dict(kwargs or {})
    check_kwargs(kwargs)
    if library not in BUILDERS:
        raise ValueError(f"model.library={library} is not allowed; choose one of: {', '.join(BUILDERS)}")
    model = BUILDERS[library](name, num_classes, kwargs)
    if weights:
        load_pretrained(model, weights, num_classes)
    return model


def load_pretrained(model: nn.Module, path: str, num_classes: int) -> None:
    """The tensors of a safetensors file (a state_dict: safetensors.torch.save_file(model.state_dict(), PATH)) into
    the model, which must have every one of them under the same name and shape, but for its classifier (its rows
    are the data's classes: weights trained on ImageNet's 1,000 fit no 10-class head), which then stays random, as
    the log says (check_fit)."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"model.weights={path} cannot be read ({e}): give a safetensors file of the model's "
                         "state_dict") from None
    own = model.state_dict()
    reshaped = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    check_fit(path, state, own, [k for k in reshaped if k not in classifier_keys(model, num_classes)])
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)
    digest = file_digest(Path(path))
    but = (f", but for the classifier ({', '.join(reshaped)}), which in the file is not for {num_classes} classes: it "
           "starts random") if reshaped else ""
    log.info(f"model.weights={path} (SHA-256 {digest[:16]}) loaded{but}")


def check_fit(path: str, state: dict, own: dict, reshaped: list[str]) -> None:
    """The file holds the model's tensors, no others, and none of another shape (`reshaped`, the classifier's left
    out); BatchNorm's num_batches_tracked counters may be absent."""
    unknown = sorted(state.keys() - own.keys())
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    if unknown or missing or reshaped:
        raise ValueError(f"model.weights={path} does not fit this model ({len(unknown)} tensors it lacks, "
                         f"{len(missing)} it needs missing, {len(reshaped)} of another shape beyond the classifier; "
                         f"e.g. {(unknown or missing or reshaped)[0]}): give weights saved from the same architecture")


def classifier_keys(model: nn.Module, num_classes: int) -> set[str]:
    """The state_dict keys of the model's classifier: timm's get_classifier(), else the last linear or convolution
    layer with one output per class (torchvision's fc, classifier[-1], heads.head)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in reversed(list(model.named_modules())):
        if module is head or (head is None and getattr(module, "out_features", getattr(module, "out_channels", None))
                              == num_classes and isinstance(module, (nn.Linear, nn.Conv2d))):
            return {f"{name}.{key}" for key in module.state_dict()}
    return set()


def check_kwargs(kwargs: dict) -> None:
    """Plain keyword values only (what a file may carry), and none that snapens sets itself."""
    for key, value in kwargs.items():
        plain = type(value) in PLAIN and (not isinstance(value, float) or math.isfinite(value))
        if not plain or (isinstance(value, str) and len(value) > 100):
            raise ValueError(f"model.kwargs.{key}={value!r}: keyword values must be plain finite numbers, booleans or "
                             "short strings")
    if RESERVED & kwargs.keys():
        raise ValueError(f"model.kwargs.{sorted(RESERVED & kwargs.keys())[0]} is set by snapens (num_classes from the "
                         "data; random weights, nothing downloaded): leave it out")


def torchvision_model(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in names:
        raise ValueError(f"model.name={name} is not a torchvision classification model; e.g. "
                         f"{', '.join(n for n in names if n.startswith('resnet'))}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def timm_model(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError("model.library=timm needs timm: pip install -e '.[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"model.name={name} is not a timm model (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


BUILDERS = {"torchvision": torchvision_model, "timm": timm_model}  # the libraries a model may come from
