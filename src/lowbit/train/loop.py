"""The training loop every step-based lowbit trainer shares; each trainer supplies only its step.

``run_training(cfg, settings, out_dir, build_task, ...)`` owns what is common to the noise GAN, the
image-to-image GAN and the classifier (and whatever trains next): the run-directory guard,
threads / device / seed, resume (config check, weights, optimisers, RNG, loss sums), DDP through
``train/distributed.py``, the run-directory lock (``train/rundir.py``), the progress bar,
``log.csv`` + TensorBoard, evaluation, sample grids, the checkpoint cadence, the divergence guard
(``train/guard.py``: every loss and, every ``guard.every`` steps, every weight; the whole state
before a checkpoint is written), model selection on a validation score (``train/selection.py``) and
the final model file. A ``Task`` supplies the networks, one
training step and its sample grid; ``LoopSettings`` says how long to train and how often to log,
evaluate, sample and checkpoint (the classifier's step is a whole epoch, evaluated and
checkpointed every time).

Determinism: a task draws its batches and noise from generators seeded by (seed, step, ...),
never from the global RNG during the loop, so ``resume=True`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lowbit.config import from_dict, to_dict
from lowbit.errors import CheckpointError, ConfigError
from lowbit.io import atomic_write_csv, atomic_write_text
from lowbit.nn.transforms import transform_hooks
from lowbit.train import distributed
from lowbit.train.checkpoint import (
    checkpoint_content,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lowbit.train.guard import DivergenceGuard, GuardSpec
from lowbit.train.rundir import locks_run_dir
from lowbit.train.selection import Selector, SelectSpec, Validator

#: a callback ``evaluator(model, step) -> {"fid": ..., ...}`` run on rank 0 (the model in eval mode).
Evaluator = Callable[[nn.Module, int], dict[str, float]]
#: config fields that may change when a run is resumed
RESUMABLE_CHANGES = ("steps", "log_every", "eval_every", "sample_every", "checkpoint_every", "threads",
                     "device", "guard")


@dataclass
class StepLoopConfig:
    """The shared loop's fields of a step-based trainer config (GanConfig, I2IConfig), declared once:
    counts >= 1, optional cadences >= 0 (0 = off)."""

    steps: int = 2000
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    log_every: int = 10
    eval_every: int = 0
    sample_every: int = 500
    checkpoint_every: int = 500
    guard: GuardSpec = field(default_factory=GuardSpec)
    select: SelectSpec = field(default_factory=SelectSpec)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every", "sample_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")


class ResumeMismatchError(ConfigError, CheckpointError):
    """``--resume`` with a config that differs from the one the checkpoint was saved with."""


@dataclass(frozen=True)
class LoopSettings:
    """How long the loop runs and how often it logs, evaluates, samples and checkpoints (0 = only at
    the end for evaluation, never for samples); ``unit`` names the step in the history (``step`` or
    ``epoch``); ``volatile`` lists the config fields a resumed run may change; ``guard`` bounds the
    divergence guard and ``fix`` is the advice its error gives; ``select`` is the model selection."""

    name: str
    steps: int
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    log_every: int = 1
    eval_every: int = 0
    sample_every: int = 0
    checkpoint_every: int = 1
    unit: str = "step"
    volatile: tuple[str, ...] = RESUMABLE_CHANGES
    guard: GuardSpec = field(default_factory=GuardSpec)
    fix: str = "lower the learning rate"
    select: SelectSpec = field(default_factory=SelectSpec)

    @classmethod
    def of(cls, cfg: Any) -> LoopSettings:
        """The settings of a step-based config (GanConfig, I2IConfig) that carries these fields itself."""
        shared = {f.name for f in fields(StepLoopConfig)} | {"name"}
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name in shared})


class Task(Protocol):
    """One trainer's part: networks, a step, checkpoint contents and a sample grid."""

    #: checkpoint ``kind`` tag, e.g. ``lowbit-gan``
    kind: str
    #: readable names of the losses ``step`` returns, e.g. {"d_loss": "discriminator loss"}
    loss_names: dict[str, str]

    def step(self, step: int) -> dict[str, float]:
        """Train one step (1-based); returns its losses."""

    def models(self) -> list[nn.Module]:
        """Every network the task updates."""

    def state(self) -> dict[str, Any]:
        """Weights and optimiser states, for a resumable checkpoint."""

    def load_state(self, state: dict[str, Any], source: str) -> None:
        """Restore what ``state`` saved (``state`` is the whole checkpoint: also step and history)."""

    def model_state(self) -> dict[str, Any]:
        """What the final model file holds (the networks users load)."""

    def distribute(self, device: torch.device) -> None:
        """Wrap the trained networks in DDP (called after a resume, only with several ranks)."""

    @property
    def sampler(self) -> nn.Module:
        """The network to evaluate and sample from."""

    def save_samples(self, path: Path) -> Path:
        """Write a sample grid of the sampler to ``path`` (only called when ``sample_every`` > 0)."""


# ----------------------------------------------------------------------------- small shared pieces


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DDP (buffers such as BatchNorm statistics stay per rank)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def select_device(name: str, rank: int) -> torch.device:
    """``cpu``, or this rank's CUDA GPU for ``cuda``."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for but no CUDA GPU is visible; set device: cpu")
        return torch.device("cuda", rank % torch.cuda.device_count())
    if name != "cpu":
        raise ConfigError(f"unknown device '{name}'; use cpu or cuda")
    return torch.device("cpu")


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU torch.Generator whose seed is a hash of ``key`` (e.g. seed, step, phase, rank)."""
    seed = int(np.random.SeedSequence([abs(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run keeps its resumable checkpoint."""
    return out_dir / "checkpoints" / "last.safetensors"


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path:
    """The run directory guard: resuming needs a checkpoint, starting over needs ``overwrite``."""
    ckpt = checkpoint_path(out_dir)
    if resume and not ckpt.is_file():
        raise CheckpointError(f"nothing to resume: {ckpt} does not exist; run without --resume to start")
    if not resume and not overwrite and ckpt.is_file():
        raise ConfigError(
            f"{out_dir} already holds a run ({ckpt.name}); pass --resume to continue it, "
            "--force to start over, or choose another output directory"
        )
    return ckpt


def drop_weight_caches(*models: nn.Module) -> None:
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


def resumable_fields(cfg: Any, volatile: tuple[str, ...]) -> dict[str, Any]:
    """The config as a dict without the ``volatile`` fields (those a resume may change)."""
    return {key: value for key, value in to_dict(cfg).items() if key not in volatile}


def check_resumable(cfg: Any, stored: Any, path: Path, volatile: tuple[str, ...]) -> None:
    """Refuse to resume ``path`` when ``cfg`` differs from its stored config outside ``volatile``."""
    try:
        theirs = resumable_fields(from_dict(type(cfg), stored), volatile)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: stored config is invalid ({exc}); retrain with this lowbit "
                              "version") from None
    own = resumable_fields(cfg, volatile)
    changed = sorted(k for k in own if own[k] != theirs.get(k))
    if changed:
        raise ResumeMismatchError(
            f"cannot resume {path}: saved for another config (it differs in {', '.join(changed)}); resume "
            f"with the config the run started with (only {', '.join(volatile)} may change), or --force to "
            "start over"
        )


def run_model(model: nn.Module, fn: Callable[[nn.Module], Any]) -> Any:
    """``fn(model)`` with the model in eval mode, its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return fn(model)
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode without autograd, ``x`` moved to the model's device, the result on the CPU
    (sample grids)."""
    device = next(model.parameters()).device

    def forward(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(x.to(device)).cpu()

    return run_model(model, forward)


# ----------------------------------------------------------------------------- logging


@dataclass
class Accumulator:
    """Running sums of each loss since the last history row, each with its own step count (a step may
    report only some losses, e.g. the distillation warm-up has no D loss)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Accumulator:
        """From a checkpoint's ``accumulator``; one with a single ``count`` for every loss still loads."""
        if "count" in state:
            return cls(dict(state["sums"]), {key: int(state["count"]) for key in state["sums"]})
        return cls(dict(state["sums"]), {key: int(n) for key, n in state["counts"].items()})

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": self.counts}

    def add(self, losses: dict[str, float]) -> None:
        """Add one step's losses."""
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def row(self, step: int, unit: str = "step") -> dict[str, float]:
        """The mean of each loss over the steps that reported it since the last row; resets the sums."""
        row = {unit: step, **{k: v / self.counts[k] for k, v in self.sums.items()}}
        self.sums, self.counts = {}, {}
        return row


class RunLog:
    """History rows -> log.csv (rewritten atomically) and TensorBoard scalars; rank 0 only."""

    def __init__(self, out_dir: Path, history: list[dict[str, float]], start_step: int,
                 columns: list[str], unit: str = "step") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.csv_path = out_dir / "log.csv"
        self.history, self.columns, self.unit = history, [unit, *columns], unit
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)
        self.flush()  # a resumed run's log.csv restarts from the checkpoint's history

    def add(self, row: dict[str, float]) -> None:
        """Append a history row and write it to log.csv and TensorBoard."""
        self.history.append(row)
        for key, value in row.items():
            if key != self.unit:
                self.writer.add_scalar(f"train/{key}", value, int(row[self.unit]))
        self.flush()

    def flush(self) -> None:
        """Rewrite log.csv (all rows, atomically) and flush TensorBoard."""
        columns = self.columns + sorted({k for row in self.history for k in row} - set(self.columns))
        atomic_write_csv(self.csv_path, self.history, columns)
        self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        self.writer.close()


# ----------------------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    """What a run produced: its history, the task and the files written."""

    history: list[dict[str, float]]
    task: Task
    model_path: Path
    checkpoint_path: Path
    log_csv: Path
    samples: Path | None
    #: ``{"step", "val_fid"}`` of the generator restored by model selection (None: selection off)
    selected: dict[str, float] | None = None
    #: with model selection, the last step's model file beside the model file (None: selection off)
    last_model_path: Path | None = None


class TrainLoop:
    """Drives one ``Task`` from its start (or checkpoint) step to ``cfg.steps``."""

    def __init__(self, cfg: Any, settings: LoopSettings, task: Task, out_dir: Path,
                 evaluator: Evaluator | None, ckpt_path: Path, ctx: distributed.DistContext,
                 guard: DivergenceGuard, validator: Validator | None = None) -> None:
        self.cfg, self.settings, self.task, self.guard = cfg, settings, task, guard
        self.selector = Selector(settings.select, validator) if validator is not None else None
        self.out_dir, self.evaluator = out_dir, evaluator
        self.ckpt_path, self.main = ckpt_path, ctx.is_main
        self.start_step, self.history, self.acc = 0, [], Accumulator()
        self.samples: Path | None = None
        self.postfix: dict[str, str] = {}
        self.log: RunLog | None = None

    def restore(self, read: Callable[[Path], dict[str, Any]]) -> None:
        """Continue from the run's checkpoint: config check, weights, optimisers, RNG, history, sums."""
        state = read(self.ckpt_path)
        check_resumable(self.cfg, state["config"], self.ckpt_path, self.settings.volatile)
        with checkpoint_content(self.ckpt_path):
            self.task.load_state(state, str(self.ckpt_path))
            set_rng_state(state["rng"])
            self.start_step, self.history = int(state["step"]), list(state["history"])
            self.acc = Accumulator.from_state(state["accumulator"])
            if self.selector is not None:
                self.selector.load_state(state)
        self.guard.saved(self.ckpt_path)

    def start(self, progress: bool) -> None:
        """Open the logs and the progress bar (the first files this run writes)."""
        if self.main:
            self.log = RunLog(self.out_dir, self.history, self.start_step, list(self.task.loss_names),
                              self.settings.unit)
            if self.start_step == 0:
                atomic_write_text(self.out_dir / "config.json", json.dumps(to_dict(self.cfg), indent=1))
        self.bar = tqdm(total=self.settings.steps, initial=self.start_step, desc=self.settings.name,
                        disable=not (self.main and progress), dynamic_ncols=True, unit=self.settings.unit)

    def step(self, step: int) -> None:
        """The task's step, the divergence guard, then logging / evaluation / samples / checkpoint."""
        losses = self.task.step(step)
        for model in self.task.models():  # pruning masks and schedules (lowbit.compress transforms)
            for hook in transform_hooks(unwrap(model)):
                hook.after_step(unwrap(model), step)
        when = f"{self.settings.unit} {step}"
        self.guard.check_losses(when, {self.task.loss_names.get(k, k): v for k, v in losses.items()})
        self.guard.check_models(when, step, self.task.models())
        self.acc.add(losses)
        self.bar.update(1)
        if self.main:
            self._bookkeeping(step)
        if self._due(step, self.settings.checkpoint_every):  # on every rank: resumed ranks start cache-less
            drop_weight_caches(*self.task.models())

    def _due(self, step: int, every: int) -> bool:
        """True every ``every`` steps and at the last one (never when ``every`` is 0)."""
        return every > 0 and (step % every == 0 or step == self.settings.steps)

    def _bookkeeping(self, step: int) -> None:
        cfg = self.settings
        evaluate_now = self.evaluator is not None and (
            (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        )
        validate_now = self.selector is not None and self.selector.due(step, cfg.steps)
        if evaluate_now or validate_now or self._due(step, cfg.log_every):
            row = self.acc.row(step, cfg.unit)
            if evaluate_now:
                scores = run_model(self.task.sampler, lambda m: self.evaluator(m, step))
                row.update({k: float(v) for k, v in scores.items()})
            if validate_now:
                row["val_fid"] = run_model(self.task.sampler, lambda m: self.selector.offer(step, m))
                self.postfix["best"] = f"{self.selector.step}"
            self.log.add(row)
            self.postfix.update({k: f"{v:.3g}" for k, v in row.items() if k != cfg.unit})
            self.bar.set_postfix(self.postfix, refresh=False)
        if self._due(step, cfg.sample_every):
            self.samples = self.task.save_samples(self.out_dir / "samples" / f"step_{step:06d}.png")
        if self._due(step, cfg.checkpoint_every):
            self.guard.check_state(f"{cfg.unit} {step}", self.task.state())
            self.guard.saved(self._save(self.ckpt_path, step, full=True))

    def _save(self, path: Path, step: int, full: bool) -> Path:
        state: dict[str, Any] = {"kind": self.task.kind, "config": to_dict(self.cfg), "step": step,
                                 "history": self.history}
        if full:
            state.update(self.task.state(), rng=rng_state(),
                         accumulator=self.acc.state())
            if self.selector is not None:
                state.update(self.selector.state())
        else:
            state.update(self.task.model_state())
        return save_checkpoint(path, state)

    def close(self) -> None:
        """Close the progress bar and the logs (also after an error)."""
        self.bar.close()
        if self.log is not None:
            self.log.close()

    def finish(self) -> LoopResult:
        """Write the final model file (rank 0) and describe what the run produced. With model selection the
        last step's model goes to ``model_last.safetensors`` and the selected one to the model file."""
        model_path = self.out_dir / "model.safetensors"
        selected = self.selector.summary() if self.main and self.selector is not None else None
        last_path = self.out_dir / "model_last.safetensors" if selected is not None else None
        if last_path is not None:
            self._save(last_path, self.settings.steps, full=False)
            self.selector.restore(self.task.sampler)
        if self.main:
            self._save(model_path, self.settings.steps, full=False)
        return LoopResult(self.history, self.task, model_path, self.ckpt_path, self.out_dir / "log.csv",
                          self.samples, selected, last_path)


@locks_run_dir(lambda args: args["out_dir"])
def run_training(
    cfg: Any,
    settings: LoopSettings,
    out_dir: str | Path,
    build_task: Callable[[torch.device, distributed.DistContext, DivergenceGuard], Task],
    read_checkpoint: Callable[[Path], dict[str, Any]] = load_checkpoint,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    validator: Validator | None = None,
) -> LoopResult:
    """Build the task of ``cfg`` (the config stored in every checkpoint) and train it for
    ``settings.steps`` into ``out_dir``; see the module docstring.

    ``build_task(device, ctx, guard)`` validates and loads everything before the first file is
    written, so bad input leaves ``out_dir`` untouched (a task may check its inner steps with the
    run's ``guard``); ``read_checkpoint`` reads (and checks) a checkpoint; ``validator`` scores the
    sampler for model selection (needed when ``settings.select`` is on). The whole call holds the
    lock of ``out_dir`` (rank 0).
    """
    if settings.select.enabled and validator is None:
        raise ConfigError(f"{settings.name}: 'select' needs a validation metric, which this trainer does not "
                          "have; remove select")
    out_dir = Path(out_dir)
    ckpt = prepare_run_dir(out_dir, resume, overwrite)
    ctx = distributed.current()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = select_device(settings.device, ctx.rank)
    torch.manual_seed(settings.seed)
    guard = DivergenceGuard(settings.guard, settings.fix)
    task = build_task(device, ctx, guard)
    loop = TrainLoop(cfg, settings, task, out_dir, evaluator, ckpt, ctx, guard,
                     validator if settings.select.enabled else None)
    if resume:
        loop.restore(read_checkpoint)
    if ctx.distributed:
        task.distribute(device)
    loop.start(progress)
    try:
        for step in range(loop.start_step + 1, settings.steps + 1):
            loop.step(step)
    finally:
        loop.close()
    return loop.finish()
