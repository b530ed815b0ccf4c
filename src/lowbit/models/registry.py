"""Registry of named models, timm-style: ``@register_model("dcgan-28")`` then ``create_model("dcgan-28")``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lowbit.config import unknown_name_error

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model factory under ``name``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise unknown_name_error("model", name, _REGISTRY)
    model = _REGISTRY[name](**kwargs)
    model.lowbit_name = name
    model.lowbit_kwargs = dict(kwargs)
    return model


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)
