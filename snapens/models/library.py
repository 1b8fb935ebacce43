"""Any torchvision or timm classification model, by the name its library's registry knows it under:
`model=torchvision model.name=resnet18`, `model=timm model.name=resnet18 +model.kwargs.drop_rate=0.1` (timm: the
`timm` extra). Built with random weights through the library's own constructor (torchvision.models.get_model,
timm.create_model): nothing is downloaded. A snapshot's metadata keeps the library, the name and the keyword
arguments, and `snapens.models.model_from_metadata` rebuilds it through this same function, so a file can only
name a model its library registers, with plain keyword values: it runs no code of its own choosing.
"""

import math

from torch import nn

from snapens.models.resnet import check_num_classes

PLAIN = (bool, int, float, str)  # the keyword values a file may carry


RESERVED = {"num_classes", "weights", "pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"}


def library_model(library: str, name: str, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    """`name` from `library`'s registry with `num_classes` outputs, random weights and `kwargs` passed through;
    ValueError naming the key when the library, the name or a keyword value is not allowed."""
    check_num_classes(num_classes)
    kwargs = dict(kwargs or {})
    check_kwargs(kwargs)
    if library not in BUILDERS:
        raise ValueError(f"model.library={library} is not allowed; choose one of: {', '.join(BUILDERS)}")
    return BUILDERS[library](name, num_classes, kwargs)


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
