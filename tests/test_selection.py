"""Model selection on a validation score (``select``): the restored generator, resume, real FID, bad input."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.metrics import evaluate
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.gan import GanConfig, GanTask, train_gan, train_task
from lowbit.train.i2i import I2IConfig
from lowbit.train.loop import ResumeMismatchError
from lowbit.train.selection import SelectSpec
from tiny_gan import tiny_gan

TRAIN_STEP = GanTask.step


class Killed(Exception):
    """The run was killed (stands in for a crash or SIGKILL between checkpoints)."""


class Recorder:
    """Installs a hook after every GAN step: keeps a copy of the sampled generator's state per step, and
    a scripted validation score per step (a stand-in for the FID whose minimum the test chooses)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, scores: dict[int, float], stop_at: int = 0) -> None:
        self.scores, self.stop_at, self.step = scores, stop_at, 0
        self.states: dict[int, dict[str, torch.Tensor]] = {}

        def step(task: GanTask, step: int) -> dict[str, float]:
            if step == self.stop_at:
                raise Killed  # the run dies before this step
            losses = TRAIN_STEP(task, step)
            self.step = step
            self.states[step] = {k: v.clone() for k, v in task.sampler.state_dict().items()}
            return losses

        monkeypatch.setattr(GanTask, "step", step)

    def validator(self, model: torch.nn.Module) -> float:
        assert not model.training  # scored in eval mode
        return self.scores[self.step]


#: scripted validation scores: validated at 4, 6, 8 (every 2 from step 3 on), best at step 4
SCORES = {4: 1.0, 6: 3.0, 8: 2.0}


def selecting(**changes) -> GanConfig:
    """The tiny digits GAN, 8 steps, validated every 2 steps from step 3 on, checkpoints every 3 steps."""
    base = {"steps": 8, "log_every": 4, "checkpoint_every": 3,
            "select": {"every": 2, "after": 3, "samples": 100}}
    return from_dict(GanConfig, tiny_gan(**{**base, **changes}))


def train(cfg: GanConfig, out, recorder: Recorder, resume: bool = False):
    return train_task(GanTask, cfg, out, None, resume, False, False, recorder.validator)


def assert_same_generator(path, state: dict[str, torch.Tensor]) -> None:
    saved = load_checkpoint(path)["generator"]
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_the_restored_generator_is_the_selected_steps_state_bit_for_bit(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, SCORES)
    result = train(selecting(), tmp_path / "run", recorder)
    assert result.selected == {"step": 4, "val_fid": 1.0}
    assert [(row["step"], row.get("val_fid")) for row in result.history] == [(4, 1.0), (6, 3.0), (8, 2.0)]
    assert_same_generator(result.model_path, recorder.states[4])  # whole state_dict: weights and BN buffers
    assert_same_generator(tmp_path / "run" / "model_last.safetensors", recorder.states[8])
    assert all(torch.equal(v, recorder.states[4][k]) for k, v in result.generator.state_dict().items())
    kept = load_checkpoint(result.checkpoint_path)  # the resumable checkpoint keeps training the last step
    assert kept["selection"]["step"] == 4 and torch.equal(kept["generator"]["0.weight"],
                                                          recorder.states[8]["0.weight"])


def test_selection_survives_a_killed_run_and_resume(tmp_path, monkeypatch):
    whole = train(selecting(), tmp_path / "whole", Recorder(monkeypatch, SCORES))
    with pytest.raises(Killed):  # killed at step 7: the step-6 checkpoint holds the step-4 pick
        train(selecting(), tmp_path / "cut", Recorder(monkeypatch, SCORES, stop_at=7))
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors")["selection"]["step"] == 4
    resumed = train(selecting(), tmp_path / "cut", Recorder(monkeypatch, SCORES), resume=True)
    assert resumed.selected == whole.selected and resumed.history == whole.history
    for name in ("model.safetensors", "model_last.safetensors"):
        whole_state = load_checkpoint(tmp_path / "whole" / name)["generator"]
        assert_same_generator(tmp_path / "cut" / name, whole_state)


def test_a_changed_select_is_not_resumable(tmp_path, monkeypatch):
    train(selecting(steps=6), tmp_path / "run", Recorder(monkeypatch, SCORES))
    with pytest.raises(ResumeMismatchError, match="select"):
        train(selecting(select={"every": 3, "samples": 100}), tmp_path / "run", Recorder(monkeypatch, SCORES),
              resume=True)


def test_the_real_validation_fid_is_held_out_and_picks_the_lowest(tmp_path):
    """A noise GAN's validation FID: samples from latent seed 1 against MNIST test (final evaluation: seed 0,
    train); the restored generator is the one with the lowest logged score."""
    cfg = from_dict(GanConfig, {
        "name": "tiny-mnist", "data": {"dataset": "mnist", "limit": 256}, "steps": 6, "batch_size": 32,
        "generator": {"model": "dcgan-g-28", "kwargs": {"width": 4}},
        "discriminator": {"model": "dcgan-d-28", "kwargs": {"width": 4}},
        "log_every": 3, "sample_every": 6, "checkpoint_every": 6, "select": {"every": 2, "samples": 100}})
    result = train_gan(cfg, tmp_path / "run", progress=False)
    logged = {int(row["step"]): row["val_fid"] for row in result.history if "val_fid" in row}
    assert sorted(logged) == [2, 4, 6] and result.selected["val_fid"] == min(logged.values())
    assert result.selected["step"] == min(logged, key=logged.get)
    held_out = evaluate(result.generator, "mnist", n=100, batch=100, seed=1, split="test", progress=False)
    assert held_out["fid"] == pytest.approx(result.selected["val_fid"], rel=1e-9)


@pytest.mark.parametrize("select,message", [
    ({"every": -1}, r"'every' \(0 = off"),
    ({"every": 10, "samples": 50}, "needs >= 100 images"),
    ({"every": 10, "split": "val"}, "unknown split 'val'"),
])
def test_bad_select_values_are_clear_errors(select, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SelectSpec, select)


def test_select_refused_where_there_is_no_held_out_fid(tmp_path):
    with pytest.raises(ConfigError, match="paired dataset has no held-out split"):
        from_dict(I2IConfig, {"select": {"every": 10}})
    with pytest.raises(ConfigError, match="data.options"):  # digits at 16x16: the FID reads 8x8 digits
        train_gan(selecting(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
