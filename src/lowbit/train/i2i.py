"""Paired image-to-image GAN training (pix2pix: adversarial + lambda * L1), FP or quantization-aware.

``train_i2i(cfg, out_dir)`` trains a generator ``G(a) -> b`` (``unet-g``, ``resnet-g`` or any
registry model taking images) against a conditional discriminator ``D(a, b)`` (``patchgan-d``) on a
paired dataset of ``lowbit.data.load_pairs``. Per step: one D update on the real pair (a, b) and
the fake pair (a, G(a)) with the loss halved (pix2pix §3.3), then one G update on the adversarial
loss plus ``l1_weight`` x mean |G(a) - b| (pix2pix eq. 4, lambda = 100). Each network may carry its
own ``QuantSpec`` and ``init_from`` starts QAT from a full-precision run. Everything else (resume,
checkpoints, logs, DDP, divergence check) is the shared loop of ``lowbit.train.loop``; checkpoints
are GAN checkpoints of kind ``lowbit-i2i``, so ``load_generator`` and every consumer of it work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.train.checkpoint import load_weights
from lowbit.train.distill import check_weights as check_distill_weights
from lowbit.train.distributed import DistContext
from lowbit.train.gan import (
    LR_DECAYS,
    BatchStream,
    DataSpec,
    TrainResult,
    distiller,
    frozen,
    network_optimizer,
    teacher_of,
    train_task,
)
from lowbit.train.gan_losses import GanLoss, get_loss
from lowbit.train.loop import (
    Evaluator,
    StepLoopConfig,
    predict,
    seeded_generator,
    unwrap,
    wrap_ddp,
)
from lowbit.train.networks import I2I_KIND, NetSpec, build_networks
from lowbit.train.optim import LrScale

SAMPLE_ROWS = 16
#: adversarial losses that suit a patch discriminator (BCE as pix2pix, or least squares as CycleGAN)
I2I_LOSSES = ("dcgan", "lsgan")


@dataclass
class PairedDataSpec(DataSpec):
    """A paired dataset of ``lowbit.data.load_pairs``: the fields of DataSpec, a paired dataset by default."""

    dataset: str = "edges2fashion"


@dataclass
class I2IConfig(StepLoopConfig):
    """Everything ``train_i2i`` needs; ``betas``/learning rates left None take the loss's defaults."""

    name: str = "i2i"
    task: Literal["i2i"] = "i2i"
    data: PairedDataSpec = field(default_factory=PairedDataSpec)
    generator: NetSpec = field(default_factory=lambda: NetSpec("unet-g"))
    discriminator: NetSpec = field(default_factory=lambda: NetSpec("patchgan-d"))
    loss: str = "dcgan"
    l1_weight: float = 100.0
    batch_size: int = 16
    betas: list[float] | None = None
    init_from: str | None = None
    distill: float = 0.0
    distill_features: float = 0.0
    lr_decay: str = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_distill_weights(self.distill, self.distill_features, self.init_from)
        if self.l1_weight < 0:
            raise ConfigError(f"'l1_weight' must be >= 0 (pix2pix uses 100), got {self.l1_weight}")
        if self.loss not in I2I_LOSSES:
            raise ConfigError(f"i2i loss must be one of {', '.join(I2I_LOSSES)}, got '{self.loss}'")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"unknown lr_decay '{self.lr_decay}'; valid: {', '.join(LR_DECAYS)}")
        if self.betas is not None and len(self.betas) != 2:
            raise ConfigError(f"'betas' must be two numbers like [0.5, 0.999], got {self.betas}")
        if self.select.enabled:
            raise ConfigError("select is for noise GANs: a paired dataset has no held-out split besides the "
                              "test split its final evaluation uses; remove select")


def load_paired(cfg: I2IConfig, generator: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pairs, checked against the generator's input and output shapes."""
    from lowbit.data import load_pairs

    spec = cfg.data
    inputs, targets = load_pairs(spec.dataset, spec.split, spec.root, spec.limit, **spec.options)
    model = unwrap(generator)
    for role, have, want in (("input", inputs, model.input_shape), ("target", targets, model.image_shape)):
        if tuple(have.shape[1:]) != tuple(want):
            raise ConfigError(f"dataset '{spec.dataset}' gives {tuple(have.shape[1:])} {role}s but generator "
                              f"'{cfg.generator.model}' {cfg.generator.kwargs} needs {tuple(want)}; set its "
                              "size / scale / channels kwargs to match the data")
    if inputs.shape[0] < cfg.batch_size:
        raise ConfigError(f"dataset has {inputs.shape[0]} pairs, fewer than batch_size {cfg.batch_size}; "
                          "lower batch_size or raise data.limit")
    return inputs, targets


class I2ITrainer:
    """G, the conditional D and their optimisers; ``d_step``/``g_step`` are one update of each."""

    def __init__(self, cfg: I2IConfig, generator: nn.Module, discriminator: nn.Module,
                 device: torch.device, teacher: nn.Module | None = None,
                 example: torch.Tensor | None = None) -> None:
        """``teacher``: the FP generator to distil from; ``example``: a few inputs (default zeros) on which
        the distillation's feature taps probe both networks' channel counts."""
        self.loss: GanLoss = get_loss(cfg.loss)
        self.device, self.l1_weight = device, cfg.l1_weight
        self.G, self.D = generator.to(device), discriminator.to(device)
        betas = tuple(cfg.betas) if cfg.betas is not None else self.loss.betas
        g_lr = cfg.generator.lr or self.loss.lr
        example = torch.zeros(2, *unwrap(generator).input_shape) if example is None else example
        self.distiller = distiller(cfg, teacher, self.G, example.to(device), self.loss, g_lr, betas)
        self.opt_g = network_optimizer(self.loss, self.G, g_lr, betas)
        self.opt_d = network_optimizer(self.loss, self.D, cfg.discriminator.lr or self.loss.lr, betas)
        self.lr_scale = LrScale(self.opt_g, self.opt_d)

    def d_step(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """One D update: real pair (a, b) vs fake pair (a, G(a)), the loss halved as in pix2pix."""
        with torch.no_grad():
            fake = self.G(a)
        loss = 0.5 * self.loss.d_loss(self.D(a, b), self.D(a, fake))
        loss.backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        return float(loss.detach())

    def g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        """One G update on adversarial + l1_weight x L1 (+ the FP teacher's distillation terms when
        ``distill`` / ``distill_features`` are set, ``lowbit.train.distill``); returns (total loss, L1)."""
        fake, teacher = self.distiller.forward(self.G, a) if self.distiller else (self.G(a), None)
        with frozen(unwrap(self.D)) as critic:
            l1 = (fake - b).abs().mean()
            loss = self.loss.g_loss(critic(a, fake)) + self.l1_weight * l1
            if self.distiller:
                loss = loss + self.distiller.loss(fake, teacher)
            loss.backward()
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.distiller:
            self.distiller.step()
        return float(loss.detach()), float(l1.detach())

    def state(self) -> dict[str, Any]:
        """Both networks' weights and both optimisers' states (for a checkpoint)."""
        state = {"generator": unwrap(self.G).state_dict(), "discriminator": unwrap(self.D).state_dict(),
                 "optim_g": self.opt_g.state_dict(), "optim_d": self.opt_d.state_dict()}
        return {**state, **self.distiller.state()} if self.distiller else state

    def load_state(self, state: dict[str, Any], source: str) -> None:
        """Restore what ``state()`` saved; a mismatch names ``source``."""
        load_weights(unwrap(self.G), state["generator"], f"{source} (generator)")
        load_weights(unwrap(self.D), state["discriminator"], f"{source} (discriminator)")
        self.opt_g.load_state_dict(state["optim_g"])
        self.opt_d.load_state_dict(state["optim_d"])
        if self.distiller:
            self.distiller.load_state(state, source)


def comparison_grid(models: list[nn.Module], inputs: torch.Tensor, targets: torch.Tensor, path: Path) -> Path:
    """A PNG with one row per pair: input (enlarged to the target size) | each model's output | target."""
    from lowbit.data import save_image_grid

    outputs = [predict(model, inputs) for model in models]
    enlarged = nn.functional.interpolate(inputs.cpu(), size=targets.shape[-2:], mode="nearest")
    rows = torch.stack([enlarged, *outputs, targets.cpu()], dim=1).flatten(0, 1)
    return save_image_grid(rows, path, nrow=len(models) + 2)


class I2ITask:
    """The image-to-image GAN's part of the shared loop: one D and one G update per step."""

    kind = I2I_KIND
    loss_names = {"d_loss": "discriminator loss", "g_loss": "generator loss", "l1": "L1 loss"}

    def __init__(self, cfg: I2IConfig, device: torch.device, ctx: DistContext) -> None:
        self.cfg, self.device = cfg, device
        generator, discriminator = build_networks(cfg)
        self.inputs, self.targets = load_paired(cfg, generator)
        self.trainer = I2ITrainer(cfg, generator, discriminator, device, teacher_of(cfg), self.inputs[:2])
        index = torch.arange(self.inputs.shape[0]).view(-1, 1, 1, 1)
        self.stream = BatchStream(index, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
        order = torch.randperm(self.inputs.shape[0], generator=seeded_generator(cfg.seed, 0, 99))
        fixed = order[:SAMPLE_ROWS]
        self.fixed = (self.inputs[fixed], self.targets[fixed])

    def step(self, step: int) -> dict[str, float]:
        """One discriminator and one generator update on batch ``step - 1``."""
        if self.cfg.lr_decay == "linear":
            self.trainer.lr_scale.set(1.0 - (step - 1) / self.cfg.steps)
        index = self.stream.batch(step - 1).flatten()
        a, b = self.inputs[index].to(self.device), self.targets[index].to(self.device)
        d_loss = self.trainer.d_step(a, b)
        g_loss, l1 = self.trainer.g_step(a, b)
        return {"d_loss": d_loss, "g_loss": g_loss, "l1": l1}

    def models(self) -> list[nn.Module]:
        return [self.trainer.G, self.trainer.D]

    def state(self) -> dict[str, Any]:
        return self.trainer.state()

    def load_state(self, state: dict[str, Any], source: str) -> None:
        self.trainer.load_state(state, source)

    def model_state(self) -> dict[str, Any]:
        return {"generator": unwrap(self.trainer.G).state_dict(),
                "discriminator": unwrap(self.trainer.D).state_dict()}

    def distribute(self, device: torch.device) -> None:
        self.trainer.G, self.trainer.D = wrap_ddp(self.trainer.G, device), wrap_ddp(self.trainer.D, device)

    @property
    def sampler(self) -> nn.Module:
        return unwrap(self.trainer.G)

    def save_samples(self, path: Path) -> Path:
        return comparison_grid([self.sampler], *self.fixed, path)


def train_i2i(
    cfg: I2IConfig,
    out_dir: str | Path,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or QAT fine-tune) the image-to-image GAN of ``cfg`` into ``out_dir``."""
    return train_task(I2ITask, cfg, out_dir, evaluator, resume, overwrite, progress)
