"""Two-stage compression (issue 15): a pruned full-precision GAN checkpoint as ``init_from`` of a QAT run that
repeats its transforms and adds quantization, a distillation ``teacher`` other than ``init_from``, and named
gan-trial studies chaining the stages with ``@`` references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.config import from_dict
from lowbit.errors import CheckpointError, ConfigError
from lowbit.nn import sparsity_of
from lowbit.studies import StudyConfig
from lowbit.studies.named import dependency_waves, expand_named, named_trial
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.gan import GanConfig, teacher_of, train_gan
from lowbit.train.networks import build_networks, load_generator
from tiny_gan import tiny_gan

# 16-pixel generator: 0 ConvT, 1 BN, 2 ReLU, 3 ConvT, 4 BN, 5 ReLU, 6 ConvT (output), 7 Tanh
PRUNE = [{"type": "prune", "kind": "channels", "criterion": "l1", "ratio": 0.5},
         {"type": "prune", "kind": "unstructured", "ratio": 0.6, "layers": ["0"]}]
QUANT = {"weight": "dorefa", "weight_bits": 4, "act": "act", "act_bits": 1, "keep_full_precision": ["6"]}


def _config(transforms: list, quant: dict | None = None, **changes) -> GanConfig:
    data = tiny_gan(**changes)
    data["generator"] = {**data["generator"], "transforms": transforms, "quant": quant}
    return from_dict(GanConfig, data)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """Stage 1: the tiny FP generator pruned (half its hidden channels, layer 0 60% sparse), trained FP."""
    fp = train_gan(from_dict(GanConfig, tiny_gan(steps=4)), tmp_path_factory.mktemp("fp") / "run",
                   progress=False).model_path
    return train_gan(_config(PRUNE, init_from=str(fp), distill=1.0, steps=6),
                     tmp_path_factory.mktemp("s1") / "run", progress=False).model_path


def test_stage_two_reloads_the_pruned_checkpoint_then_quantizes_it(stage1, tmp_path):
    G, D = build_networks(_config(PRUNE, QUANT, init_from=str(stage1)))
    pruned = load_checkpoint(stage1)
    for role, model in (("generator", G), ("discriminator", D)):
        own = model.state_dict()
        for key, value in pruned[role].items():  # every stage-1 tensor (weights, masks, BN) carried over
            assert torch.equal(own[key], value), (role, key)
    assert type(G[0]).__name__ == "QuantConvTranspose2d" and type(G[6]).__name__ == "ConvTranspose2d"
    assert G[0].weight.shape[1] == load_generator(stage1)[0].weight.shape[1] == 8  # 16 -> 8 channels
    assert sparsity_of(G) == pytest.approx(0.6, abs=1e-3)
    stage2 = train_gan(_config(PRUNE, QUANT, init_from=str(stage1), distill=1.0, distill_warmup=2, steps=4),
                       tmp_path / "s2", progress=False)
    final = load_generator(stage2.model_path)
    assert torch.count_nonzero(final[0].weight[final[0].weight_mask == 0]) == 0  # masks held through QAT
    assert final(torch.randn(2, 16)).shape == (2, 1, 16, 16)


def test_stage_two_must_repeat_the_stage_one_transforms(stage1):
    with pytest.raises(CheckpointError, match="do not start with them; copy that run's generator"):
        build_networks(_config(PRUNE[:1], QUANT, init_from=str(stage1)))
    with pytest.raises(CheckpointError, match="do not start with them"):
        build_networks(_config([], QUANT, init_from=str(stage1)))


def test_teacher_defaults_to_init_from_and_may_name_another_checkpoint(stage1, tmp_path):
    fp = load_checkpoint(stage1)["config"]["init_from"]
    assert teacher_of(_config(PRUNE, QUANT, init_from=str(stage1), distill=1.0))[0].out_channels == 8
    teacher = teacher_of(_config(PRUNE, QUANT, init_from=str(stage1), teacher=fp, distill=1.0))
    assert teacher[0].out_channels == 16  # the unpruned FP generator
    assert teacher_of(_config([], teacher=fp, distill=1.0)) is not None  # a teacher alone is enough
    with pytest.raises(ConfigError, match="needs init_from"):
        _config([], distill=1.0)


def test_named_gan_trials_chain_stages_through_init_from_and_teacher(tmp_path):
    base = {"train": tiny_gan(init_from="fp.safetensors", distill=1.0), "eval": {"n": 100}}
    study = from_dict(StudyConfig, {
        "name": "two", "trial": "gan", "base": base, "seeds": [3],
        "trials": {"s1": {}, "s2": {"train": {"init_from": "@s1", "teacher": "@s1"}},
                   "s2-fp": {"train": {"init_from": "@s1"}}}})
    trial = named_trial(study, "s2", 3, tmp_path)
    model = str(tmp_path / "trials" / "s1-s3" / "run" / "model.safetensors")
    assert trial.config["train"]["init_from"] == trial.config["train"]["teacher"] == model
    assert trial.config["train"]["seed"] == 3 and trial.config["train"]["name"] == "s2-s3"
    assert trial.after == ("s1-s3",) and "seed" not in trial.config
    assert named_trial(study, "s2-fp", 3, tmp_path).config["train"].get("teacher") is None
    assert study.base["train"]["name"] == "tiny"  # the base stays untouched
    waves = dependency_waves(expand_named(study, tmp_path))
    assert [[t.id for t in wave] for wave in waves] == [["s1-s3"], ["s2-s3", "s2-fp-s3"]]
    broken = from_dict(StudyConfig, {"name": "x", "trial": "gan", "base": base,
                                     "trials": {"a": {"train": {"teacher": "@s0"}}}})
    with pytest.raises(ConfigError, match="teacher '@s0' names no trial"):
        named_trial(broken, "a", 0, tmp_path)
