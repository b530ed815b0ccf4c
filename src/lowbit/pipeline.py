"""The main job (``lowbit run CONFIG``): pretrained FP GAN -> convert -> QAT -> evaluate -> report -> export.

1. load the shipped (or given) full-precision GAN checkpoint and derive the QAT config from it;
2. convert G (and D if asked) with their ``QuantSpec`` and fine-tune quantization-aware;
3. evaluate FP and quantized generators with the same n, latents (or, for an image-to-image GAN,
   the same test inputs: PSNR / SSIM beside FID) and feature extractor;
4. write sample grids (input | FP | quantized | target for image-to-image GANs), weight histograms,
   compression metrics, the packed export (when ``lowbit.export`` is importable) and
   ``report.html`` + ``results.json`` under the output directory.
All inputs are validated before the first file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import data as lowbit_data
from lowbit import metrics
from lowbit.config import to_dict
from lowbit.errors import ConfigError
from lowbit.io import atomic_path, atomic_write_text
from lowbit.limits import check_count
from lowbit.nn import QuantSpec
from lowbit.report.html import HtmlReport
from lowbit.train.gan import GanConfig, SearchSGD, TrainResult, train_gan
from lowbit.train.i2i import I2IConfig, comparison_grid, train_i2i
from lowbit.train.networks import (
    build_networks,
    checkpoint_config,
    load_discriminator,
    load_generator,
    resolve_checkpoint,
)
from lowbit.train.rundir import locks_run_dir
from lowbit.train.selection import SelectSpec

GRID = 64
#: image-to-image grids: this many test pairs, one row of input | FP | quantized | target each
GRID_PAIRS = 16


@dataclass
class QatSettings:
    """The quantization-aware fine-tune; None fields keep the pretrained run's value."""

    steps: int = 400
    batch_size: int | None = None
    lr_g: float | None = None
    lr_d: float | None = None
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
    data_limit: int | None = None
    eval_every: int = 0
    eval_samples: int = 1000
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    threads: int = 0
    select: SelectSpec = field(default_factory=SelectSpec)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"qat.steps must be >= 1, got {self.steps}")
        check_count("qat.eval_samples", self.eval_samples, "samples", minimum=10)


#: QAT settings handed to the trainer under the same name (the noise-GAN trainer's config has them all; the
#: image-to-image trainer's a subset, and a set GAN-only one is refused for it)
QAT_BY_NAME = tuple(
    f.name for f in dataclasses.fields(QatSettings) if f.name in GanConfig.__dataclass_fields__
)


@dataclass
class EvalSettings:
    """FID/IS/KID (and PSNR/SSIM for image-to-image GANs) of FP vs quantized: same sample count, inputs
    and extractor for both. ``split`` None: train for noise GANs, test for image-to-image GANs."""

    samples: int = 5000
    batch_size: int = 500
    seed: int = 0
    split: str | None = None

    def __post_init__(self) -> None:
        check_count("eval.samples", self.samples, "samples", minimum=10)
        check_count("eval.batch_size", self.batch_size, "batch")


@dataclass
class RunConfig:
    """``lowbit run`` config: which pretrained GAN, how to quantize each network, QAT, evaluation."""

    name: str = "run"
    pretrained: str = "dcgan-mnist"
    generator_quant: QuantSpec | None = None
    discriminator_quant: QuantSpec | None = None
    qat: QatSettings = field(default_factory=QatSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    export: bool = True
    out_dir: str | None = None
    device: str = "cpu"


@dataclass
class RunResult:
    """What ``run_pipeline`` produced."""

    report: Path
    results: dict[str, Any]
    qat: TrainResult
    packed: Path | None

    def summary(self) -> list[str]:
        """One line per score and the packed size, for the terminal."""
        lines = [
            f"{label}: " + (f"PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  " if "psnr" in s else "")
            + f"FID {s['fid']:.3f}  IS {s['is']:.3f} KID {s['kid']:.4f} n={s['n']} ({s['extractor']})"
            for label, s in self.results["scores"].items()
        ]
        last = self.results["compression"][-1]
        lines.append(
            f"{last['model']}: {last['size_bytes']} bytes, compression x{last['compression_ratio']:.1f}"
        )
        if self.results.get("selection"):
            lines.append(selection_line(self.results["selection"]))
        return lines


def selection_line(selection: dict[str, Any]) -> str:
    """Which QAT step model selection kept, and its validation FID."""
    return (f"model selection: step {selection['step']} of {selection['steps']} (validation FID "
            f"{selection['val_fid']:.3f}, n={selection['samples']} {selection['split']} images, latent seed "
            f"{selection['seed']}); 'quantized' is that generator, 'quantized (last step)' the last one")


def output_dir(cfg: RunConfig) -> Path:
    """``cfg.out_dir`` or ``runs/<name>``."""
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / cfg.name


def qat_config(cfg: RunConfig, pretrained: GanConfig | I2IConfig, checkpoint: Path) -> GanConfig | I2IConfig:
    """The pretrained run's models, data and loss with this run's quant specs and fine-tune schedule."""
    qat = cfg.qat
    generator = dataclasses.replace(pretrained.generator, quant=cfg.generator_quant, lr=qat.lr_g)
    discriminator = dataclasses.replace(pretrained.discriminator, quant=cfg.discriminator_quant, lr=qat.lr_d)
    limit = qat.data_limit if qat.data_limit is not None else pretrained.data.limit
    updates = {name: getattr(qat, name) for name in QAT_BY_NAME}
    updates.update(
        name=f"{cfg.name}-qat",
        data=dataclasses.replace(pretrained.data, limit=limit),
        generator=generator,
        discriminator=discriminator,
        init_from=str(checkpoint),
        batch_size=qat.batch_size or pretrained.batch_size,
        device=cfg.device,
        sample_every=qat.steps,
    )
    own = {f.name for f in dataclasses.fields(pretrained)}
    unsupported = [k for k in QAT_BY_NAME if k not in own and updates[k]]
    if unsupported:
        raise ConfigError(f"qat.{unsupported[0]} applies to noise GANs only; remove it for the "
                          f"image-to-image GAN {checkpoint}")
    return dataclasses.replace(pretrained, **{k: v for k, v in updates.items() if k in own})


def _train(qcfg: GanConfig | I2IConfig):
    """The trainer of a config: the image-to-image GAN's or the noise GAN's."""
    return train_i2i if isinstance(qcfg, I2IConfig) else train_gan


def _score(generator: nn.Module, dataset: str, n: int, cfg: EvalSettings, progress: bool) -> dict[str, Any]:
    return metrics.evaluate(generator, dataset, n=n, batch=cfg.batch_size, seed=cfg.seed, split=cfg.split,
                            progress=progress)


def _save_grid(generator: nn.Module, z: torch.Tensor, path: Path) -> Path:
    generator.eval()
    with torch.no_grad():
        images = generator(z)
    return lowbit_data.save_image_grid(images, path)


def _export(model: nn.Module, path: Path) -> Path | None:
    """The packed export of the quantized generator, when the deployment package is available."""
    try:
        from lowbit.export import export_packed
    except ImportError:
        return None
    return export_packed(model, path)


def _seconds_per_image(generator: nn.Module, z: torch.Tensor, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one batched forward, per image (inference mode)."""
    generator.eval()
    best = math.inf
    with torch.inference_mode():
        generator(z[:2])
        for _ in range(repeats):
            start = time.perf_counter()
            generator(z)
            best = min(best, time.perf_counter() - start)
    return best / z.shape[0]


def _compression_rows(
    fp: nn.Module, quantized: nn.Module, z: torch.Tensor, packed: Path | None
) -> list[dict[str, Any]]:
    """Params, FLOPs, BOPs, sizes and ratios of FP vs quantized (seed 004 §2), plus the real packed file."""
    rows = []
    for label, model in (("full precision", fp), ("quantized (simulated)", quantized)):
        report = metrics.compression_report(model, z[:1])
        rows.append(
            {
                "model": label,
                "params": report.params,
                "FLOPs": report.flops,
                "BOPs": report.bops,
                "size_bytes": report.size_bytes,
                "compression_ratio": report.compression_ratio,
                "s/image": _seconds_per_image(model, z),
            }
        )
    if packed is not None:
        from lowbit.export import load as load_packed

        size = packed.stat().st_size
        rows.append(
            {
                "model": f"packed file {packed.name}",
                "params": rows[1]["params"],
                "FLOPs": rows[1]["FLOPs"],
                "BOPs": rows[1]["BOPs"],
                "size_bytes": size,
                "compression_ratio": rows[0]["size_bytes"] / size,
                "s/image": _seconds_per_image(load_packed(packed), z),
            }
        )
    for row in rows:
        row["speed_up"] = rows[0]["s/image"] / row["s/image"]
    return rows


def _score_rows(scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("psnr", "ssim", "fid", "is", "is_std", "kid", "kid_std", "n", "extractor")
    return [{"model": label, **{k: s[k] for k in keys if k in s}} for label, s in scores.items()]


def _loss_curve(history: list[dict[str, float]], path: Path) -> Path:
    """QAT losses (and FID when evaluated) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 3.2))
    for key in ("d_loss", "g_loss"):  # a distillation warm-up logs no d_loss
        logged = [row for row in history if key in row]
        axis.plot([row["step"] for row in logged], [row[key] for row in logged], label=key)
    axis.set_xlabel("QAT step")
    axis.legend()
    fid = [(row["step"], row["fid"]) for row in history if "fid" in row]
    if fid:
        twin = axis.twinx()
        twin.plot([step for step, _ in fid], [value for _, value in fid], "k.--", label="FID")
        twin.set_ylabel("FID")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _validate(cfg: RunConfig) -> tuple[Path, GanConfig, GanConfig]:
    """Everything that can fail on bad input, before any file is written."""
    checkpoint = resolve_checkpoint(cfg.pretrained)
    pretrained = checkpoint_config(checkpoint)
    qcfg = qat_config(cfg, pretrained, checkpoint)
    build_networks(qcfg)
    from lowbit.data.paired import target_domain

    metrics.resolve_extractor(target_domain(pretrained.data.dataset) or pretrained.data.dataset)
    check_selection_held_out(cfg)
    return checkpoint, pretrained, qcfg


def check_selection_held_out(cfg: RunConfig) -> None:
    """Refuse a model selection that would use the final evaluation's latents or reference images."""
    select, final_split = cfg.qat.select, cfg.eval.split or "train"
    if select.enabled and (select.seed == cfg.eval.seed or select.split == final_split):
        raise ConfigError(
            f"qat.select must be held out from the final evaluation (latent seed {cfg.eval.seed}, split "
            f"{final_split}): got seed {select.seed}, split {select.split}; choose another seed and split"
        )


def _fid_curve(cfg: RunConfig, dataset: str, progress: bool) -> Callable[[nn.Module, int], dict[str, float]]:
    """The QAT evaluator: FID and IS (and PSNR) of ``qat.eval_samples`` images (the curve in the report)."""

    def curve(generator: nn.Module, step: int) -> dict[str, float]:
        scores = _score(generator, dataset, cfg.qat.eval_samples, cfg.eval, progress)
        return {k: scores[k] for k in ("fid", "is", "psnr") if k in scores}

    return curve


def _weight_analysis(
    cfg: RunConfig, qat: TrainResult, q_generator: nn.Module, out: Path
) -> tuple[dict[str, Path | None], list[dict[str, Any]]]:
    """Histograms (latent FP vs quantized weights) and utilisation/entropy rows of each quantized network."""
    networks = {"generator": q_generator}
    if cfg.discriminator_quant is not None:
        networks["discriminator"] = load_discriminator(qat.model_path)
    histograms, rows = {}, []
    for role, model in networks.items():
        histograms[role] = metrics.plot_weight_histograms(
            model, out / f"weights_{role}.png", f"{role}: latent FP vs quantized weights"
        )
        rows += [{"network": role, **row} for row in metrics.weight_stats(model)]
    return histograms, rows


@locks_run_dir(lambda args: output_dir(args["cfg"]))
def run_pipeline(cfg: RunConfig, progress: bool = True) -> RunResult:
    """The whole main job; returns where the report is and the numbers in it."""
    out = output_dir(cfg)
    checkpoint, pretrained, qcfg = _validate(cfg)
    dataset = pretrained.data.dataset
    fp_generator = load_generator(checkpoint)
    curve = _fid_curve(cfg, dataset, progress) if cfg.qat.eval_every else None
    qat = _train(qcfg)(qcfg, out / "qat", evaluator=curve, overwrite=True, progress=progress)
    q_generator = load_generator(qat.model_path)
    pairs = (("full precision", "fp", fp_generator), ("quantized", "quantized", q_generator))
    scores = {label: _score(g, dataset, cfg.eval.samples, cfg.eval, progress) for label, _, g in pairs}
    if qat.last_model_path is not None:  # selection restored an earlier generator: score the last step too
        last = load_generator(qat.last_model_path)
        scores["quantized (last step)"] = _score(last, dataset, cfg.eval.samples, cfg.eval, progress)
    if isinstance(pretrained, I2IConfig):
        z, targets = lowbit_data.load_pairs(dataset, "test", pretrained.data.root, limit=GRID_PAIRS)
        images = {"input | FP | quantized | target": comparison_grid([fp_generator, q_generator], z, targets,
                                                                     out / "samples_compare.png")}
    else:
        z = torch.randn(GRID, fp_generator.latent_dim, generator=torch.Generator().manual_seed(cfg.eval.seed))
        images = {label: _save_grid(g, z, out / f"samples_{tag}.png") for label, tag, g in pairs}
    images["QAT curves"] = _loss_curve(qat.history, out / "qat_curves.png")
    histograms, weight_rows = _weight_analysis(cfg, qat, q_generator, out)
    packed = _export(q_generator, out / "generator.lowbit.safetensors") if cfg.export else None
    results = {
        "name": cfg.name,
        "pretrained": str(checkpoint),
        "dataset": dataset,
        "scores": scores,
        "compression": _compression_rows(fp_generator, q_generator, z, packed),
        "weights": weight_rows,
        "qat_history": qat.history,
        "packed": str(packed) if packed else None,
        "selection": selection_summary(cfg, qat),
        "config": to_dict(cfg),
        "qat_config": to_dict(qcfg),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    images.update({f"weights ({k})": v for k, v in histograms.items() if v is not None})
    report = _write_report(cfg, out, results, images)
    return RunResult(report=report, results=results, qat=qat, packed=packed)


def selection_summary(cfg: RunConfig, qat: TrainResult) -> dict[str, Any] | None:
    """The QAT step model selection kept, its validation FID and how it was measured (None: off)."""
    if not qat.selected:
        return None
    spec = cfg.qat.select
    return {**qat.selected, "steps": cfg.qat.steps, "samples": spec.samples, "split": spec.split,
            "seed": spec.seed}


def _write_report(cfg: RunConfig, out: Path, results: dict[str, Any], images: dict[str, Path]) -> Path:
    report = HtmlReport(f"lowbit run: {cfg.name}")
    report.paragraph(
        f"Pretrained full-precision GAN {results['pretrained']} ({results['dataset']}), "
        f"converted and fine-tuned quantization-aware for {cfg.qat.steps} steps."
    )
    report.table(_spec_rows(cfg))
    report.heading("Scores: full precision vs quantized (same n, latents or test inputs, and extractor)")
    report.table(_score_rows(results["scores"]))
    if results["selection"]:
        report.paragraph(selection_line(results["selection"]))
    report.heading("Compression (seed 004 §2: FLOPs, BOPs = FLOPs x wbits x abits, size, ratios)")
    report.table(results["compression"])
    if results["packed"]:
        report.paragraph(f"Packed generator: {results['packed']}")
    report.heading("Quantized layers: state utilisation and code entropy")
    report.table(results["weights"])
    report.heading("Images")
    for caption, path in images.items():
        report.image(path, caption=caption)
    return report.save(out / "report.html")


def _spec_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    def describe(spec: QuantSpec | None) -> str:
        if spec is None:
            return "full precision"
        weights = f"W{spec.weight_bits} {spec.weight}" if spec.quantizes_weights else "W32"
        acts = f"A{spec.act_bits} {spec.act}" if spec.quantizes_acts else "A32"
        kept = f", kept FP: {', '.join(spec.keep_full_precision)}" if spec.keep_full_precision else ""
        rprelu = ", RPReLU before each quantized activation" if spec.rprelu else ""
        layers = "".join(f"; layer {pattern}: {settings}" for pattern, settings in spec.overrides.items())
        return f"{weights} / {acts}{rprelu}{kept}{layers}"

    return [
        {"network": "generator", "quantization": describe(cfg.generator_quant)},
        {"network": "discriminator", "quantization": describe(cfg.discriminator_quant)},
    ]
