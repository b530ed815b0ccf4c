"""Classifier training, full precision or quantization-aware (``lowbit train-classifier``).

``train_classifier(cfg, out_dir) -> dict`` trains a registry classifier on a ``lowbit.data``
dataset with SGD + momentum and step decay (or Adam), pad-4 random crop + horizontal flip for
32x32 inputs, and an optional ``lowbit.nn.QuantSpec``: the first and last weight layers stay full
precision unless ``keep_first_last`` is false. Search quantizers get the per-epoch temperature
schedule (``lowbit.nn.anneal``). Each epoch ends with the top-1/top-5 test accuracy and a resumable
checkpoint (one epoch is one step of the shared loop in ``lowbit.train.loop``); batches and
augmentation are derived from (seed, epoch), so a resumed run equals an uninterrupted one. Files
under ``out_dir``: ``checkpoints/last.safetensors``, ``model.safetensors`` (model name, kwargs,
quant spec, weights, metrics), ``metrics.json`` and ``log.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lowbit import data as lowbit_data
from lowbit.config import from_dict, to_dict
from lowbit.errors import CheckpointError, ConfigError
from lowbit.io import atomic_write_text
from lowbit.limits import check_count
from lowbit.models import create_model
from lowbit.models.extractor import save_extractor
from lowbit.nn import FrozenLayer, QuantSpec, anneal, convert, freeze
from lowbit.quant.registry import get_method
from lowbit.train.checkpoint import checkpoint_content, load_checkpoint
from lowbit.train.distill import logit_distillation_loss
from lowbit.train.distributed import DistContext, all_reduce_sum
from lowbit.train.guard import DivergenceGuard, GuardSpec
from lowbit.train.loop import LoopSettings, run_training, wrap_ddp
from lowbit.train.optim import fused_if_supported
from lowbit.train.recalibrate import recalibrate_batchnorm as recalibrate_norms

CHECKPOINT_KIND = "lowbit-classifier"
CROP_PAD = 4
BACKGROUND = -1.0  # black in the [-1, 1] image range: the value used for every padding


@dataclass
class ClassifierData:
    """Dataset, subsets and input pipeline. ``pad_to`` pads images (e.g. 28 -> 32) with black;
    ``augment`` (pad-4 random crop + horizontal flip) defaults to on for 32x32 inputs only."""

    dataset: str = "digits"
    limit: int | None = None
    test_limit: int | None = None
    root: str | None = None
    pad_to: int | None = None
    augment: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSpec:
    """SGD (momentum, weight decay) or Adam; the learning rate is multiplied by ``gamma`` at each
    epoch listed in ``milestones`` (step decay)."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 < self.gamma <= 1 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("optim: need lr > 0, 0 < gamma <= 1, weight_decay >= 0 and 0 <= momentum < 1")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ConfigError(f"optim.milestones must be increasing epochs >= 1, got {self.milestones}")

    def lr_at(self, epoch: int) -> float:
        """Step-decayed learning rate of (0-based) ``epoch``."""
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


@dataclass
class ClassifierConfig:
    """Everything ``train_classifier`` needs. ``init_from`` starts from a full-precision run's
    ``model.safetensors``; ``recalibrate_bn`` > 0 re-estimates the BatchNorm statistics on that many
    training batches before every evaluation; ``ship_extractor`` (a directory) also writes the
    trained net as a domain feature extractor (``<dataset>.safetensors`` + JSON card). ``distill`` > 0
    adds ``distill x T^2 KL(teacher || student)`` on logits softened by ``distill_temperature`` T
    (Hinton et al. 2015) to the cross-entropy; the teacher is ``teacher`` (a classifier
    ``model.safetensors``), else ``init_from``."""

    name: str = "classifier"
    model: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)
    data: ClassifierData = field(default_factory=ClassifierData)
    quant: QuantSpec | None = None
    keep_first_last: bool = True
    init_from: str | None = None
    recalibrate_bn: int = 0
    optim: OptimSpec = field(default_factory=OptimSpec)
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    threads: int = 0
    ship_extractor: str | None = None
    distill: float = 0.0
    distill_temperature: float = 4.0
    teacher: str | None = None
    guard: GuardSpec = field(default_factory=GuardSpec)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("threads", "recalibrate_bn"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")
        if self.ship_extractor is not None and self.quant is not None:
            raise ConfigError("ship_extractor needs a full-precision net; remove 'quant' from this config")
        if not (self.distill >= 0 and self.distill_temperature > 0):
            raise ConfigError(f"need distill >= 0 and distill_temperature > 0, got distill={self.distill}, "
                              f"distill_temperature={self.distill_temperature}")
        if self.distill and self.teacher_path is None:
            raise ConfigError("distill > 0 needs a teacher: set 'teacher' (a classifier model.safetensors) "
                              "or 'init_from' (its full-precision run is then the teacher)")
        if any(m > self.epochs for m in self.optim.milestones):
            raise ConfigError(f"optim.milestones {self.optim.milestones} lie beyond epochs={self.epochs}")


    @property
    def teacher_path(self) -> str | None:
        """The distillation teacher's model file: ``teacher``, else ``init_from``."""
        return self.teacher or self.init_from


# ---------------------------------------------------------------- data and augmentation

def pad_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``images`` on a black ``size`` x ``size`` canvas (e.g. 28x28 fashion-mnist -> 32x32)."""
    check_count("data.pad_to", size, "image_size")
    height, width = images.shape[-2:]
    if size < max(height, width):
        raise ConfigError(f"data.pad_to={size} is smaller than the {height}x{width} images; "
                          "raise it or drop it")
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top), value=BACKGROUND)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad by 4 pixels, crop back to the original size at a random offset, flip half horizontally
    (the CIFAR augmentation of 002 §3.1 / He et al. 2016)."""
    n, _, height, width = images.shape
    padded = F.pad(images, (CROP_PAD,) * 4, value=BACKGROUND)
    dy = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    crops = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def load_split(data: ClassifierData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (optionally padded) images and labels of one split."""
    limit = data.limit if split == "train" else data.test_limit
    images, labels = lowbit_data.load(data.dataset, split, root=data.root, limit=limit, **data.options)
    if data.pad_to is not None:
        images = pad_images(images, data.pad_to)
    return images.contiguous(), labels


def uses_augmentation(data: ClassifierData, image_size: int) -> bool:
    """``data.augment`` if set, else on for 32x32 inputs (the CIFAR recipe), off otherwise."""
    return data.augment if data.augment is not None else image_size == 32


# ---------------------------------------------------------------- model construction

def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of the Conv2d / ConvTranspose2d / Linear layers in module order."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def classifier_spec(model: nn.Module, spec: QuantSpec, keep_first_last: bool) -> QuantSpec:
    """``spec`` with the first and last weight layers added to ``keep_full_precision`` (002 §3.1:
    'the first and last layers are not quantized') unless ``keep_first_last`` is false."""
    if not keep_first_last:
        return spec
    names = weight_layer_names(model)
    kept = [n for n in (names[0], names[-1]) if n not in spec.keep_full_precision]
    return dataclasses.replace(spec, keep_full_precision=[*spec.keep_full_precision, *kept])


def load_model_file(path: str | Path) -> dict[str, Any]:
    """A ``model.safetensors`` written by ``train_classifier`` (checked to be a classifier file)."""
    state = load_checkpoint(path)
    if state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a lowbit classifier model file (kind {state.get('kind')!r}); "
                              "pass the model.safetensors of a train-classifier run")
    if not {"model", "quant", "state"} <= state.keys() or not isinstance(state["model"], str):
        raise CheckpointError(f"{path}: a training checkpoint, not a finished run's model file; pass the "
                              "run's model.safetensors (finish the run with --resume if it was killed)")
    return state


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """The registry model of ``cfg``, initialised from ``init_from`` and converted by ``cfg.quant``."""
    model = create_model(cfg.model, **cfg.kwargs)
    if cfg.init_from is not None:
        source = load_model_file(cfg.init_from)
        kwargs = source.get("kwargs")
        if source["quant"] is not None or source["model"] != cfg.model or kwargs != cfg.kwargs:
            raise ConfigError(f"init_from {cfg.init_from}: need a full-precision '{cfg.model}' run with "
                              f"kwargs {cfg.kwargs}, got a '{source['model']}' with kwargs {kwargs} and "
                              f"quant={source['quant']}")
        with checkpoint_content(cfg.init_from):
            model.load_state_dict(source["state"])
    if cfg.quant is None:
        return model
    return convert(model, classifier_spec(model, cfg.quant, cfg.keep_first_last))


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over ``images``
    (``lowbit.train.recalibrate``, in batches of ``batch_size``).

    Training uses batch statistics, but evaluation uses running averages that lag behind fast
    weight changes: quantizing a pretrained net changes each layer's output scale (weights of ±1
    instead of ~0.05) and sign flips keep changing it, so after a short fine-tuning the momentum
    averages still mix in stale statistics.
    """
    batches = -(-len(images) // batch_size)
    recalibrate_norms(model, lambda i: images[i * batch_size:(i + 1) * batch_size], batches)


def rebuild_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained classifier (eval mode) and its metrics from ``model.safetensors``."""
    state = load_model_file(path)
    with checkpoint_content(path):
        model = create_model(state["model"], **state["kwargs"])
        if state["quant"] is not None:
            spec = from_dict(QuantSpec, state["quant"])
            model = convert(model, classifier_spec(model, spec, state["keep_first_last"]))
        model.load_state_dict(state["state"])
        return model.eval(), state["metrics"]


def _is_power_of_two_or_zero(values: torch.Tensor) -> bool:
    magnitude = values.abs().double()
    nonzero = magnitude[magnitude > 0]
    return bool(torch.all(nonzero == torch.exp2(torch.round(torch.log2(nonzero)))))


def multiplication_free(model: nn.Module) -> bool:
    """True when the model has quantized weight layers and every value they can take is 0 or
    ±2^-n, so products become shifts (002 Tables 1-2, 'Req. Mult' = N). The full-precision first
    and last layers are not counted, as in the paper."""
    layers = [f for f in freeze(model).values() if isinstance(f, FrozenLayer)]
    return bool(layers) and all(_is_power_of_two_or_zero(f.codebook) for f in layers)


# ---------------------------------------------------------------- measurement

def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for the backward pass (deduplicated by storage): the
    activation memory of a training step, device-independent (on CUDA use max_memory_allocated)."""

    def __init__(self) -> None:
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved.append(tensor)
        return tensor

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def nbytes(self) -> int:
        return _storage_bytes(self.saved)


def parameter_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Trainable parameters + their gradients + optimizer state, in bytes."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return 2 * _storage_bytes(trainable) + _storage_bytes(states)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
             ) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` (put in eval mode) on a split."""
    model.eval()
    correct1 = correct5 = 0
    loss = 0.0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        target = labels[start:start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == target).sum())
        correct5 += int((top == target[:, None]).any(dim=1).sum())
    n = len(images)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "test_loss": loss / n}


# ---------------------------------------------------------------- training

def make_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam over the trainable parameters (search logits, not the
    frozen float weights they replaced)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused_if_supported(params)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           fused=fused)


def load_teacher(path: str) -> nn.Module:
    """The frozen distillation teacher (eval mode); the first step checks its logits against the
    student's (``logit_distillation_loss``), so a teacher of other classes fails before any update."""
    teacher, _ = rebuild_classifier(path)
    return teacher.requires_grad_(False)


class ClassifierTask:
    """The classifier's part of the shared training loop (``lowbit.train.loop``): one step is one
    epoch (step-decayed learning rate, search temperature, augmented batches), then the optional
    BatchNorm recalibration and the test-split accuracy, returned beside the training loss."""

    kind = CHECKPOINT_KIND
    loss_names = {"train_loss": "training loss", "top1": "top-1 accuracy", "top5": "top-5 accuracy",
                  "test_loss": "test loss"}

    def __init__(self, cfg: ClassifierConfig, guard: DivergenceGuard, progress: bool = True,
                 ctx: DistContext | None = None) -> None:
        self.cfg, self.guard, self.progress, self.ctx = cfg, guard, progress, ctx or DistContext()
        self.train_x, self.train_y = load_split(cfg.data, "train")
        check_shards(len(self.train_x), cfg.batch_size, ctx.world_size)
        self.test_x, self.test_y = load_split(cfg.data, "test")
        self.augment = uses_augmentation(cfg.data, self.train_x.shape[-1])
        self.model = build_classifier(cfg)
        self.trained = self.model  # what the batches go through: the model, or its DDP wrapper
        self.teacher = load_teacher(cfg.teacher_path) if cfg.distill else None
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.epoch = 0
        self.last: dict[str, float] = {}
        self.train_seconds = 0.0
        self.peak_bytes = 0

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(),
                "train_seconds": self.train_seconds, "peak_bytes": self.peak_bytes}

    def load_state(self, state: dict[str, Any], source: str) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.epoch, self.last = int(state["step"]), dict(state["history"][-1])
        self.train_seconds, self.peak_bytes = float(state["train_seconds"]), int(state["peak_bytes"])

    def model_state(self) -> dict[str, Any]:
        """The finished run's model file: model name, kwargs, quant spec, weights and final metrics."""
        cfg = self.cfg
        quant = None if cfg.quant is None else cfg.quant.to_dict()
        return {"model": cfg.model, "kwargs": cfg.kwargs, "quant": quant,
                "keep_first_last": cfg.keep_first_last, "state": self.model.state_dict(),
                "metrics": self.metrics()}

    def models(self) -> list[nn.Module]:
        return [self.model]

    @property
    def sampler(self) -> nn.Module:
        return self.model

    def distribute(self, device: torch.device) -> None:
        """Train through DDP: each rank takes its share of every global batch (``shard_batch``)."""
        self.trained = wrap_ddp(self.model, device)

    def _batches(self, epoch: int) -> tuple[Any, torch.Generator]:
        seed = self.cfg.seed * 1_000_003 + epoch
        loader = lowbit_data.make_loader(self.train_x, self.train_y, self.cfg.batch_size, seed=seed)
        return loader, torch.Generator().manual_seed(seed)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, measure: bool) -> float:
        """One update on this rank's share of a global batch; returns the share's summed loss."""
        count, world = len(labels), self.ctx.world_size
        images, labels = shard_batch(images, self.ctx), shard_batch(labels, self.ctx)
        with SavedTensorMeter() as meter:
            logits = self.trained(images)
            losses = F.cross_entropy(logits, labels, reduction="none")
            share = 1.0 if world == 1 else len(labels) * world / count  # this rank's part of the global mean
            loss = losses.mean() * share
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(images)
                loss = loss + share * self.cfg.distill * logit_distillation_loss(logits, target,
                                                                                 self.cfg.distill_temperature)
        self.guard.check_losses(f"epoch {self.epoch + 1}", {"training loss": float(loss.detach())})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if measure:
            step_bytes = meter.nbytes() + parameter_bytes(self.model, self.optimizer)
            self.peak_bytes = max(self.peak_bytes, step_bytes)
        return float(losses.detach().sum())

    def train_epoch(self) -> float:
        """One pass over the training set; returns the mean training loss."""
        anneal(self.model, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr_at(self.epoch)
        self.model.train()
        loader, generator = self._batches(self.epoch)
        bar = tqdm(loader, desc=f"{self.cfg.name} epoch {self.epoch + 1}/{self.cfg.epochs}",
                   disable=not (self.progress and self.ctx.is_main), leave=False)
        total, count = 0.0, 0
        start = time.perf_counter()
        for index, (images, labels) in enumerate(bar):
            if self.augment:
                images = random_crop_flip(images, generator)
            total += self._step(images, labels, measure=index == 0)
            self.guard.check_models(f"epoch {self.epoch + 1}", index, [self.model])
            count += len(labels)
            bar.set_postfix(loss=f"{total * self.ctx.world_size / count:.4f}")
        self.train_seconds += time.perf_counter() - start
        return float(all_reduce_sum(torch.tensor(total, dtype=torch.float64), self.ctx)) / count

    def step(self, step: int) -> dict[str, float]:
        """Epoch ``step`` (1-based): train, recalibrate BatchNorm if asked, evaluate on the test split."""
        self.epoch = step - 1
        train_loss = self.train_epoch()
        if self.cfg.recalibrate_bn:
            calibration = self.train_x[:self.cfg.recalibrate_bn * self.cfg.batch_size]
            recalibrate_batchnorm(self.model, calibration, self.cfg.batch_size)
        self.last = {"train_loss": train_loss, **evaluate(self.model, self.test_x, self.test_y)}
        self.epoch = step
        return self.last

    def metrics(self) -> dict[str, Any]:
        """Final accuracy, loss, cost (time, peak training memory) and the multiplication-free flag."""
        last = self.last
        return {"name": self.cfg.name, "model": self.cfg.model, "dataset": self.cfg.data.dataset,
                "method": describe_method(self.cfg.quant), "seed": self.cfg.seed, "epochs": self.epoch,
                "top1": last["top1"], "top5": last["top5"], "test_loss": last["test_loss"],
                "train_loss": last["train_loss"], "train_seconds": self.train_seconds,
                "seconds_per_epoch": self.train_seconds / self.epoch, "peak_train_bytes": self.peak_bytes,
                "multiplication_free": multiplication_free(self.model),
                "n_train": len(self.train_x), "n_test": len(self.test_x)}


def check_shards(n_train: int, batch_size: int, world: int) -> None:
    """Data-parallel training splits every global batch over ``world`` ranks: the batch size must be a
    multiple of the rank count and the epoch's last, partial batch must give every rank an image."""
    if world == 1:
        return
    tail = n_train % batch_size
    if batch_size % world or 0 < tail < world:
        raise ConfigError(f"batch_size {batch_size} does not split over {world} processes (the last batch of "
                          f"each epoch holds {tail or batch_size} of {n_train} images); use a multiple of "
                          f"{world} that leaves no remainder below {world}, or fewer processes")


def shard_batch(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows of a global batch (rows ``rank``, ``rank + world``, ...; the whole batch alone).
    Each rank's loss is its summed loss x world / global count, so DDP's gradient average equals the
    one-process gradient of the whole batch's mean loss (BatchNorm still normalises per rank)."""
    return batch if ctx.world_size == 1 else batch[ctx.rank::ctx.world_size]


def describe_method(spec: QuantSpec | None) -> str:
    """A short label such as 'fp', 'bwn w1', 'lq w2a2' or 'search-sgt w1'."""
    if spec is None or not (spec.quantizes_weights or spec.quantizes_acts):
        return "fp"
    if spec.quantizes_weights:
        name = get_method(spec.weight).label(spec.weight_opts)
    else:
        name = get_method(spec.act).label(spec.act_opts)
    weight = f"w{spec.weight_bits}" if spec.quantizes_weights else "w32"
    return f"{name} {weight}" + (f"a{spec.act_bits}" if spec.quantizes_acts else "")


def _ship(trainer: ClassifierTask, metrics: dict[str, Any], command: str | None) -> None:
    cfg = trainer.cfg
    card = {"test_accuracy": metrics["top1"], "test_top5": metrics["top5"],
            "test_split_size": metrics["n_test"], "train_split_size": metrics["n_train"],
            "epochs": metrics["epochs"], "seed": cfg.seed,
            "command": command or f"lowbit train-classifier <config named {cfg.name!r}>",
            "config": to_dict(cfg), "torch": torch.__version__}
    save_extractor(trainer.model, cfg.data.dataset, card, Path(cfg.ship_extractor))


def train_classifier(cfg: ClassifierConfig, out_dir: str | Path | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = True, command: str | None = None
                     ) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (default ``runs/<name>``) and return its final metrics.

    The shared training loop (``lowbit.train.loop``) runs one epoch per step, checkpoints after each
    and writes ``log.csv`` and ``model.safetensors``; ``resume`` continues from the last checkpoint
    (only ``epochs`` may change), an existing run is an error unless ``overwrite``. ``metrics.json``
    holds the final metrics; ``command`` (the CLI line) is recorded in a shipped extractor's card.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    settings = LoopSettings(cfg.name, cfg.epochs, cfg.seed, threads=cfg.threads, unit="epoch",
                            volatile=("epochs", "guard"), guard=cfg.guard,
                            fix=f"lower optim.lr (now {cfg.optim.lr})")
    result = run_training(cfg, settings, out_dir,
                          lambda device, ctx, guard: ClassifierTask(cfg, guard, progress, ctx),
                          resume=resume, overwrite=overwrite, progress=progress)
    task: ClassifierTask = result.task
    metrics = task.metrics()
    if task.ctx.is_main:
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if cfg.ship_extractor is not None:
            _ship(task, metrics, command)
    return metrics
