"""GAN training from scratch or quantization-aware fine-tuning (QAT) of a full-precision checkpoint.

``train_gan(cfg, out_dir)`` trains the generator/discriminator pair named in a ``GanConfig``; each
network may carry its own ``lowbit.nn.QuantSpec`` (G only as in seed 000, D only, or both as in
seed 001). Every run writes, under ``out_dir``: ``log.csv`` and TensorBoard events (``tb/``),
fixed-noise sample grids (``samples/``), the resumable checkpoint ``checkpoints/last.safetensors``
(models, optimisers, RNG state) and the final model file ``model.safetensors`` (models + config).
Batches and latent noise are derived from (seed, step), so ``resume=True`` reproduces the losses
of an uninterrupted run. Under ``torch.distributed`` the networks are wrapped in DDP, each rank
takes its slice of every batch and only rank 0 logs, evaluates and writes files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lowbit import data as lowbit_data
from lowbit.config import closest, from_dict, to_dict
from lowbit.errors import (  # TrainingDivergedError: raised by the guard, importable here as before
    CheckpointError,
    ConfigError,
    TrainingDivergedError,  # noqa: F401
)
from lowbit.io import atomic_write_text
from lowbit.models import create_model
from lowbit.nn import QuantSpec, anneal, convert
from lowbit.quant.search import SearchQuantizer
from lowbit.train.checkpoint import (
    checkpoint_content,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lowbit.train.gan_losses import GanLoss, get_loss, gradient_penalty, make_optimizer
from lowbit.train.guard import DivergenceGuard, GuardSpec
from lowbit.train.optim import Optimizers, fused_if_supported
from lowbit.train.rundir import locks_run_dir

#: a callback ``evaluator(generator, step) -> {"fid": ..., "is": ...}`` run on rank 0 (G in eval mode).
Evaluator = Callable[[nn.Module, int], dict[str, float]]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "assets" / "pretrained"
CHECKPOINT_KIND = "lowbit-gan"
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
class NetSpec:
    """One network: registry name + constructor kwargs, an optional QuantSpec and learning rate."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    quant: QuantSpec | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"{self.model}: lr must be a positive number (e.g. 2e-4), got {self.lr}")


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
class GanConfig:
    """Everything ``train_gan`` needs; loss-dependent fields left None take the loss paper's default."""

    name: str = "gan"
    data: DataSpec = field(default_factory=DataSpec)
    generator: NetSpec = field(default_factory=lambda: NetSpec("dcgan-g-28"))
    discriminator: NetSpec = field(default_factory=lambda: NetSpec("dcgan-d-28"))
    loss: str = "dcgan"
    steps: int = 2000
    batch_size: int = 64
    n_critic: int | None = None
    betas: list[float] | None = None
    clip: float | None = None
    gp_weight: float | None = None
    init_from: str | None = None
    distill: float = 0.0
    ema: float = 0.0
    lr_decay: str = "constant"
    search_sgd: SearchSGD | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    log_every: int = 10
    eval_every: int = 0
    sample_every: int = 500
    checkpoint_every: int = 500
    guard: GuardSpec = field(default_factory=GuardSpec)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every", "sample_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")
        if self.n_critic is not None and self.n_critic < 1:
            raise ConfigError(f"'n_critic' must be >= 1, got {self.n_critic}")
        if self.distill < 0 or (self.distill and self.init_from is None):
            raise ConfigError(
                f"'distill' must be >= 0 and needs init_from (the FP teacher), got {self.distill}"
            )
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


# ----------------------------------------------------------------------------- building networks


def pretrained_names() -> list[str]:
    """Names of the shipped full-precision checkpoints (``src/lowbit/assets/pretrained``)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors"))


def resolve_checkpoint(name_or_path: str) -> Path:
    """A checkpoint path, or the shipped pretrained checkpoint of that name (e.g. ``dcgan-mnist``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PRETRAINED_DIR / f"{name_or_path}.safetensors"
    if shipped.is_file():
        return shipped
    raise CheckpointError(
        f"checkpoint not found: '{name_or_path}'; pass a .safetensors path or one of the "
        f"shipped names: {', '.join(pretrained_names()) or '(none)'}"
    )


def create_network(spec: NetSpec) -> nn.Module:
    """The full-precision network named by ``spec`` (registry name + kwargs)."""
    try:
        return create_model(spec.model, **spec.kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model '{spec.model}': bad kwargs {spec.kwargs} ({exc}); fix the 'kwargs' section"
        ) from None


def quantize_network(model: nn.Module, spec: NetSpec) -> nn.Module:
    """``model`` converted to quantized layers by the spec's QuantSpec (unchanged when it has none)."""
    return model if spec.quant is None else convert(model, spec.quant)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, turning a shape/key mismatch into a CheckpointError that names ``source``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{source} does not fit {getattr(model, 'lowbit_name', 'the model')} ({first}); "
            "use a checkpoint of the same architecture and quantization"
        ) from None


def read_gan_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a GAN checkpoint (training state or model file) and check that it is one."""
    state = load_checkpoint(resolve_checkpoint(str(path)))
    if state.get("kind") != CHECKPOINT_KIND or "config" not in state:
        raise CheckpointError(
            f"{path} is not a lowbit GAN checkpoint (no generator/config inside); "
            "pass a file written by `lowbit train`"
        )
    for key in ("config", "generator", "discriminator"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: entry '{key}' is missing or not a mapping; the checkpoint is "
                                  "damaged, restore it or retrain")
    return state


def _stored_config(state: dict[str, Any], path: str | Path) -> GanConfig:
    try:
        return from_dict(GanConfig, state["config"])
    except ConfigError as exc:
        raise CheckpointError(
            f"{path}: stored config is invalid ({exc}); retrain with this lowbit version"
        ) from None


def checkpoint_config(path: str | Path) -> GanConfig:
    """The ``GanConfig`` a GAN checkpoint (path or shipped name) was trained with."""
    return _stored_config(read_gan_checkpoint(path), path)


def _check_same_architecture(own: NetSpec, stored: NetSpec, role: str, path: str | Path) -> None:
    if (own.model, own.kwargs) != (stored.model, stored.kwargs):
        raise CheckpointError(
            f"{path} holds {role} '{stored.model}' {stored.kwargs} but the config asks for "
            f"'{own.model}' {own.kwargs}; use a checkpoint of the same architecture"
        )


def _rebuild(spec: NetSpec, state: dict[str, torch.Tensor], role: str, path: str | Path) -> nn.Module:
    model = quantize_network(create_network(spec), spec)
    load_weights(model, state, f"{path} ({role})")
    return model


def load_generator(checkpoint_path: str | Path) -> nn.Module:
    """The (possibly quantized) generator of a GAN checkpoint, rebuilt from its config, in eval mode."""
    state = read_gan_checkpoint(checkpoint_path)
    cfg = _stored_config(state, checkpoint_path)
    return _rebuild(cfg.generator, state["generator"], "generator", checkpoint_path).eval()


def load_discriminator(checkpoint_path: str | Path) -> nn.Module:
    """The (possibly quantized) discriminator of a GAN checkpoint, rebuilt from its config, in eval mode."""
    state = read_gan_checkpoint(checkpoint_path)
    cfg = _stored_config(state, checkpoint_path)
    return _rebuild(cfg.discriminator, state["discriminator"], "discriminator", checkpoint_path).eval()


def build_networks(cfg: GanConfig) -> tuple[nn.Module, nn.Module]:
    """G and D for a fresh run: random init, or the FP weights of ``init_from``, then quantized by spec."""
    nets = {"generator": create_network(cfg.generator), "discriminator": create_network(cfg.discriminator)}
    if cfg.init_from is not None:
        state = read_gan_checkpoint(cfg.init_from)
        stored = _stored_config(state, cfg.init_from)
        for role, model in nets.items():
            own, theirs = getattr(cfg, role), getattr(stored, role)
            _check_same_architecture(own, theirs, role, cfg.init_from)
            if theirs.quant is not None:
                raise CheckpointError(
                    f"init_from {cfg.init_from}: its {role} is already quantized; start QAT "
                    "from a full-precision checkpoint (or continue that run with --resume)"
                )
            load_weights(model, state[role], f"{cfg.init_from} ({role})")
    return (
        quantize_network(nets["generator"], cfg.generator),
        quantize_network(nets["discriminator"], cfg.discriminator),
    )


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


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU torch.Generator whose seed is a hash of ``key`` (e.g. seed, step, phase, rank)."""
    seed = int(np.random.SeedSequence([abs(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def network_optimizer(loss: GanLoss, model: nn.Module, lr: float, betas: tuple[float, float],
                      search_sgd: SearchSGD | None = None) -> torch.optim.Optimizer | Optimizers:
    """The loss's optimiser over ``model``; with ``search_sgd``, its search logits go to a fused SGD
    with momentum instead (seed 002 §3.1) and the rest stays with the loss's optimiser."""
    logits = [m.logits for m in model.modules() if isinstance(m, SearchQuantizer)]
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
    ) -> None:
        self.loss: GanLoss = get_loss(cfg.loss)
        self.device = device
        self.G, self.D = generator.to(device), discriminator.to(device)
        self.teacher = None if teacher is None else teacher.to(device).eval().requires_grad_(False)
        self.distill = cfg.distill
        self.latent_dim = int(_unwrap(generator).latent_dim)
        betas = tuple(cfg.betas) if cfg.betas is not None else self.loss.betas
        g_lr, d_lr = cfg.generator.lr or self.loss.lr, cfg.discriminator.lr or self.loss.lr
        self.opt_g = network_optimizer(self.loss, self.G, g_lr, betas, cfg.search_sgd)
        self.opt_d = network_optimizer(self.loss, self.D, d_lr, betas, cfg.search_sgd)
        self.clip = cfg.clip if cfg.clip is not None else self.loss.clip
        self.gp_weight = cfg.gp_weight if cfg.gp_weight is not None else self.loss.gp_weight
        self.n_critic = cfg.n_critic or self.loss.n_critic
        self.ema_decay = cfg.ema
        self.G_ema = copy.deepcopy(_unwrap(self.G)).eval().requires_grad_(False) if cfg.ema else None
        self.epoch = -1
        self.base_lrs = [group["lr"] for opt in (self.opt_g, self.opt_d) for group in opt.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        """Set every optimiser's learning rate to ``scale`` x its configured value (a pure function of
        the step, so a resumed run follows the same schedule)."""
        groups = [group for opt in (self.opt_g, self.opt_d) for group in opt.param_groups]
        for group, base in zip(groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    @property
    def sampler(self) -> nn.Module:
        """The generator to evaluate, sample and save: the weight average when ``ema`` is on, else G."""
        return self.G_ema if self.G_ema is not None else _unwrap(self.G)

    def set_epoch(self, epoch: int) -> None:
        """Apply the per-epoch quantizer schedule (search temperature, 002 §3.1) when the epoch changes."""
        if epoch != self.epoch:
            self.epoch = epoch
            for model in (_unwrap(self.G), _unwrap(self.D), self.G_ema):
                if model is not None:
                    anneal(model, epoch)

    def d_step(self, real: torch.Tensor, gen: torch.Generator) -> float:
        """One discriminator/critic update on a real batch and as many generated images."""
        real = real.to(self.device)
        with torch.no_grad():
            fake = self.G(latent(real.shape[0], self.latent_dim, gen, self.device))
        loss = self.loss.d_loss(self.D(real), self.D(fake))
        if self.gp_weight:
            loss = loss + self.gp_weight * gradient_penalty(_unwrap(self.D), real, fake, gen)
        loss.backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)  # gradients do not outlive the step (less memory)
        if self.clip:
            with torch.no_grad():
                for p in self.D.parameters():
                    p.clamp_(-self.clip, self.clip)
        return float(loss.detach())

    def g_step(self, n: int, gen: torch.Generator) -> float:
        """One generator update on ``n`` latent codes against the current discriminator, plus
        ``distill`` x mean |G(z) - teacher(z)| when a full-precision teacher is given (distillation)."""
        z = latent(n, self.latent_dim, gen, self.device)
        fake = self.G(z)
        with frozen(_unwrap(self.D)) as critic:
            loss = self.loss.g_loss(critic(fake))
            if self.teacher is not None and self.distill:
                with torch.no_grad():
                    target = self.teacher(z)
                loss = loss + self.distill * (fake - target).abs().mean()
            loss.backward()
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self._update_ema()
        return float(loss.detach())

    def _update_ema(self) -> None:
        """``theta_ema <- decay·theta_ema + (1-decay)·theta`` for G's parameters; buffers (BatchNorm
        statistics, quantizer state) are copied. Averaging the latent weights smooths the generator's
        oscillation around the equilibrium, which lowers FID (Yazici et al., ICLR 2019)."""
        if self.G_ema is None:
            return
        with torch.no_grad():
            live = _unwrap(self.G)
            for avg, param in zip(self.G_ema.parameters(), live.parameters(), strict=True):
                avg.lerp_(param, 1.0 - self.ema_decay)
            for avg, buf in zip(self.G_ema.buffers(), live.buffers(), strict=True):
                avg.copy_(buf)

    def state(self) -> dict[str, Any]:
        """Both networks' weights and both optimisers' states (for a checkpoint)."""
        state = {
            "generator": _unwrap(self.G).state_dict(),
            "discriminator": _unwrap(self.D).state_dict(),
            "optim_g": self.opt_g.state_dict(),
            "optim_d": self.opt_d.state_dict(),
        }
        if self.G_ema is not None:
            state["generator_ema"] = self.G_ema.state_dict()
        return state

    def load_state(self, state: dict[str, Any], source: str) -> None:
        """Restore what ``state()`` saved; a mismatch names ``source``."""
        load_weights(_unwrap(self.G), state["generator"], f"{source} (generator)")
        load_weights(_unwrap(self.D), state["discriminator"], f"{source} (discriminator)")
        self.opt_g.load_state_dict(state["optim_g"])
        self.opt_d.load_state_dict(state["optim_d"])
        if self.G_ema is not None:
            load_weights(self.G_ema, state["generator_ema"], f"{source} (generator average)")

    def models(self) -> list[nn.Module]:
        """Every network this trainer updates (G, D and the G average when ema is on)."""
        return [m for m in (self.G, self.D, self.G_ema) if m is not None]


# ----------------------------------------------------------------------------- logging


class RunLog:
    """History rows -> log.csv (rewritten atomically) and TensorBoard scalars; rank 0 only."""

    def __init__(self, out_dir: Path, history: list[dict[str, float]], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.csv_path = out_dir / "log.csv"
        self.history = history
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)
        self.flush()  # a resumed run's log.csv restarts from the checkpoint's history

    def add(self, row: dict[str, float]) -> None:
        """Append a history row and write it to log.csv and TensorBoard."""
        self.history.append(row)
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, int(row["step"]))
        self.flush()

    def flush(self) -> None:
        """Rewrite log.csv (all rows, atomically) and flush TensorBoard."""
        columns = ["step", "d_loss", "g_loss"]
        columns += sorted({k for row in self.history for k in row} - set(columns))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.csv_path, buffer.getvalue())
        self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        self.writer.close()


def save_samples(generator: nn.Module, noise: torch.Tensor, path: Path) -> Path:
    """A grid of the generator's images for the fixed noise (G switched to eval mode for it)."""
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(noise).cpu()
    generator.train(was_training)
    lowbit_data.save_image_grid(images, path)
    return path


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Accumulator:
    """Running sums of the losses since the last history row."""

    d_sum: float = 0.0
    g_sum: float = 0.0
    count: int = 0

    def add(self, d_loss: float, g_loss: float) -> None:
        """Add one step's losses."""
        self.d_sum, self.g_sum, self.count = self.d_sum + d_loss, self.g_sum + g_loss, self.count + 1

    def row(self, step: int) -> dict[str, float]:
        """The mean losses since the last row, as a history row; resets the sums."""
        row = {"step": step, "d_loss": self.d_sum / self.count, "g_loss": self.g_sum / self.count}
        self.d_sum, self.g_sum, self.count = 0.0, 0.0, 0
        return row


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: GanConfig, rank: int) -> torch.device:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for but no CUDA GPU is visible; set device: cpu")
        return torch.device("cuda", rank % torch.cuda.device_count())
    if cfg.device != "cpu":
        raise ConfigError(f"unknown device '{cfg.device}'; use cpu or cuda")
    return torch.device("cpu")


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def _comparable(cfg: GanConfig) -> dict[str, Any]:
    """The config fields that must not change when a run is resumed."""
    data = to_dict(cfg)
    for key in ("steps", "log_every", "eval_every", "sample_every", "checkpoint_every", "threads", "device",
                "guard"):
        data.pop(key, None)
    return data


def _check_resumable(cfg: GanConfig, state: dict[str, Any], path: Path) -> None:
    stored = _comparable(_stored_config(state, path))
    own = _comparable(cfg)
    changed = sorted(k for k in own if own[k] != stored.get(k))
    if changed:
        raise ConfigError(
            f"cannot resume {path}: config differs in {', '.join(changed)}; resume with the "
            "config the run started with (only steps and logging intervals may change)"
        )


def _save_state(
    path: Path,
    trainer: GanTrainer,
    cfg: GanConfig,
    step: int,
    history: list[dict[str, float]],
    acc: _Accumulator,
    full: bool,
) -> Path:
    state: dict[str, Any] = {
        "kind": CHECKPOINT_KIND,
        "config": to_dict(cfg),
        "step": step,
        "history": history,
    }
    models = trainer.state()
    if full:
        state.update(models, rng=rng_state(), accumulator=dataclasses.asdict(acc))
    else:  # the model file holds the generator users should sample from: the average when ema is on
        state.update(generator=trainer.sampler.state_dict(), discriminator=models["discriminator"])
    return save_checkpoint(path, state)


def _prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path:
    ckpt = out_dir / "checkpoints" / "last.safetensors"
    if resume and not ckpt.is_file():
        raise CheckpointError(f"nothing to resume: {ckpt} does not exist; run without --resume to start")
    if not resume and not overwrite and ckpt.is_file():
        raise ConfigError(
            f"{out_dir} already holds a run ({ckpt.name}); pass --resume to continue it, "
            "--force to start over, or choose another output directory"
        )
    return ckpt


@locks_run_dir(lambda args: args["out_dir"])
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
    run = _GanRun(cfg, Path(out_dir), evaluator, resume, overwrite)
    run.start(progress)
    try:
        for step in range(run.start_step + 1, cfg.steps + 1):
            run.step(step)
    finally:
        run.close()
    return run.finish()


class _GanRun:
    """The state of one ``train_gan`` call: trainer, data stream, logs and checkpoint bookkeeping."""

    def __init__(
        self, cfg: GanConfig, out_dir: Path, evaluator: Evaluator | None, resume: bool, overwrite: bool
    ) -> None:
        self.cfg, self.out_dir, self.evaluator = cfg, out_dir, evaluator
        self.rank, world = _distributed()
        self.main = self.rank == 0
        self.ckpt_path = _prepare_out_dir(out_dir, resume, overwrite)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = _device(cfg, self.rank)
        torch.manual_seed(cfg.seed)
        teacher = load_generator(cfg.init_from) if cfg.distill else None
        self.trainer = GanTrainer(cfg, *build_networks(cfg), device, teacher)
        images = load_images(cfg, _unwrap(self.trainer.G).image_shape)
        self.start_step, self.history, self.acc = 0, [], _Accumulator()
        self.guard = DivergenceGuard(cfg.guard)
        if resume:
            self._restore()
        if world > 1:
            self.trainer.G, self.trainer.D = (
                _wrap_ddp(self.trainer.G, device),
                _wrap_ddp(self.trainer.D, device),
            )
        self.stream = BatchStream(images, cfg.batch_size, cfg.seed, self.rank, world)
        self.fixed_noise = latent(
            SAMPLE_GRID, self.trainer.latent_dim, seeded_generator(cfg.seed, 0, 99), device
        )
        self.samples: Path | None = None
        self.postfix: dict[str, str] = {}

    def _restore(self) -> None:
        state = read_gan_checkpoint(self.ckpt_path)
        _check_resumable(self.cfg, state, self.ckpt_path)
        with checkpoint_content(self.ckpt_path):
            self.trainer.load_state(state, str(self.ckpt_path))
            set_rng_state(state["rng"])
            self.start_step, self.history = int(state["step"]), list(state["history"])
            self.acc = _Accumulator(**state["accumulator"])
        self.guard.saved(self.ckpt_path)

    def start(self, progress: bool) -> None:
        """Open the logs and the progress bar (the first files this run writes)."""
        self.log = RunLog(self.out_dir, self.history, self.start_step) if self.main else None
        if self.main and self.start_step == 0:
            atomic_write_text(self.out_dir / "config.json", json.dumps(to_dict(self.cfg), indent=1))
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=self.start_step,
            desc=self.cfg.name,
            disable=not (self.main and progress),
            dynamic_ncols=True,
        )

    def step(self, step: int) -> None:
        """n_critic discriminator updates, one generator update, then logging/eval/samples/checkpoint."""
        cfg, trainer = self.cfg, self.trainer
        if cfg.lr_decay == "linear":
            trainer.set_lr_scale(1.0 - (step - 1) / cfg.steps)
        d_loss = 0.0
        for k in range(trainer.n_critic):
            draw = (step - 1) * trainer.n_critic + k
            trainer.set_epoch(draw // self.stream.per_epoch)
            d_loss = trainer.d_step(
                self.stream.batch(draw), seeded_generator(cfg.seed, step, 1 + k, self.rank)
            )
            self.guard.check_losses(f"step {step}", {"discriminator loss": d_loss})
        g_loss = trainer.g_step(self.stream.per_rank, seeded_generator(cfg.seed, step, 0, self.rank))
        self.guard.check_losses(f"step {step}", {"generator loss": g_loss})
        self.guard.check_models(f"step {step}", step, trainer.models())
        self.acc.add(d_loss, g_loss)
        self.bar.update(1)
        if self.main:
            self._bookkeeping(step)
        if self._due(step, self.cfg.checkpoint_every):  # on every rank, as resumed ranks start cache-less
            _drop_weight_caches(*self.trainer.models())

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.cfg.steps

    def _bookkeeping(self, step: int) -> None:
        cfg = self.cfg
        evaluate_now = self.evaluator is not None and (
            (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        )
        generator = self.trainer.sampler
        if evaluate_now or self._due(step, cfg.log_every):
            row = self.acc.row(step)
            if evaluate_now:
                row.update(_evaluate(self.evaluator, generator, step))
            self.log.add(row)
            self.postfix.update({k: f"{v:.3g}" for k, v in row.items() if k != "step"})
            self.bar.set_postfix(self.postfix, refresh=False)
        if self._due(step, cfg.sample_every):
            self.samples = save_samples(
                generator, self.fixed_noise, self.out_dir / "samples" / f"step_{step:06d}.png"
            )
        if self._due(step, cfg.checkpoint_every):
            self.guard.check_state(f"step {step}", self.trainer.state())
            self.guard.saved(
                _save_state(self.ckpt_path, self.trainer, cfg, step, self.history, self.acc, full=True)
            )

    def close(self) -> None:
        """Close the progress bar and the logs (also after an error)."""
        self.bar.close()
        if self.log is not None:
            self.log.close()

    def finish(self) -> TrainResult:
        """Write the final model file (rank 0) and describe what the run produced."""
        model_path = self.out_dir / "model.safetensors"
        if self.main:
            _save_state(
                model_path, self.trainer, self.cfg, self.cfg.steps, self.history, self.acc, full=False
            )
        return TrainResult(
            history=self.history,
            generator=self.trainer.sampler,
            discriminator=_unwrap(self.trainer.D),
            model_path=model_path,
            checkpoint_path=self.ckpt_path,
            log_csv=self.out_dir / "log.csv",
            samples=self.samples,
        )


def _drop_weight_caches(*models: nn.Module) -> None:
    """Bump every parameter's version counter without changing its value (x * 1 is exact).

    Quantized layers reuse their quantized weight while the weight's version is unchanged, and a
    stateful quantizer (em, lq, kmeans) only warm-updates on a recompute. A resumed run starts
    with no such cache, so the uninterrupted run drops its caches at every checkpoint as well:
    both then continue identically (exact ``--resume``).
    """
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.mul_(1)


def _evaluate(evaluator: Evaluator, generator: nn.Module, step: int) -> dict[str, float]:
    was_training = generator.training
    generator.eval()
    try:
        scores = evaluator(generator, step)
    finally:
        generator.train(was_training)
    return {k: float(v) for k, v in scores.items()}
