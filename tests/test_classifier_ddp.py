"""Classifier training data-parallel through the shared loop: ``lowbit train-classifier --nproc 2`` (two gloo
ranks under torchrun) against one process on the same global batches, and resume of a two-rank run."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from lowbit import cli
from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.classifier import ClassifierConfig, check_shards, train_classifier

#: the 8x8 extractor on sklearn digits, Adam, 64 images per global batch
CONFIG = {"name": "ddp", "model": "extractor-8", "kwargs": {"feature_dim": 16},
          "data": {"dataset": "digits", "limit": 600},
          "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
          "epochs": 2, "batch_size": 64, "seed": 1}
#: each rank's BatchNorm normalises its half of the batch, so two ranks follow one process to within 1%
#: (the loss itself falls by more than 30% per epoch)
TOLERANCE = 0.01


def _log(run) -> list[dict[str, float]]:
    with open(run / "log.csv") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_two_ranks_resume_a_run_and_train_like_one_process(tmp_path):
    """Epoch 1 in one process, then ``--resume --nproc 2`` for epoch 2 (one torchrun launch keeps this
    fast): the resumed history is kept, epoch 2 matches the one-process run within TOLERANCE."""
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    one = train_classifier(from_dict(ClassifierConfig, CONFIG), tmp_path / "one", progress=False)
    two = tmp_path / "two"
    train_classifier(from_dict(ClassifierConfig, {**CONFIG, "epochs": 1}), two, progress=False)
    first = _log(two)
    argv = ["train-classifier", str(config), "--out", str(two), "--nproc", "2", "--quiet", "--resume"]
    assert cli.main(argv) == 0
    one_log, two_log = _log(tmp_path / "one"), _log(two)
    assert two_log[:1] == first and [row["epoch"] for row in two_log] == [1, 2]
    assert one_log[1]["train_loss"] < 0.7 * one_log[0]["train_loss"]
    for key in ("train_loss", "test_loss", "top1"):
        assert two_log[1][key] == pytest.approx(one_log[1][key], rel=TOLERANCE), key
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["top1"] == pytest.approx(one["top1"], rel=TOLERANCE)
    state = load_checkpoint(two / "checkpoints" / "last.safetensors")
    assert state["step"] == 2 and not any(k.startswith("module.") for k in state["model"])


def test_batches_that_do_not_split_over_the_ranks_are_refused():
    check_shards(600, 64, 2)  # 9 full batches and one of 24: every rank gets images
    with pytest.raises(ConfigError, match="batch_size 63 does not split over 2 processes"):
        check_shards(600, 63, 2)
    with pytest.raises(ConfigError, match="last batch of each epoch holds 1 of 577 images"):
        check_shards(577, 64, 2)


def test_logit_distillation_under_two_ranks_trains_like_one_process(tmp_path):
    """The distillation term is scaled per rank like the hard-label loss, so two ranks follow one process."""
    teacher = tmp_path / "teacher"
    train_classifier(from_dict(ClassifierConfig, {**CONFIG, "epochs": 1, "kwargs": {"feature_dim": 32}}),
                     teacher, progress=False)
    student = {**CONFIG, "epochs": 1, "distill": 2.0, "teacher": str(teacher / "model.safetensors")}
    train_classifier(from_dict(ClassifierConfig, student), tmp_path / "one", progress=False)
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump(student))
    assert cli.main(["train-classifier", str(config), "--out", str(tmp_path / "two"), "--nproc", "2",
                     "--quiet"]) == 0
    train_classifier(from_dict(ClassifierConfig, {**CONFIG, "epochs": 1}), tmp_path / "plain", progress=False)
    one, two, plain = (_log(tmp_path / run)[0]["train_loss"] for run in ("one", "two", "plain"))
    assert abs(one - plain) > 5 * TOLERANCE * plain  # the term moves the run: ranks ignoring it would fail
    assert two == pytest.approx(one, rel=TOLERANCE)
