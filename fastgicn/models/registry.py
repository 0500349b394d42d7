"""Model registry (the timm habit): `create_model(name, **kwargs)`; unknown names raise ConfigError."""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from ..errors import ConfigError
from .network import ResNet50GicnGpp

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    factory = _REGISTRY[name]
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"model {name!r} takes no argument(s) {unknown}; it takes {sorted(accepted)}")
    model = factory(**kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model


@register_model
def resnet50_gicn_gpp(num_classes: int = 2, k: int = 7, width: float = 1.0) -> nn.Module:
    """The paper's network: GICN decoder and GPP branch fused by the 1x1 head."""
    return ResNet50GicnGpp(num_classes, k, width, use_gicn=True, use_gpp=True)


@register_model
def resnet50_gicn(num_classes: int = 2, k: int = 7, width: float = 1.0) -> nn.Module:
    """Table 1 ablation without GPP."""
    return ResNet50GicnGpp(num_classes, k, width, use_gicn=True, use_gpp=False)


@register_model
def resnet50_gpp(num_classes: int = 2, width: float = 1.0) -> nn.Module:
    """Table 1 ablation without the GICN decoder."""
    return ResNet50GicnGpp(num_classes, 7, width, use_gicn=False, use_gpp=True)
