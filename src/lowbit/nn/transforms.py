"""``compress(model, [spec, ...])``: model transforms applied in order, one handler registered per spec type
(torchao's ``register_quantize_module_handler`` pattern), so a new transform plugs in without name checks.

A handler returns the transformed model and, when the transform acts during training, a hook object; the
hooks are kept on the model (``transform_hooks``) and the shared training loop calls them through one
interface, ``after_step(model, step)`` after every optimiser step, for every model it trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import nn

from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.nn.convert import convert
from lowbit.nn.prune import PruneSpec, prune_channels, prune_unstructured
from lowbit.nn.spec import QuantSpec

HOOKS = "lowbit_transform_hooks"


class TransformHooks(Protocol):
    """What a training-time transform does during training."""

    def after_step(self, model: nn.Module, step: int) -> None: ...


Handler = Callable[[nn.Module, Any], tuple[nn.Module, TransformHooks | None]]
_HANDLERS: dict[type, Handler] = {}
#: config name of each spec type (the ``type:`` key of a ``transforms:`` entry)
SPEC_NAMES: dict[str, type] = {}


def register_transform(spec_type: type, name: str) -> Callable[[Handler], Handler]:
    """Register ``handler(model, spec) -> (model, hooks or None)`` for specs of ``spec_type``."""

    def register(handler: Handler) -> Handler:
        if spec_type in _HANDLERS:
            raise ConfigError(f"a transform for {spec_type.__name__} is registered already")
        _HANDLERS[spec_type] = handler
        SPEC_NAMES[name] = spec_type
        return handler

    return register


@register_transform(QuantSpec, "quant")
def _quantize(model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, None]:
    return convert(model, spec, inplace=True), None


@register_transform(PruneSpec, "prune")
def _prune(model: nn.Module, spec: PruneSpec) -> tuple[nn.Module, TransformHooks | None]:
    if spec.kind == "channels":
        prune_channels(model, spec)
        return model, None
    return model, prune_unstructured(model, spec)


def spec_from_dict(entry: dict[str, Any]) -> Any:
    """A spec from a config entry ``{type: quant|prune, ...fields}``."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise ConfigError(f"a transforms entry needs a 'type' ({', '.join(SPEC_NAMES)}), got {entry!r}")
    fields = {key: value for key, value in entry.items() if key != "type"}
    kind = entry["type"]
    if kind not in SPEC_NAMES:
        raise ConfigError(f"unknown transform type '{kind}'; valid: {', '.join(SPEC_NAMES)}")
    return from_dict(SPEC_NAMES[kind], fields, where=f"transforms[{kind}]")


def compress(model: nn.Module, specs: Sequence[Any], inplace: bool = False) -> nn.Module:
    """``model`` with every spec applied in order (e.g. ``[PruneSpec(...), QuantSpec(...)]``); specs may be
    spec objects or config dicts with a ``type``. The training hooks are kept on the returned model."""
    target = model if inplace else copy.deepcopy(model)
    hooks = list(transform_hooks(target))
    for raw in specs:
        spec = spec_from_dict(raw) if isinstance(raw, dict) else raw
        handler = _HANDLERS.get(type(spec))
        if handler is None:
            known = ", ".join(t.__name__ for t in _HANDLERS)
            raise ConfigError(f"no transform is registered for {type(spec).__name__}; known: {known}")
        target, hook = handler(target, spec)
        if hook is not None:
            hooks.append(hook)
    object.__setattr__(target, HOOKS, hooks)
    return target


def transform_hooks(model: nn.Module) -> list[TransformHooks]:
    """The training hooks that ``compress`` left on ``model`` (empty for an untransformed model)."""
    return list(getattr(model, HOOKS, []))
