"""GAN training from scratch or quantization-aware fine-tuning (QAT) of a full-precision checkpoint.

``train_gan(cfg, out_dir)`` trains the generator/discriminator pair named in a ``GanConfig``; each
network may carry its own ``lowbit.nn.QuantSpec`` (G only as in seed 000, D only, or both as in
seed 001). Every run writes, under ``out_dir``: ``log.csv`` and TensorBoard events (``tb/``),
fixed-noise sample grids (``samples/``), the resumable checkpoint ``checkpoints/last.safetensors``
(models, optimisers, RNG state) and the final model file ``model.safetensors`` (models + config).
Batches and latent noise are derived from (seed, step), so ``resume=True`` reproduces the losses
of an uninterrupted run. Under ``torch.distributed`` the networks are wrapped in DDP, each rank
takes its slice of every batch and only rank 0 logs, evaluates and writes files. The loop itself
(resume, logs, checkpoints, divergence check, DDP) is ``lowbit.train.loop``, reading checkpoints back into
networks is ``lowbit.train.networks``; this module supplies the GAN step (``GanTask``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import data as lowbit_data
from lowbit.config import closest
from lowbit.errors import (  # TrainingDivergedError: raised by the guard, importable here as before
    ConfigError,
    TrainingDivergedError,  # noqa: F401
)
from lowbit.nn import anneal, param_group, quant_layers, quantize_weights
from lowbit.quant.search import SEARCH_LOGITS
from lowbit.train.checkpoint import load_weights
from lowbit.train.distill import Distiller, DistillWeights, hidden_activations
from lowbit.train.distill import check_weights as check_distill_weights
from lowbit.train.distributed import DistContext
from lowbit.train.gan_losses import (
    GanLoss,
    feature_matching_loss,
    get_loss,
    gradient_penalty,
    make_optimizer,
)
from lowbit.train.loop import (  # noqa: F401  (seeded_generator: public here)
    Evaluator,
    LoopSettings,
    StepLoopConfig,
    predict,
    run_training,
    seeded_generator,
    unwrap,
    wrap_ddp,
)
from lowbit.train.networks import (
    CHECKPOINT_KIND,
    NetSpec,
    build_networks,
    load_discriminator,
    load_generator,
    read_gan_checkpoint,
)
from lowbit.train.optim import LrScale, Optimizers, fused_if_supported
from lowbit.train.recalibrate import recalibrate_batchnorm
from lowbit.train.selection import Validator, fid_validator

SAMPLE_GRID = 64
#: learning-rate schedules: constant, or linear decay to 0 at the last step
LR_DECAYS = ("constant", "linear")


@dataclass
class DataSpec:
    """Training images: a ``lowbit.data`` dataset name, split, optional subset and loader options."""

    dataset: str = "mnist"
    split: str = "train"
    limit: int | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchSGD:
    """SGD with momentum for the search logits, as seed 002 §3.1 trains them; every other parameter
    keeps the loss's optimiser. With ``logits: centered`` the logits' trajectory is then exactly
    the full-logit one (docs/quantizers.md), and the logits carry one optimiser state, not two."""

    lr: float = 0.1
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.momentum < 1):
            raise ConfigError(f"search_sgd: need lr > 0 and 0 <= momentum < 1, got lr={self.lr}, "
                              f"momentum={self.momentum}")


@dataclass
class GanConfig(StepLoopConfig):
    """Everything ``train_gan`` needs; loss-dependent fields left None take the loss paper's default."""

    name: str = "gan"
    data: DataSpec = field(default_factory=DataSpec)
    generator: NetSpec = field(default_factory=lambda: NetSpec("dcgan-g-28"))
    discriminator: NetSpec = field(default_factory=lambda: NetSpec("dcgan-d-28"))
    loss: str = "dcgan"
    n_critic: int | None = None
    betas: list[float] | None = None
    clip: float | None = None
    gp_weight: float | None = None
    init_from: str | None = None
    #: the distillation teacher's checkpoint (path or shipped name); None = init_from
    teacher: str | None = None
    distill: float = 0.0
    distill_features: float = 0.0
    distill_perceptual: float = 0.0
    distill_warmup: int = 0
    feature_matching: float = 0.0
    weights_from_step: int = 0
    staged_layers: list[str] = field(default_factory=list)
    ema: float = 0.0
    lr_decay: str = "constant"
    search_sgd: SearchSGD | None = None
    recalibrate_bn: int = 0
    fresh_discriminator: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_critic is not None and self.n_critic < 1:
            raise ConfigError(f"'n_critic' must be >= 1, got {self.n_critic}")
        check_distill_weights(self.distill, self.distill_features, self.teacher or self.init_from,
                              self.distill_perceptual)
        if self.distill_warmup < 0 or (self.distill_warmup and not distills(self)):
            raise ConfigError(f"'distill_warmup' ({self.distill_warmup}) is a number of steps >= 0 that "
                              "train G on the distillation loss alone; it needs distill, distill_features "
                              "or distill_perceptual > 0")
        if self.feature_matching < 0:
            raise ConfigError(f"'feature_matching' is the weight of G's feature-matching term (>= 0, "
                              f"0 = off, e.g. 10), got {self.feature_matching}")
        if self.weights_from_step < 0:
            raise ConfigError(f"'weights_from_step' must be >= 0 (0 = weights quantized from the start), "
                              f"got {self.weights_from_step}")
        if self.staged_layers and not self.weights_from_step:
            raise ConfigError(f"'staged_layers' {self.staged_layers} name the layers whose weights stay "
                              "float up to 'weights_from_step'; set weights_from_step > 0 or drop "
                              "staged_layers")
        if self.recalibrate_bn < 0:
            raise ConfigError(f"'recalibrate_bn' is a number of latent batches (0 = off, e.g. 100), "
                              f"got {self.recalibrate_bn}")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(
                f"unknown lr_decay '{self.lr_decay}'{closest(self.lr_decay, LR_DECAYS)}; "
                f"valid: {', '.join(LR_DECAYS)}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"'ema' is a decay in [0, 1) (0 = off, e.g. 0.999), got {self.ema}")
        if self.betas is not None and len(self.betas) != 2:
            raise ConfigError(f"'betas' must be two numbers like [0.5, 0.999], got {self.betas}")
        get_loss(self.loss)


@dataclass
class TrainResult:
    """What a training run produced: the history rows and the files it wrote."""

    history: list[dict[str, float]]
    generator: nn.Module
    discriminator: nn.Module
    model_path: Path
    checkpoint_path: Path
    log_csv: Path
    samples: Path | None
    #: ``{"step", "val_fid"}`` of the generator model selection restored (None: ``select`` off)
    selected: dict[str, float] | None = None
    #: with model selection, the last step's model file (``model_last.safetensors``; None: ``select`` off)
    last_model_path: Path | None = None


# ----------------------------------------------------------------------------- data and noise


def load_images(cfg: GanConfig, image_shape: tuple[int, ...]) -> torch.Tensor:
    """The training images, checked against the generator's output shape."""
    images, _ = lowbit_data.load(
        cfg.data.dataset, split=cfg.data.split, root=cfg.data.root, limit=cfg.data.limit, **cfg.data.options
    )
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ConfigError(
            f"dataset '{cfg.data.dataset}' gives {tuple(images.shape[1:])} images but generator "
            f"'{cfg.generator.model}' makes {tuple(image_shape)}; pick matching model and data"
        )
    if images.shape[0] < cfg.batch_size:
        raise ConfigError(
            f"dataset has {images.shape[0]} images, fewer than batch_size {cfg.batch_size}; "
            "lower batch_size or raise data.limit"
        )
    return images


class BatchStream:
    """Batch ``i`` of a seeded epoch-wise shuffle, so a resumed run draws exactly the same batches."""

    def __init__(
        self, images: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = images.shape[0] // batch_size
        self.per_rank = len(range(rank, batch_size, world))
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, draw: int) -> torch.Tensor:
        """This rank's slice of global batch number ``draw``."""
        epoch, pos = divmod(draw, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.images.shape[0], generator=seeded_generator(self.seed, epoch, 7))
        index = self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]
        return self.images[index[self.rank :: self.world]]


def latent(n: int, dim: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal latent codes (DCGAN's prior)."""
    return torch.randn(n, dim, generator=gen).to(device)


# ----------------------------------------------------------------------------- the update rules


def distills(cfg: DistillWeights) -> bool:
    """Whether any distillation weight is set (only the noise GAN's config has ``distill_perceptual``)."""
    return bool(cfg.distill or cfg.distill_features or getattr(cfg, "distill_perceptual", 0.0))


def distiller(cfg: DistillWeights, teacher: nn.Module | None, generator: nn.Module, example: torch.Tensor,
              loss: GanLoss, lr: float, betas: tuple[float, float],
              critic: nn.Module | None = None) -> Distiller | None:
    """The FP teacher's distillation of ``generator`` (``cfg.distill`` / ``cfg.distill_features`` /
    ``cfg.distill_perceptual`` through the frozen ``critic``, adapters trained with G's optimiser settings),
    or None when no weight is set or there is no teacher."""
    if teacher is None or not distills(cfg):
        return None
    return Distiller(teacher, unwrap(generator), example, cfg.distill, cfg.distill_features,
                     lambda params: make_optimizer(loss, params, lr, betas),
                     getattr(cfg, "distill_perceptual", 0.0), critic)


def teacher_source(cfg: DistillWeights) -> str | None:
    """The teacher's checkpoint: ``cfg.teacher`` where the config has one (the GAN's), else ``init_from``."""
    return getattr(cfg, "teacher", None) or cfg.init_from


def teacher_of(cfg: DistillWeights) -> nn.Module | None:
    """The FP generator ``teacher_source(cfg)`` when the config distils from it, else None."""
    return load_generator(teacher_source(cfg)) if distills(cfg) else None


def critic_of(cfg: GanConfig) -> nn.Module | None:
    """A private copy of the FP discriminator of the teacher's checkpoint for ``distill_perceptual``, else
    None."""
    return load_discriminator(teacher_source(cfg)) if cfg.distill_perceptual else None


def network_optimizer(loss: GanLoss, model: nn.Module, lr: float, betas: tuple[float, float],
                      search_sgd: SearchSGD | None = None) -> torch.optim.Optimizer | Optimizers:
    """The loss's optimiser over ``model``; with ``search_sgd``, its search logits go to a fused SGD
    with momentum instead (seed 002 §3.1) and the rest stays with the loss's optimiser."""
    logits = param_group(model, SEARCH_LOGITS)
    if search_sgd is None or not logits:
        return make_optimizer(loss, model.parameters(), lr, betas)
    chosen = {id(p) for p in logits}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    sgd = torch.optim.SGD(logits, lr=search_sgd.lr, momentum=search_sgd.momentum,
                          fused=fused_if_supported(logits))
    return Optimizers([make_optimizer(loss, rest, lr, betas), sgd])


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its trainable parameters' ``requires_grad`` off inside the block. G's update
    then backpropagates through D without computing (or, under DDP, all-reducing) D's weight
    gradients, which G's step would only throw away."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)


class GanTrainer:
    """The two players and their optimisers; ``d_step``/``g_step`` are one update of each."""

    def __init__(
        self,
        cfg: GanConfig,
        generator: nn.Module,
        discriminator: nn.Module,
        device: torch.device,
        teacher: nn.Module | None = None,
        critic: nn.Module | None = None,
    ) -> None:
        self.loss: GanLoss = get_loss(cfg.loss)
        self.device = device
        self.G, self.D = generator.to(device), discriminator.to(device)
        self.latent_dim = int(unwrap(generator).latent_dim)
        betas = tuple(cfg.betas) if cfg.betas is not None else self.loss.betas
        g_lr, d_lr = cfg.generator.lr or self.loss.lr, cfg.discriminator.lr or self.loss.lr
        example = torch.randn(2, self.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
        self.distiller = distiller(cfg, teacher, self.G, example, self.loss, g_lr, betas, critic)
        self.opt_g = network_optimizer(self.loss, self.G, g_lr, betas, cfg.search_sgd)
        self.opt_d = network_optimizer(self.loss, self.D, d_lr, betas, cfg.search_sgd)
        self.clip = cfg.clip if cfg.clip is not None else self.loss.clip
        self.gp_weight = cfg.gp_weight if cfg.gp_weight is not None else self.loss.gp_weight
        self.n_critic = cfg.n_critic or self.loss.n_critic
        self.feature_matching = cfg.feature_matching
        self.ema_decay = cfg.ema
        self.G_ema = copy.deepcopy(unwrap(self.G)).eval().requires_grad_(False) if cfg.ema else None
        self.epoch = -1
        self.lr_scale = LrScale(self.opt_g, self.opt_d)

    @property
    def sampler(self) -> nn.Module:
        """The generator to evaluate, sample and save: the weight average when ``ema`` is on, else G."""
        return self.G_ema if self.G_ema is not None else unwrap(self.G)

    def set_epoch(self, epoch: int) -> None:
        """Apply the per-epoch quantizer schedule (search temperature, 002 §3.1) when the epoch changes."""
        if epoch != self.epoch:
            self.epoch = epoch
            for model in (unwrap(self.G), unwrap(self.D), self.G_ema):
                if model is not None:
                    anneal(model, epoch)

    def d_step(self, real: torch.Tensor, gen: torch.Generator) -> float:
        """One discriminator/critic update on a real batch and as many generated images."""
        real = real.to(self.device)
        with torch.no_grad():
            fake = self.G(latent(real.shape[0], self.latent_dim, gen, self.device))
        loss = self.loss.d_loss(self.D(real), self.D(fake))
        if self.gp_weight:
            loss = loss + self.gp_weight * gradient_penalty(unwrap(self.D), real, fake, gen)
        loss.backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)  # gradients do not outlive the step (less memory)
        if self.clip:
            with torch.no_grad():
                for p in self.D.parameters():
                    p.clamp_(-self.clip, self.clip)
        return float(loss.detach())

    def g_step(self, n: int, gen: torch.Generator, adversarial: bool = True,
               real: torch.Tensor | None = None) -> float:
        """One generator update on ``n`` latent codes against the current discriminator, plus
        ``distill`` x mean |G(z) - teacher(z)|, ``distill_features`` x the feature loss and
        ``distill_perceptual`` x the perceptual loss through the frozen FP discriminator
        (``lowbit.train.distill``) when a full-precision teacher is given (distillation);
        ``adversarial=False`` (the distillation warm-up) leaves out the discriminator's terms; with
        ``feature_matching``, the adversarial term adds that weight x the distance of D's mean hidden
        activations on the ``real`` batch and on the generated one (Salimans et al. 2016)."""
        z = latent(n, self.latent_dim, gen, self.device)
        fake, target = self.distiller.forward(self.G, z) if self.distiller else (self.G(z), None)
        with frozen(unwrap(self.D)) as critic:
            loss = self._adversarial_loss(critic, fake, real) if adversarial else fake.new_zeros(())
            if self.distiller:
                loss = loss + self.distiller.loss(fake, target)
            loss.backward()
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.distiller:
            self.distiller.step()
        self._update_ema()
        return float(loss.detach())

    def _adversarial_loss(self, critic: nn.Module, fake: torch.Tensor,
                          real: torch.Tensor | None) -> torch.Tensor:
        """The loss's G term on D's scores of ``fake``, plus the weighted feature matching to ``real``."""
        if not self.feature_matching:
            return self.loss.g_loss(critic(fake))
        if real is None:
            raise ValueError("feature_matching needs the real batch: call g_step(..., real=images)")
        scores, fake_features = hidden_activations(critic, fake)
        with torch.no_grad():
            real_features = hidden_activations(critic, real.to(self.device))[1]
        matching = feature_matching_loss(real_features, fake_features)
        return self.loss.g_loss(scores) + self.feature_matching * matching

    def set_weight_quantization(self, enabled: bool, layers: list[str] | None = None) -> None:
        """Quantized (True) or float (False) weights in every network (the staged schedule), in the
        quantized layers whose names match one of the fnmatch patterns ``layers`` (None: all of them)."""
        for model in self.models():
            quantize_weights(unwrap(model), enabled, layers)

    def recalibrate_batchnorm(self, batches: int, n: int, gen: torch.Generator) -> None:
        """Re-estimate the BatchNorm running statistics of the sampled generator on ``batches`` batches
        of ``n`` fresh latent codes (``lowbit.train.recalibrate``), so eval mode matches the final weights."""
        recalibrate_batchnorm(self.sampler, lambda _: latent(n, self.latent_dim, gen, self.device), batches)

    def _update_ema(self) -> None:
        """``theta_ema <- decay·theta_ema + (1-decay)·theta`` for G's parameters; buffers (BatchNorm
        statistics, quantizer state) are copied. Averaging the latent weights smooths the generator's
        oscillation around the equilibrium, which lowers FID (Yazici et al., ICLR 2019)."""
        if self.G_ema is None:
            return
        with torch.no_grad():
            live = unwrap(self.G)
            for avg, param in zip(self.G_ema.parameters(), live.parameters(), strict=True):
                avg.lerp_(param, 1.0 - self.ema_decay)
            for avg, buf in zip(self.G_ema.buffers(), live.buffers(), strict=True):
                avg.copy_(buf)

    def state(self) -> dict[str, Any]:
        """Both networks' weights and both optimisers' states (for a checkpoint)."""
        state = {
            "generator": unwrap(self.G).state_dict(),
            "discriminator": unwrap(self.D).state_dict(),
            "optim_g": self.opt_g.state_dict(),
            "optim_d": self.opt_d.state_dict(),
        }
        if self.G_ema is not None:
            state["generator_ema"] = self.G_ema.state_dict()
        if self.distiller:
            state.update(self.distiller.state())
        return state

    def load_state(self, state: dict[str, Any], source: str) -> None:
        """Restore what ``state()`` saved; a mismatch names ``source``."""
        load_weights(unwrap(self.G), state["generator"], f"{source} (generator)")
        load_weights(unwrap(self.D), state["discriminator"], f"{source} (discriminator)")
        self.opt_g.load_state_dict(state["optim_g"])
        self.opt_d.load_state_dict(state["optim_d"])
        if self.G_ema is not None:
            load_weights(self.G_ema, state["generator_ema"], f"{source} (generator average)")
        if self.distiller:
            self.distiller.load_state(state, source)

    def models(self) -> list[nn.Module]:
        """Every network this trainer updates (G, D and the G average when ema is on)."""
        return [m for m in (self.G, self.D, self.G_ema) if m is not None]


# ----------------------------------------------------------------------------- the task


def save_samples(generator: nn.Module, noise: torch.Tensor, path: Path) -> Path:
    """A grid of the generator's images for the fixed noise (G switched to eval mode for it)."""
    lowbit_data.save_image_grid(predict(generator, noise), path)
    return path


def check_staged_layers(patterns: list[str], models: list[nn.Module]) -> None:
    """Refuse ``staged_layers`` patterns that match no quantized layer (a typo would stage nothing)."""
    for pattern in patterns:
        if not any(quant_layers(unwrap(model), [pattern]) for model in models):
            names = sorted({name for model in models for name in quant_layers(unwrap(model))})
            raise ConfigError(f"staged_layers: '{pattern}' matches no quantized layer; the quantized "
                              f"layers are {', '.join(names) or '(none)'}")


class GanTask:
    """The noise GAN's part of the shared loop: n_critic D updates and one G update per step."""

    kind = CHECKPOINT_KIND
    loss_names = {"d_loss": "discriminator loss", "g_loss": "generator loss"}

    def __init__(self, cfg: GanConfig, device: torch.device, ctx: DistContext) -> None:
        self.cfg, self.rank = cfg, ctx.rank
        networks = build_networks(cfg, ("discriminator",) if cfg.fresh_discriminator else ())
        self.trainer = GanTrainer(cfg, *networks, device, teacher_of(cfg), critic_of(cfg))
        check_staged_layers(cfg.staged_layers, self.trainer.models())
        images = load_images(cfg, unwrap(self.trainer.G).image_shape)
        self.stream = BatchStream(images, cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
        noise_rng = seeded_generator(cfg.seed, 0, 99)
        self.fixed_noise = latent(SAMPLE_GRID, self.trainer.latent_dim, noise_rng, device)

    def step(self, step: int) -> dict[str, float]:
        """n_critic discriminator updates, then one generator update; returns the last D and the G loss
        (during the distillation warm-up G's distillation update alone, and its loss only)."""
        cfg, trainer = self.cfg, self.trainer
        if cfg.lr_decay == "linear":
            trainer.lr_scale.set(1.0 - (step - 1) / cfg.steps)
        if cfg.weights_from_step:
            trainer.set_weight_quantization(step > cfg.weights_from_step, cfg.staged_layers or None)
        if step <= cfg.distill_warmup:
            noise_rng = seeded_generator(cfg.seed, step, 0, self.rank)
            return {"g_loss": trainer.g_step(self.stream.per_rank, noise_rng, adversarial=False)}
        d_loss = 0.0
        for k in range(trainer.n_critic):
            draw = (step - 1) * trainer.n_critic + k
            trainer.set_epoch(draw // self.stream.per_epoch)
            noise_rng = seeded_generator(cfg.seed, step, 1 + k, self.rank)
            real = self.stream.batch(draw)
            d_loss = trainer.d_step(real, noise_rng)
            if not math.isfinite(d_loss):
                return {"d_loss": d_loss}  # the loop stops the run; a G step would only spread the NaN
        # feature matching sees the last D batch again; without it, G's step takes no real images
        matching = {"real": real} if cfg.feature_matching else {}
        g_noise = seeded_generator(cfg.seed, step, 0, self.rank)
        g_loss = trainer.g_step(self.stream.per_rank, g_noise, **matching)
        if step == cfg.steps and cfg.recalibrate_bn:  # the same latents on every rank: equal statistics
            trainer.recalibrate_batchnorm(cfg.recalibrate_bn, cfg.batch_size,
                                          seeded_generator(cfg.seed, step, 0, 0, 1))
        return {"d_loss": d_loss, "g_loss": g_loss}

    def models(self) -> list[nn.Module]:
        return self.trainer.models()

    def state(self) -> dict[str, Any]:
        return self.trainer.state()

    def load_state(self, state: dict[str, Any], source: str) -> None:
        self.trainer.load_state(state, source)

    def model_state(self) -> dict[str, Any]:
        """The generator users should sample from (the average when ema is on) and D."""
        return {"generator": self.trainer.sampler.state_dict(),
                "discriminator": unwrap(self.trainer.D).state_dict()}

    def distribute(self, device: torch.device) -> None:
        self.trainer.G, self.trainer.D = wrap_ddp(self.trainer.G, device), wrap_ddp(self.trainer.D, device)

    @property
    def sampler(self) -> nn.Module:
        return self.trainer.sampler

    def save_samples(self, path: Path) -> Path:
        return save_samples(self.trainer.sampler, self.fixed_noise, path)


def train_gan(
    cfg: GanConfig,
    out_dir: str | Path,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or QAT fine-tune) the GAN of ``cfg`` into ``out_dir``; returns the history and file paths.

    Everything is validated and loaded before the first file is written, so bad input leaves
    ``out_dir`` untouched. A NaN/Inf loss raises TrainingDivergedError and keeps the last checkpoint.
    """
    return train_task(GanTask, cfg, out_dir, evaluator, resume, overwrite, progress, validation_fid(cfg))


def validation_fid(cfg: GanConfig) -> Validator | None:
    """The validation FID of ``cfg.select`` on the training dataset (None when selection is off)."""
    if not cfg.select.enabled:
        return None
    if cfg.data.options or cfg.data.root:
        raise ConfigError("select: the validation FID reads the dataset's default images, so it cannot "
                          f"follow data.options {cfg.data.options} / data.root {cfg.data.root}; drop select")
    return fid_validator(cfg.data.dataset, cfg.select)


def train_task(task: Callable[[Any, torch.device, DistContext], Any], cfg: Any, out_dir: str | Path,
               evaluator: Evaluator | None, resume: bool, overwrite: bool, progress: bool,
               validator: Validator | None = None) -> TrainResult:
    """Run a G / D pair's ``task`` (``GanTask``, the image-to-image ``I2ITask``) through the shared loop;
    ``validator`` scores G for model selection (``cfg.select``)."""
    def build(device: torch.device, ctx: DistContext, guard: object) -> Any:
        return task(cfg, device, ctx)

    result = run_training(cfg, LoopSettings.of(cfg), out_dir, build, read_gan_checkpoint, evaluator, resume,
                          overwrite, progress, validator)
    return TrainResult(history=result.history, generator=result.task.sampler,
                       discriminator=unwrap(result.task.trainer.D), model_path=result.model_path,
                       checkpoint_path=result.checkpoint_path, log_csv=result.log_csv, samples=result.samples,
                       selected=result.selected, last_model_path=result.last_model_path)
