"""The networks of a GAN run and its checkpoints: a network spec (registry name, kwargs, transforms), building
it, and reading a GAN or image-to-image checkpoint (a path or a shipped name) back into its networks.

One home for what the trainers, the pipeline, the studies, ``lowbit eval`` and the exporter all need to turn
a checkpoint into models; the trainers themselves (``lowbit.train.gan`` / ``.i2i``) only write checkpoints.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.config import from_dict
from lowbit.errors import CheckpointError, ConfigError
from lowbit.models import create_model, hub
from lowbit.nn import QuantSpec, compress
from lowbit.nn.transforms import spec_from_dict
from lowbit.train.checkpoint import load_checkpoint, load_weights

CHECKPOINT_KIND = "lowbit-gan"
#: the image-to-image GAN's checkpoints (``lowbit.train.i2i``): the same layout, an I2IConfig inside
I2I_KIND = "lowbit-i2i"
#: checkpoint kind -> "module:class" of the config stored inside (imported when a checkpoint is read)
CONFIG_CLASSES = {CHECKPOINT_KIND: "lowbit.train.gan:GanConfig", I2I_KIND: "lowbit.train.i2i:I2IConfig"}


@dataclass
class NetSpec:
    """One network: registry name + constructor kwargs, an optional QuantSpec and learning rate."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    quant: QuantSpec | None = None
    lr: float | None = None
    transforms: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"{self.model}: lr must be a positive number (e.g. 2e-4), got {self.lr}")
        self.transform_specs()

    def transform_specs(self) -> list[Any]:
        """The model transforms in order (``lowbit.compress``): ``transforms``, then ``quant`` if given."""
        specs = [spec_from_dict(entry) for entry in self.transforms]
        return specs + ([self.quant] if self.quant is not None else [])


def pretrained_names() -> list[str]:
    """Names of the shipped full-precision checkpoints (the model hub's ``pretrained`` assets)."""
    return hub.names("pretrained")


def resolve_checkpoint(name_or_path: str) -> Path:
    """A checkpoint path, or the shipped pretrained checkpoint of that name (e.g. ``dcgan-mnist``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    try:
        return hub.find("pretrained", name_or_path).weights
    except CheckpointError:
        raise CheckpointError(
            f"checkpoint not found: '{name_or_path}'; pass a .safetensors path or one of the "
            f"shipped names: {', '.join(pretrained_names()) or '(none)'}"
        ) from None


def create_network(spec: NetSpec) -> nn.Module:
    """The full-precision network named by ``spec`` (registry name + kwargs)."""
    try:
        return create_model(spec.model, **spec.kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model '{spec.model}': bad kwargs {spec.kwargs} ({exc}); fix the 'kwargs' section"
        ) from None


def quantize_network(model: nn.Module, spec: NetSpec) -> nn.Module:
    """``model`` with the spec's transforms applied (pruning, quantization; unchanged when it has none)."""
    specs = spec.transform_specs()
    return compress(model, specs, inplace=True) if specs else model


def read_gan_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a GAN checkpoint (training state or model file) and check that it is one."""
    state = load_checkpoint(resolve_checkpoint(str(path)))
    if state.get("kind") not in CONFIG_CLASSES or "config" not in state:
        raise CheckpointError(
            f"{path} is not a lowbit GAN checkpoint (no generator/config inside); "
            "pass a file written by `lowbit train`"
        )
    for key in ("config", "generator", "discriminator"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: entry '{key}' is missing or not a mapping; the checkpoint is "
                                  "damaged, restore it or retrain")
    return state


def config_class(kind: str) -> type:
    """The config dataclass stored in a checkpoint of ``kind`` (the table ``CONFIG_CLASSES``)."""
    module, name = CONFIG_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def stored_config(state: dict[str, Any], path: str | Path) -> Any:
    """The config inside a checkpoint already read by ``read_gan_checkpoint``, validated."""
    try:
        return from_dict(config_class(state["kind"]), state["config"])
    except ConfigError as exc:
        raise CheckpointError(
            f"{path}: stored config is invalid ({exc}); retrain with this lowbit version"
        ) from None


def checkpoint_config(path: str | Path) -> Any:
    """The config a GAN checkpoint (path or shipped name) was trained with: a ``GanConfig``, or an
    ``I2IConfig`` for an image-to-image GAN (``lowbit.train.i2i``)."""
    return stored_config(read_gan_checkpoint(path), path)


def check_same_architecture(own: NetSpec, stored: NetSpec, role: str, path: str | Path) -> None:
    """Refuse weights of another architecture before loading them (a clearer error than a shape mismatch)."""
    if (own.model, own.kwargs) != (stored.model, stored.kwargs):
        raise CheckpointError(
            f"{path} holds {role} '{stored.model}' {stored.kwargs} but the config asks for "
            f"'{own.model}' {own.kwargs}; use a checkpoint of the same architecture"
        )


def rebuild(spec: NetSpec, state: dict[str, torch.Tensor], role: str, path: str | Path) -> nn.Module:
    """The network of ``spec`` with its transforms applied and the checkpoint's weights loaded."""
    model = quantize_network(create_network(spec), spec)
    load_weights(model, state, f"{path} ({role})")
    return model


def load_generator(checkpoint_path: str | Path) -> nn.Module:
    """The (possibly quantized) generator of a GAN checkpoint, rebuilt from its config, in eval mode."""
    state = read_gan_checkpoint(checkpoint_path)
    cfg = stored_config(state, checkpoint_path)
    return rebuild(cfg.generator, state["generator"], "generator", checkpoint_path).eval()


def load_discriminator(checkpoint_path: str | Path) -> nn.Module:
    """The (possibly quantized) discriminator of a GAN checkpoint, rebuilt from its config, in eval mode."""
    state = read_gan_checkpoint(checkpoint_path)
    cfg = stored_config(state, checkpoint_path)
    return rebuild(cfg.discriminator, state["discriminator"], "discriminator", checkpoint_path).eval()


def inherited_transforms(own: NetSpec, stored: NetSpec, role: str, path: str | Path) -> int:
    """How many of ``own``'s transforms the ``init_from`` checkpoint already applied: all of the stored ones,
    which must open ``own``'s list unchanged (a pruned FP checkpoint reloads as its smaller dense model, then
    this config's further transforms, e.g. quantization, apply to it: a two-stage recipe). A quantized
    checkpoint is refused (its quantizers' state would restart)."""
    theirs, mine = stored.transform_specs(), own.transform_specs()
    if any(isinstance(spec, QuantSpec) for spec in theirs):
        raise CheckpointError(
            f"init_from {path}: its {role} is already quantized; start QAT from a full-precision (possibly "
            "pruned) checkpoint, or continue that run with --resume"
        )
    if mine[: len(theirs)] != theirs:
        raise CheckpointError(
            f"init_from {path}: its {role} was trained with the transforms {theirs} but this config's "
            f"{role} transforms {mine} do not start with them; copy that run's {role} 'transforms' (and "
            "'quant') first in this config, then add the new ones"
        )
    return len(theirs)


def build_networks(cfg: Any, fresh: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """G and D for a fresh run: random init, or the weights of ``init_from``, then transformed by spec;
    the roles named in ``fresh`` ("generator", "discriminator") keep their random init either way. When
    ``init_from`` was itself pruned, its transforms are rebuilt first, its weights loaded,
    and only this config's further transforms applied (``inherited_transforms``)."""
    nets = {"generator": create_network(cfg.generator), "discriminator": create_network(cfg.discriminator)}
    state = read_gan_checkpoint(cfg.init_from) if cfg.init_from is not None else None
    stored = stored_config(state, cfg.init_from) if state is not None else None
    for role, model in nets.items():
        own = getattr(cfg, role)
        specs = own.transform_specs()
        if stored is not None:
            check_same_architecture(own, getattr(stored, role), role, cfg.init_from)
        if stored is not None and role not in fresh:
            done = inherited_transforms(own, getattr(stored, role), role, cfg.init_from)
            model = compress(model, specs[:done], inplace=True)
            load_weights(model, state[role], f"{cfg.init_from} ({role})")
            specs = specs[done:]
        nets[role] = compress(model, specs, inplace=True) if specs else model
    return nets["generator"], nets["discriminator"]
