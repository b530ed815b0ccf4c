"""Pruning as a model transform (seed 004 §1.1): unstructured magnitude pruning with masks, and structured
channel pruning that removes channels physically through torch-pruning's dependency graph.

Unstructured: a ``weight_mask`` buffer (0/1, the weight's shape) on every pruned layer; the float weight is
multiplied by it after every optimiser step (``Pruning.after_step``) and a quantized layer multiplies its
quantized weight by it, so pruned weights are exactly 0 in training, in ``freeze`` and in the packed file.
Sparsity follows Zhu & Gupta's polynomial schedule ``s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3)`` when
gradual, or is reached at once. Structured: whole output channels of conv / transposed conv / linear layers
are removed together with every layer that depends on them (norms, the next layer's input channels,
residual adds, concatenations), so the pruned model is a smaller dense model.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.config import unknown_name_error
from lowbit.errors import ConfigError
from lowbit.nn.inputs import default_example

KINDS = ("unstructured", "channels")
CRITERIA = {"unstructured": ("magnitude",), "channels": ("l1", "bn_gamma", "group_l2", "learned")}
SCOPES = ("layer", "global")
SCHEDULES = ("oneshot", "gradual")
WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
MASK = "weight_mask"


@dataclass
class PruneSpec:
    """What to prune and how: ``kind`` unstructured (``magnitude``, per ``layer`` or ``global``, ``oneshot``
    or ``gradual`` from ``start_step`` to ``end_step`` every ``every`` steps) or channels (``l1`` norm of
    the filters, ``bn_gamma`` = network slimming's BatchNorm scales, ``group_l2`` = the L2 norm of every
    coupled group, ``learned`` = per-channel gates learned with an L1 penalty, ``learn_*``, see
    ``learn_channel_gates``). ``ratio`` in [0, 1) is the share removed; ``layers`` / ``keep`` are module-name
    patterns (fnmatch) of the layers pruned and of those left whole (the output layer always keeps its
    outputs)."""

    kind: str = "unstructured"
    ratio: float = 0.5
    criterion: str | None = None
    scope: str = "layer"
    schedule: str = "oneshot"
    start_step: int = 0
    end_step: int = 1000
    every: int = 100
    layers: list[str] = field(default_factory=lambda: ["*"])
    keep: list[str] = field(default_factory=list)
    learn_steps: int = 150
    learn_penalty: float = 0.3
    learn_lr: float = 0.03
    learn_batch: int = 32

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise unknown_name_error("prune kind", self.kind, KINDS)
        self.criterion = self.criterion or CRITERIA[self.kind][0]
        if self.criterion not in CRITERIA[self.kind]:
            raise unknown_name_error(f"{self.kind} pruning criterion", self.criterion, CRITERIA[self.kind])
        if (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, (int, float))
            or not 0 <= self.ratio < 1
        ):
            raise ConfigError(
                f"prune ratio must be in [0, 1) (the share of weights or channels removed), "
                f"got {self.ratio!r}"
            )
        if self.scope not in SCOPES:
            raise unknown_name_error("prune scope", self.scope, SCOPES)
        if self.schedule not in SCHEDULES:
            raise unknown_name_error("prune schedule", self.schedule, SCHEDULES)
        if self.kind == "channels" and (self.schedule != "oneshot" or self.scope != "layer"):
            raise ConfigError(
                "channel pruning is one-shot and per layer (it rebuilds the model); "
                "use schedule: oneshot, scope: layer"
            )
        if self.schedule == "gradual" and not 0 <= self.start_step < self.end_step or self.every < 1:
            raise ConfigError(
                f"gradual pruning needs 0 <= start_step < end_step and every >= 1, got "
                f"{self.start_step}, {self.end_step}, {self.every}"
            )
        if not self.layers:
            raise ConfigError("prune layers must name at least one pattern, e.g. ['*']")
        if min(self.learn_steps, self.learn_batch) < 1 or self.learn_penalty < 0 or not self.learn_lr > 0:
            raise ConfigError(f"learned channel gates need learn_steps >= 1, learn_batch >= 1, learn_penalty "
                              f">= 0 and learn_lr > 0, got {self.learn_steps}, {self.learn_batch}, "
                              f"{self.learn_penalty}, {self.learn_lr}")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def targets(model: nn.Module, spec: PruneSpec) -> dict[str, nn.Module]:
    """The weight layers ``spec`` prunes, by name; an error when its patterns match none."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, WEIGHT_LAYERS) and _matches(name, spec.layers) and not _matches(name, spec.keep)
    }
    if not found:
        names = [name for name, module in model.named_modules() if isinstance(module, WEIGHT_LAYERS)]
        raise ConfigError(
            f"prune layers {spec.layers} (keep {spec.keep}) match no conv / linear layer of "
            f"{type(model).__name__}; its weight layers are: {', '.join(names[:12])}"
        )
    return found


def polynomial_sparsity(spec: PruneSpec, step: int) -> float:
    """Zhu & Gupta's cubic schedule from 0 at ``start_step`` to ``ratio`` at ``end_step`` (constant after)."""
    if spec.schedule == "oneshot":
        return spec.ratio
    progress = min(max((step - spec.start_step) / (spec.end_step - spec.start_step), 0.0), 1.0)
    return spec.ratio * (1 - (1 - progress) ** 3)


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask keeping the ``1 - sparsity`` share of largest scores (exactly that many, ties by index)."""
    flat = scores.reshape(-1)
    pruned = int(math.floor(sparsity * flat.numel()))
    mask = torch.ones_like(flat)
    if pruned:
        mask[torch.argsort(flat, stable=True)[:pruned]] = 0
    return mask.reshape(scores.shape)


def update_masks(model: nn.Module, spec: PruneSpec, sparsity: float) -> None:
    """Recompute every pruned layer's mask at ``sparsity`` (per layer or over all of them), apply it."""
    layers = {name: module for name, module in model.named_modules() if hasattr(module, MASK)}
    with torch.no_grad():
        if spec.scope == "global":
            scores = torch.cat([m.weight.detach().abs().reshape(-1) for m in layers.values()])
            masks = _keep_largest(scores, sparsity).split([m.weight.numel() for m in layers.values()])
            for module, mask in zip(layers.values(), masks, strict=True):
                getattr(module, MASK).copy_(mask.reshape(module.weight.shape))
        else:
            for module in layers.values():
                getattr(module, MASK).copy_(_keep_largest(module.weight.detach().abs(), sparsity))
        apply_masks(model)


def apply_masks(model: nn.Module) -> None:
    """Zero the pruned weights (after an optimiser step, so they stay exactly 0)."""
    with torch.no_grad():
        for module in model.modules():
            mask = getattr(module, MASK, None)
            if mask is not None:
                module.weight.mul_(mask)


def sparsity_of(model: nn.Module) -> float:
    """Share of zero mask entries over every masked layer (0 when nothing is masked)."""
    masks = [getattr(m, MASK) for m in model.modules() if getattr(m, MASK, None) is not None]
    total = sum(mask.numel() for mask in masks)
    return 0.0 if total == 0 else float(sum((mask == 0).sum() for mask in masks)) / total


class Pruning:
    """The training hooks of one PruneSpec: masks re-applied after every step, updated on the schedule."""

    def __init__(self, spec: PruneSpec) -> None:
        self.spec = spec

    def after_step(self, model: nn.Module, step: int) -> None:
        spec = self.spec
        if (
            spec.schedule == "gradual"
            and spec.start_step <= step <= spec.end_step
            and ((step - spec.start_step) % spec.every == 0 or step == spec.end_step)
        ):
            update_masks(model, spec, polynomial_sparsity(spec, step))
        else:
            apply_masks(model)


def prune_unstructured(model: nn.Module, spec: PruneSpec) -> Pruning:
    """Add masks to the target layers and prune them to the schedule's first sparsity."""
    for module in targets(model, spec).values():
        if getattr(module, MASK, None) is None:
            module.register_buffer(MASK, torch.ones_like(module.weight, requires_grad=False))
    update_masks(model, spec, polynomial_sparsity(spec, spec.start_step))
    return Pruning(spec)


def _example_input(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    return default_example(model) if example is None else example


def _importance(criterion: str) -> Any:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "bn_gamma": tp.importance.BNScaleImportance,
        "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "learned": tp.importance.BNScaleImportance,  # on the scales the learned gates were folded into
    }[criterion]()


def _affine_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def _gate(gate: torch.Tensor) -> Any:
    """A forward hook scaling a norm layer's output channels (dim 1) by ``gate``."""
    return lambda module, inputs, output: output * gate.view(1, -1, *([1] * (output.dim() - 2)))


def learn_channel_gates(model: nn.Module, spec: PruneSpec, example: torch.Tensor) -> list[torch.Tensor]:
    """Learned channel importance (network slimming's sparse scales, Liu et al. 2017 §3, learned as in He
    et al. 2017's LASSO channel selection): a gate s_c per BatchNorm channel, from 1, minimises
    ``|f_s(z) - f(z)|^2 / |f(z)|^2 + learn_penalty * mean |s|`` over ``learn_steps`` Adam steps on fresh
    inputs z ~ N(0, I) shaped like ``example`` (the model's own input distribution: a latent), weights
    frozen; the gates are then folded into the scales and shifts (gamma, beta <- s gamma, s beta), so the
    channels the output needs least carry the smallest |gamma| for the ``bn_gamma`` ranking. In place;
    returns the gates."""
    norms = _affine_norms(model)
    gates = [torch.ones(norm.num_features, requires_grad=True) for norm in norms]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(gates, lr=spec.learn_lr)
    noise = torch.Generator().manual_seed(0)
    try:
        for _ in range(spec.learn_steps):
            z = torch.randn(spec.learn_batch, *example.shape[1:], generator=noise)
            with torch.no_grad():
                target = model(z)
            hooks = [norm.register_forward_hook(_gate(gate)) for norm, gate in zip(norms, gates, strict=True)]
            try:
                error = (model(z) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
            finally:
                for hook in hooks:
                    hook.remove()
            sparsity = torch.cat(gates).abs().mean()
            optimizer.zero_grad()
            (error + spec.learn_penalty * sparsity).backward()
            optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        for norm, gate in zip(norms, gates, strict=True):
            norm.weight.mul_(gate)
            norm.bias.mul_(gate)
    return [gate.detach() for gate in gates]


def _check_criterion(model: nn.Module, spec: PruneSpec) -> None:
    """The ranking's needs: affine BatchNorm scales (bn_gamma, learned) and a latent input (learned)."""
    if spec.criterion in ("bn_gamma", "learned") and not _affine_norms(model):
        raise ConfigError(f"criterion {spec.criterion} (network slimming) needs BatchNorm layers with affine "
                          f"scales; {type(model).__name__} has none: use l1 or group_l2")
    if spec.criterion == "learned" and not getattr(model, "latent_dim", None):
        raise ConfigError(f"criterion learned fits its gates on the model's own inputs drawn as N(0, I) "
                          f"latents; {type(model).__name__} has no latent_dim (it takes images): use l1, "
                          "bn_gamma or group_l2")


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The weight layers whose outputs reach the model's output without another weight layer in between:
    their output channels are the model's, so they are never pruned."""
    last: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda module, i, o: last.append(module))
        for m in model.modules()
        if isinstance(m, WEIGHT_LAYERS)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return last[-1:]


def prune_channels(model: nn.Module, spec: PruneSpec, example: torch.Tensor | None = None) -> None:
    """Remove ``ratio`` of the output channels of every target layer (and all coupled to them) in place,
    keeping the model's input and output shapes."""
    from lowbit.nn.layers import QuantAct, QuantLayerMixin

    if any(isinstance(m, (QuantLayerMixin, QuantAct)) for m in model.modules()):
        raise ConfigError(
            "channel pruning must come before quantization (its quantizers hold per-channel state); "
            "list the PruneSpec before the QuantSpec"
        )
    _check_criterion(model, spec)
    if spec.ratio == 0:
        return
    example = _example_input(model, example)
    chosen = targets(model, spec)
    modes = {m: m.training for m in model.modules()}  # restored: a model built for training stays in train
    try:
        model.eval()  # no pass below may update BatchNorm statistics
        ignored = [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS) and m not in chosen.values()]
        ignored += output_layers(model, example)
        with torch.enable_grad():  # gates learn, and torch-pruning traces its graph, through autograd
            if spec.criterion == "learned":
                learn_channel_gates(model, spec, example)
            _remove_channels(model, spec, example, ignored)
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _remove_channels(model: nn.Module, spec: PruneSpec, example: torch.Tensor, ignored: list[nn.Module]
                     ) -> None:
    """torch-pruning's MetaPruner at ``spec.ratio`` with the spec's ranking; its errors become one clear
    ConfigError."""
    import torch_pruning as tp

    try:
        pruner = tp.pruner.MetaPruner(model, example, importance=_importance(spec.criterion),
                                      pruning_ratio=spec.ratio, ignored_layers=ignored)
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises many types; all become one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"channel pruning of {type(model).__name__} failed in torch-pruning ({first[:200]}); "
            "keep the layer it names out with `keep`, or use unstructured pruning"
        ) from None


def slimming_penalty(model: nn.Module, weight: float) -> torch.Tensor:
    """Network slimming's L1 term ``weight * sum |gamma|`` over every BatchNorm scale (add it to the loss)."""
    gammas = [
        m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
    ]
    if not gammas:
        raise ConfigError("network slimming needs BatchNorm layers with affine scales; this model has none")
    return weight * sum(gamma.abs().sum() for gamma in gammas)
