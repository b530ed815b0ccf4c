"""Built-in trial functions: ``gan`` (QAT fine-tune or train a GAN, then score it with FID/IS) and
``classifier`` (train / fine-tune a CNN classifier, report its test accuracy).

A ``gan`` trial config is ``{train: <GanConfig mapping>, eval: {...}}``. The trial scores the
quantized model before the first step (the start of its training curve), during training every
``train.eval_every`` steps and at the end, and - once per checkpoint, cached - the full-precision
``train.init_from`` generator as the reference level of the training-state rule. It leaves the
last sample grid and FP-vs-quantized weight histograms of G and D for the report.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.config import from_dict, to_dict
from lowbit.io import atomic_write_text, cache_dir, sha256_file
from lowbit.studies.search import LayerCost


@dataclasses.dataclass
class EvalSpec:
    """How a GAN trial is scored: reference dataset and sample count of FID/IS, which extra scores to take."""

    dataset: str = "mnist"
    split: str = "train"
    n: int = 5000
    batch: int = 500
    initial: bool = True
    reference: bool = True


@dataclasses.dataclass
class GanTrialConfig:
    """A GAN trial: the training config (``lowbit.train.gan.GanConfig`` fields) and its evaluation."""

    train: dict[str, Any]
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    histograms: bool = True


def _scores(generator: nn.Module, spec: EvalSpec) -> dict[str, float]:
    """FID / IS (and whatever numeric scores lowbit.metrics.evaluate reports) of ``generator``."""
    from lowbit.metrics import evaluate

    result = evaluate(generator, spec.dataset, n=spec.n, batch=spec.batch, split=spec.split)
    return {k: float(v) for k, v in result.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


def _reference_scores(checkpoint: str, spec: EvalSpec) -> dict[str, float]:
    """Scores of a full-precision checkpoint's generator, cached by file hash and evaluation spec."""
    from lowbit.train.networks import load_generator, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    identity = f"{sha256_file(path)}{json.dumps(to_dict(spec), sort_keys=True)}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    cached = cache_dir() / "studies" / f"reference-{key[:20]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    scores = _scores(load_generator(path), spec)
    atomic_write_text(cached, json.dumps(scores))
    return scores


def _histograms(model_path: Path, out_dir: Path) -> dict[str, str]:
    """FP-vs-quantized weight histograms of the trained G and D (seed 001 Fig. 1/3), by artifact name."""
    from lowbit.metrics import plot_weight_histograms
    from lowbit.train.networks import load_discriminator, load_generator

    artifacts = {}
    for role, model in (("G", load_generator(model_path)), ("D", load_discriminator(model_path))):
        name = f"histograms_{role.lower()}.png"
        title = f"{role} weights: full precision vs quantized"
        if plot_weight_histograms(model, out_dir / name, title=title):
            artifacts[f"{role} weights"] = name
    return artifacts


def _costs(model_path: Path) -> dict[str, float]:
    """Parameters, FLOPs, BOPs and stored bytes of the trained generator (seed 004 §2; sparse layers at their
    packed size), so a study can draw quality against cost."""
    from lowbit.metrics import compression_report
    from lowbit.nn.inputs import default_example
    from lowbit.train.networks import load_generator

    generator = load_generator(model_path)
    report = compression_report(generator, default_example(generator))
    return {"params": report.params, "flops": report.flops, "bops": report.bops, "bytes": report.size_bytes}


def _final_scores(result: Any, last: dict[str, Any], spec: EvalSpec) -> dict[str, Any]:
    """The trial's scores: the last step's row, or with model selection (``train.select``) the selected
    generator's scores (the model file's), the last step's beside them as ``<score>_last``."""
    scores = {k: v for k, v in last.items() if k != "step"}
    if not result.selected:
        return scores
    selected = _scores(result.generator.eval(), spec)
    return {**scores, **selected, **{f"{k}_last": scores[k] for k in selected if k in scores},
            "selected_step": result.selected["step"], "val_fid": result.selected["val_fid"]}


def gan_trial(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train / fine-tune the GAN of ``config['train']`` in ``out_dir/run`` and score it (FID, IS)."""
    from lowbit.train.gan import GanConfig, teacher_source, train_gan
    from lowbit.train.networks import build_networks

    trial = from_dict(GanTrialConfig, config)
    cfg = from_dict(GanConfig, trial.train, where="train")
    history: list[dict[str, Any]] = []
    if trial.eval.initial:
        torch.manual_seed(cfg.seed)  # the same start train_gan builds
        generator, _ = build_networks(cfg)
        history.append({"step": 0, **_scores(generator.eval(), trial.eval)})
    run_dir = out_dir / "run"
    resume = (run_dir / "checkpoints" / "last.safetensors").is_file()
    result = train_gan(cfg, run_dir, evaluator=lambda g, step: _scores(g, trial.eval), resume=resume,
                       progress=False)
    history += result.history
    metrics = _final_scores(result, history[-1], trial.eval)
    metrics["steps"] = cfg.steps
    fp = teacher_source(cfg)  # the FP generator the trial compresses: its teacher (default init_from)
    reference = _reference_scores(fp, trial.eval) if fp and trial.eval.reference else {}
    metrics.update({f"{k}_fp": v for k, v in reference.items() if k in ("fid", "is")})
    metrics.update(_costs(result.model_path))
    artifacts = _histograms(result.model_path, out_dir) if trial.histograms else {}
    artifacts["model"] = str(result.model_path.relative_to(out_dir))
    if result.samples is not None:
        artifacts["samples"] = str(result.samples.relative_to(out_dir))
    return {**metrics, "history": history, "reference": reference, "artifacts": artifacts}


def classifier_trial(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train the classifier of ``config`` (``ClassifierConfig`` fields) in ``out_dir/run``.

    Returns the run's final metrics and its per-epoch history (``step`` = epoch), resuming a
    killed run from its last checkpoint.
    """
    from lowbit.train.classifier import ClassifierConfig, train_classifier

    cfg = from_dict(ClassifierConfig, config)
    run_dir = out_dir / "run"
    resume = (run_dir / "checkpoints" / "last.safetensors").is_file()
    metrics = train_classifier(cfg, run_dir, resume=resume, progress=False)
    with open(run_dir / "log.csv", newline="") as handle:
        history = [{("step" if k == "epoch" else k): float(v) for k, v in row.items()}
                   for row in csv.DictReader(handle)]
    return {**metrics, "history": history}


def generator_layers(config: dict[str, Any]) -> list[LayerCost]:
    """Weight count, FLOPs and input-activation bits of each weight layer of a ``gan`` trial's generator.

    FLOPs and activation bits come from ``lowbit.metrics.compression_report`` (SPEC §5 conventions).
    """
    from lowbit.metrics import compression_report
    from lowbit.models import create_model
    from lowbit.train.gan import GanConfig
    from lowbit.train.networks import quantize_network

    spec = from_dict(GanConfig, from_dict(GanTrialConfig, config).train, where="train").generator
    generator = quantize_network(create_model(spec.model, **spec.kwargs), spec)
    modules = dict(generator.named_modules())
    report = compression_report(generator, torch.zeros(1, generator.latent_dim))
    return [LayerCost(layer.name, modules[layer.name].weight.numel(), layer.flops, layer.act_bits)
            for layer in report.layers]
