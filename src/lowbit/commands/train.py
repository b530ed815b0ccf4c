"""``lowbit train CONFIG``: train a GAN (noise or image-to-image, ``task: i2i``) from scratch or fine-tune it
quantization-aware."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lowbit.commands import add_config_args, add_run_dir_args

T = TypeVar("T")


def register(sub) -> None:
    """Add ``lowbit train`` to the root parser."""
    parser = sub.add_parser(
        "train",
        help="train a GAN (from scratch or QAT fine-tuning of a checkpoint)",
        description="Train the generator/discriminator pair of a GAN config; writes "
        "log.csv, TensorBoard events, sample grids, checkpoints and model.safetensors.",
    )
    add_config_args(parser)
    add_run_dir_args(parser)
    add_nproc_arg(parser)
    parser.set_defaults(func=run_train)


def add_nproc_arg(parser) -> None:
    """``--nproc N``: data-parallel training in N processes (torchrun; gloo on CPU)."""
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes for data-parallel training (torchrun)"
    )


def default_out_dir(config: str) -> Path:
    """``runs/<config file stem>``: where a run goes when no --out is given."""
    return Path("runs") / Path(config).stem


def worker_argv(args, out_dir: Path) -> list[str]:
    """The ``lowbit train`` arguments each data-parallel worker gets (this command without --nproc)."""
    argv = [args.config, "--out", str(out_dir)]
    argv += [item for override in args.overrides for item in ("--set", override)]
    argv += [
        flag
        for flag, on in (("--resume", args.resume), ("--force", args.force), ("--quiet", args.quiet))
        if on
    ]
    return argv


def training_job(config: str, overrides: list[str]):
    """The config and train function of a YAML file: ``task: i2i`` selects the image-to-image GAN
    (``lowbit.train.i2i``), anything else the noise GAN."""
    from lowbit.config import apply_overrides, from_dict, read_yaml
    from lowbit.train.gan import GanConfig, train_gan
    from lowbit.train.i2i import I2IConfig, train_i2i

    data = apply_overrides(read_yaml(config), overrides)
    if data.get("task") == "i2i":
        return from_dict(I2IConfig, data, where=""), train_i2i
    return from_dict(GanConfig, data, where=""), train_gan


def launch_workers(args, out_dir: Path, command: str) -> int | None:
    """With ``--nproc N`` > 1: run ``lowbit COMMAND`` as N data-parallel workers (torchrun) and return
    their exit code; None with one process (the caller trains in this process)."""
    from lowbit.errors import ConfigError
    from lowbit.train import distributed

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1:
        return None
    return distributed.launch(args.nproc, worker_argv(args, out_dir), entry=("-m", "lowbit.cli", command))


def in_process_group(train: Callable[[], T]) -> tuple[T, bool]:
    """Run ``train`` inside the process group torchrun described (alone without one), leaving the group
    afterwards (also after an error); returns its result and whether this process is rank 0."""
    from lowbit.train import distributed

    ctx = distributed.setup()
    try:
        result = train()
    except BaseException:
        distributed.cleanup(synchronize=False)
        raise
    distributed.cleanup()
    return result, ctx.is_main


def run_train(args) -> int:
    """Validate the config, then train in this process (one torchrun rank, or alone) or launch workers."""
    cfg, train = training_job(args.config, args.overrides)
    out_dir = Path(args.out) if args.out else default_out_dir(args.config)
    code = launch_workers(args, out_dir, "train")
    if code is not None:
        return code
    result, main = in_process_group(
        lambda: train(cfg, out_dir, resume=args.resume, overwrite=args.force, progress=not args.quiet))
    if main:
        last = result.history[-1] if result.history else {}
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
        print(f"trained {cfg.name} for {cfg.steps} steps (last step: {summary}); model: {result.model_path}")
        if result.selected:
            print(f"model selection kept step {result.selected['step']} (validation FID "
                  f"{result.selected['val_fid']:.4g}); the last step's model: "
                  f"{result.last_model_path}")
    return 0
