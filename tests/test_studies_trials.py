"""Built-in trials: ``gan`` on 16x16 digits with a mocked evaluator, ``classifier`` on digits; layer costs."""

from __future__ import annotations

import pytest
import torch

import lowbit.metrics
import lowbit.train.gan
from lowbit.config import from_dict
from lowbit.studies.trials import classifier_trial, gan_trial, generator_layers
from lowbit.train.gan import GanConfig
from lowbit.train.networks import build_networks, load_generator

TRAIN = {
    "name": "tiny",
    "data": {"dataset": "digits", "options": {"size": 16}},
    "generator": {"model": "dcgan-g-16", "kwargs": {"width": 8, "latent_dim": 16},
                  "quant": {"weight": "minmax", "weight_bits": 2, "act": "sign", "act_bits": 1}},
    "discriminator": {"model": "dcgan-d-16", "kwargs": {"width": 8},
                      "quant": {"weight": "minmax", "weight_bits": 4}},
    "steps": 6, "batch_size": 32, "log_every": 2, "eval_every": 3, "sample_every": 6, "checkpoint_every": 6,
}


def fake_evaluate(generator, dataset, n, batch, split="train"):
    """A mocked FID/IS: distance of the mean sample to 0.5 and the samples' spread, on fixed noise."""
    noise = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        images = generator(noise)
    return {"fid": float((images.mean() - 0.5).abs() * 100), "is": float(1 + images.std()),
            "extractor": "mock"}


def test_gan_trial_scores_the_start_the_curve_and_leaves_artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(lowbit.metrics, "evaluate", fake_evaluate, raising=False)
    torch.set_num_threads(1)
    config = {"train": TRAIN, "eval": {"dataset": "digits", "n": 64, "batch": 64}}
    result = gan_trial(config, tmp_path)

    torch.manual_seed(0)
    start, _ = build_networks(from_dict(GanConfig, TRAIN))
    expected = fake_evaluate(start.eval(), "digits", 64, 64)
    del expected["extractor"]  # only numeric scores enter the history
    assert result["history"][0] == {"step": 0, **expected}
    scored = [row["step"] for row in result["history"] if "fid" in row]
    assert scored == [0, 3, 6]
    assert result["fid"] == result["history"][-1]["fid"] and result["steps"] == 6
    assert result["reference"] == {}  # no init_from: nothing to compare with
    assert sorted(result["artifacts"]) == ["D weights", "G weights", "model", "samples"]
    for name, path in result["artifacts"].items():
        if name != "model":
            assert (tmp_path / path).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / result["artifacts"]["model"]).name == "model.safetensors"


def test_gan_trial_with_model_selection_scores_the_selected_generator(tmp_path, monkeypatch):
    """With ``train.select`` the trial's FID is the model file's (the selected step's), not the last step's
    (which the loop scored before restoring); the last step's stays beside it as ``fid_last``."""
    monkeypatch.setattr(lowbit.metrics, "evaluate", fake_evaluate, raising=False)
    scripted = iter([3.0, 1.0, 2.0])  # validated at steps 2, 4, 6: step 4 is the pick
    monkeypatch.setattr(lowbit.train.gan, "validation_fid", lambda cfg: lambda model: next(scripted))
    torch.set_num_threads(1)
    train = {**TRAIN, "select": {"every": 2, "after": 1, "samples": 100}}
    result = gan_trial({"train": train, "eval": {"dataset": "digits", "n": 64, "batch": 64}}, tmp_path)

    def scored(name: str) -> float:
        return fake_evaluate(load_generator(tmp_path / "run" / name).eval(), "digits", 64, 64)["fid"]

    assert result["selected_step"] == 4 and result["val_fid"] == 1.0
    assert result["fid"] == scored("model.safetensors")
    assert result["fid_last"] == scored("model_last.safetensors") == result["history"][-1]["fid"]
    assert result["fid"] != result["fid_last"]


def test_generator_layers_count_weights_flops_and_input_bits():
    layers = generator_layers({"train": TRAIN})
    generator, _ = build_networks(from_dict(GanConfig, TRAIN))
    convs = [(n, m) for n, m in generator.named_modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [layer.name for layer in layers] == [n for n, _ in convs]
    assert [layer.params for layer in layers] == [m.weight.numel() for _, m in convs]
    assert [layer.act_bits for layer in layers] == [32] + [1] * (len(convs) - 1)
    first = convs[0][1]  # latent (1x1) -> k x k output; SPEC §5: 2*H*W*(Cin*k^2+1)*Cout on the output
    k = first.kernel_size[0]
    assert (first.stride[0], first.padding[0]) == (1, 0)
    assert layers[0].flops == 2 * k * k * (first.in_channels * k * k + 1) * first.out_channels


@pytest.mark.parametrize("bad", [{"train": {"stepz": 3}}, {"train": {}, "evl": {}}])
def test_gan_trial_config_errors_name_the_key(tmp_path, bad):
    with pytest.raises(ValueError, match="did you mean"):
        gan_trial(bad, tmp_path)


def test_classifier_trial_reports_accuracy_and_epoch_history(tmp_path):
    config = {"name": "digits-bwn", "model": "lenet", "epochs": 2, "batch_size": 64,
              "data": {"dataset": "digits", "limit": 300, "test_limit": 100, "pad_to": 28,
                       "options": {"size": 16}},
              "quant": {"weight": "bwn", "weight_bits": 1}}
    result = classifier_trial(config, tmp_path)
    assert [row["step"] for row in result["history"]] == [1.0, 2.0]
    assert result["top1"] == result["history"][-1]["top1"]
    assert result["method"] == "bwn w1" and result["n_test"] == 100
    assert (tmp_path / "run" / "model.safetensors").is_file()
