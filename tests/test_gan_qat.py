"""Quantization-aware fine-tuning: what gets quantized, starting weights, resume, bad quant specs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lowbit.cli import main
from lowbit.config import from_dict
from lowbit.nn import FrozenAct, FrozenLayer, QuantAct, freeze
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.gan import GanConfig, train_gan
from lowbit.train.networks import build_networks, load_discriminator, load_generator
from tiny_gan import tiny_gan

BASE = tiny_gan(sample_every=20)
# 16-pixel generator: 0 ConvT, 1 BN, 2 ReLU, 3 ConvT, 4 BN, 5 ReLU, 6 ConvT (output), 7 Tanh
G_SPEC = {"weight": "dorefa", "weight_bits": 2, "act": "sign", "act_bits": 1, "keep_full_precision": ["6"]}
D_SPEC = {"weight": "em", "weight_bits": 2, "overrides": {"0": {"weight_bits": 3}}}


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory) -> Path:
    """A full-precision tiny DCGAN to fine-tune."""
    out = tmp_path_factory.mktemp("fp") / "run"
    return train_gan(from_dict(GanConfig, BASE), out, progress=False).model_path


def qat_config(fp_checkpoint: Path, g_quant=None, d_quant=None, **changes) -> GanConfig:
    data = {**BASE, "init_from": str(fp_checkpoint), **changes}
    data["generator"] = {**BASE["generator"], "quant": g_quant}
    data["discriminator"] = {**BASE["discriminator"], "quant": d_quant}
    return from_dict(GanConfig, data)


def _weight_types(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_children()}


@pytest.mark.parametrize("quantize", ["generator", "discriminator", "both"])
def test_qat_converts_exactly_what_the_spec_names(fp_checkpoint, tmp_path, quantize):
    g_quant = G_SPEC if quantize in ("generator", "both") else None
    d_quant = D_SPEC if quantize in ("discriminator", "both") else None
    cfg = qat_config(fp_checkpoint, g_quant, d_quant)
    G, D = build_networks(cfg)
    pretrained = load_checkpoint(fp_checkpoint)
    for model, role in ((G, "generator"), (D, "discriminator")):
        for key, value in pretrained[role].items():  # QAT starts from the FP weights
            assert torch.equal(model.state_dict()[key], value), (role, key)
    g_types, d_types = _weight_types(G), _weight_types(D)
    if g_quant:
        assert g_types == {
            "0": "QuantConvTranspose2d",
            "1": "BatchNorm2d",
            "2": "QuantAct",
            "3": "QuantConvTranspose2d",
            "4": "BatchNorm2d",
            "5": "QuantAct",
            "6": "ConvTranspose2d",
            "7": "Tanh",
        }
    else:
        assert "Quant" not in "".join(g_types.values())
    if d_quant:
        assert d_types == {
            "0": "QuantConv2d",
            "1": "LeakyReLU",
            "2": "QuantConv2d",
            "3": "BatchNorm2d",
            "4": "LeakyReLU",
            "5": "QuantConv2d",
        }
    else:
        assert "Quant" not in "".join(d_types.values())

    result = train_gan(cfg, tmp_path / "qat", progress=False)
    G2, D2 = load_generator(result.model_path), load_discriminator(result.model_path)
    assert _weight_types(G2) == g_types and _weight_types(D2) == d_types
    for model, quant in ((G2, g_quant), (D2, d_quant)):
        frozen = freeze(model) if quant else {}
        for entry in frozen.values():
            if isinstance(entry, FrozenLayer):
                bits = 3 if (model is D2 and entry.name == "0") else 2
                assert entry.bits == bits and int(entry.codes.max()) < 2**bits
                rows = entry.dequantize().transpose(0, entry.channel_dim).flatten(1)
                assert max(len(torch.unique(r)) for r in rows) <= 2**bits
            else:
                assert isinstance(entry, FrozenAct) and entry.levels.tolist() == [-1.0, 1.0]
    if g_quant:  # the binary activations really are +-1 inside the quantized generator
        seen = []
        for act in (m for m in G2.modules() if isinstance(m, QuantAct)):
            act.register_forward_hook(lambda mod, inp, out: seen.append(torch.unique(out)))
        with torch.no_grad():
            G2(torch.randn(8, 16))
        assert all(set(values.tolist()) <= {-1.0, 1.0} for values in seen) and len(seen) == 2


def test_qat_resume_reproduces_an_uninterrupted_run(fp_checkpoint, tmp_path):
    full = train_gan(
        qat_config(fp_checkpoint, G_SPEC, D_SPEC, steps=8, checkpoint_every=4, log_every=4),
        tmp_path / "full",
        progress=False,
    )
    train_gan(
        qat_config(fp_checkpoint, G_SPEC, D_SPEC, steps=4, checkpoint_every=4, log_every=4),
        tmp_path / "cut",
        progress=False,
    )
    resumed = train_gan(
        qat_config(fp_checkpoint, G_SPEC, D_SPEC, steps=8, checkpoint_every=4, log_every=4),
        tmp_path / "cut",
        resume=True,
        progress=False,
    )
    assert resumed.history == full.history


def test_init_from_a_quantized_checkpoint_is_refused(fp_checkpoint, tmp_path):
    quantized = train_gan(qat_config(fp_checkpoint, G_SPEC, None, steps=2), tmp_path / "q", progress=False)
    from lowbit.errors import CheckpointError

    with pytest.raises(
        CheckpointError, match="already quantized; start QAT from a full-precision"
    ):
        build_networks(qat_config(quantized.model_path, G_SPEC, None))


@pytest.mark.parametrize(
    "quant,message",
    [
        ({"weight": "dorefa", "weight_bits": 9}, "bits"),
        ({"weight": "dorefa", "weight_bits": 0}, "bits"),
        ({"weight": "dorefaa", "weight_bits": 2}, "did you mean 'dorefa'"),
        ({"weight": "em", "weight_bits": 2, "act": "sgn", "act_bits": 1}, "did you mean 'sign'"),
        (
            {"weight": "em", "wieght_bits": 2},
            "unknown config key 'generator.quant.wieght_bits' (did you mean 'weight_bits'?)",
        ),
    ],
)
def test_bad_quant_spec_is_a_clear_cli_error(fp_checkpoint, tmp_path, capsys, quant, message):
    data = {**BASE, "init_from": str(fp_checkpoint), "generator": {**BASE["generator"], "quant": quant}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_distillation_pulls_the_quantized_generator_towards_the_fp_teacher(fp_checkpoint, tmp_path):
    teacher = load_generator(fp_checkpoint)
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = teacher(z)
    gaps = {}
    for weight in (0.0, 100.0):
        cfg = qat_config(fp_checkpoint, G_SPEC, None, steps=25, distill=weight)
        result = train_gan(cfg, tmp_path / f"d{weight}", progress=False)
        with torch.no_grad():
            gaps[weight] = float((load_generator(result.model_path)(z) - target).abs().mean())
    assert gaps[100.0] < 0.75 * gaps[0.0], gaps


def test_distillation_needs_a_teacher():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="'distill' must be >= 0 and needs init_from"):
        from_dict(GanConfig, {**BASE, "distill": 1.0})


def test_ema_generator_is_the_running_average_of_the_trained_weights(fp_checkpoint, tmp_path, monkeypatch):
    """With ``ema`` on, the saved generator is theta_ema = d·theta_ema + (1-d)·theta after every G step,
    recomputed here from the live weights after each step."""
    from lowbit.train import gan as gan_module

    decay = 0.8
    cfg = qat_config(fp_checkpoint, G_SPEC, None, steps=6, ema=decay)
    start = {n: p.detach().clone() for n, p in build_networks(cfg)[0].named_parameters()}
    expected = dict(start)
    original = gan_module.GanTrainer.g_step

    def g_step_and_track(self, n, gen):
        loss = original(self, n, gen)
        for name, value in gan_module.unwrap(self.G).named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * value.detach()
        return loss

    monkeypatch.setattr(gan_module.GanTrainer, "g_step", g_step_and_track)
    result = train_gan(cfg, tmp_path / "ema", progress=False)
    saved = load_checkpoint(result.model_path)["generator"]
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(expected[n], start[n]) for n in start), "the average never moved"


def test_ema_resume_reproduces_an_uninterrupted_run(fp_checkpoint, tmp_path):
    runs = {}
    for name, steps, resume in (("full", 8, False), ("cut", 4, False), ("cut", 8, True)):
        cfg = qat_config(fp_checkpoint, G_SPEC, None, steps=steps, checkpoint_every=4, log_every=4, ema=0.9)
        runs[name] = train_gan(cfg, tmp_path / name, resume=resume, progress=False)
    assert runs["cut"].history == runs["full"].history
    full = load_checkpoint(runs["full"].model_path)["generator"]
    cut = load_checkpoint(runs["cut"].model_path)["generator"]
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_ema_decay_out_of_range_is_refused():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="'ema' is a decay in"):
        from_dict(GanConfig, {**BASE, "ema": 1.0})


def test_linear_lr_decay_follows_the_step_and_survives_resume(fp_checkpoint, tmp_path, monkeypatch):
    """lr at step s (1-based) is base·(1 - (s-1)/steps) for both players, also after --resume."""
    from lowbit.train import gan as gan_module

    seen: list[tuple[float, float]] = []
    original = gan_module.GanTrainer.g_step

    def record(self, n, gen):
        seen.append((self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]))
        return original(self, n, gen)

    monkeypatch.setattr(gan_module.GanTrainer, "g_step", record)
    steps, base = 8, 2e-4  # the DCGAN default learning rate of both players
    for run_steps, resume in ((4, False), (8, True)):
        cfg = qat_config(fp_checkpoint, G_SPEC, None, steps=steps, checkpoint_every=4, lr_decay="linear")
        cfg = dataclasses.replace(cfg, steps=run_steps) if run_steps != steps else cfg
        train_gan(cfg, tmp_path / "run", resume=resume, progress=False)
    expected_first_half = [base * (1 - (s - 1) / 4) for s in range(1, 5)]
    expected_second_half = [base * (1 - (s - 1) / 8) for s in range(5, 9)]
    assert [g for g, _ in seen] == pytest.approx(expected_first_half + expected_second_half)
    assert [d for _, d in seen] == pytest.approx(expected_first_half + expected_second_half)


def test_unknown_lr_decay_is_refused_with_a_suggestion():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown lr_decay 'linar' \\(did you mean 'linear'\\?\\)"):
        from_dict(GanConfig, {**BASE, "lr_decay": "linar"})


SEARCH_SPEC = {"weight": "search", "weight_bits": 2, "weight_opts": {"mode": "sgt", "logits": "centered"}}


def test_search_sgd_trains_the_logits_with_sgd_and_the_rest_with_adam(fp_checkpoint):
    from lowbit.quant.search import SearchQuantizer
    from lowbit.train.gan import GanTrainer

    cfg = qat_config(fp_checkpoint, SEARCH_SPEC, SEARCH_SPEC, search_sgd={"lr": 0.05, "momentum": 0.8})
    G, D = build_networks(cfg)
    trainer = GanTrainer(cfg, G, D, torch.device("cpu"))
    for model, opt in ((G, trainer.opt_g), (D, trainer.opt_d)):
        logits = {id(m.logits) for m in model.modules() if isinstance(m, SearchQuantizer)}
        adam, sgd = opt.optimizers
        assert isinstance(adam, torch.optim.Adam) and isinstance(sgd, torch.optim.SGD)
        assert {id(p) for g in sgd.param_groups for p in g["params"]} == logits
        assert not logits & {id(p) for g in adam.param_groups for p in g["params"]}
        assert sgd.param_groups[0]["lr"] == 0.05 and sgd.param_groups[0]["momentum"] == 0.8
    before = {n: p.detach().clone() for n, p in G.named_parameters() if n.endswith("logits")}
    trainer.g_step(8, torch.Generator().manual_seed(0))
    moved = [not torch.equal(before[n], p) for n, p in G.named_parameters() if n.endswith("logits")]
    assert any(moved)
    sgd = trainer.opt_g.optimizers[1]
    assert all(sgd.state[p]["momentum_buffer"] is not None for p in sgd.param_groups[0]["params"])


def test_search_sgd_resume_reproduces_an_uninterrupted_run(fp_checkpoint, tmp_path):
    runs = {}
    for name, steps, resume in (("full", 8, False), ("cut", 4, False), ("cut", 8, True)):
        cfg = qat_config(fp_checkpoint, SEARCH_SPEC, SEARCH_SPEC, steps=steps, checkpoint_every=4,
                         log_every=4, search_sgd={"lr": 0.1})
        runs[name] = train_gan(cfg, tmp_path / name, resume=resume, progress=False)
    assert runs["cut"].history == runs["full"].history


def test_search_sgd_out_of_range_is_refused():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="search_sgd: need lr > 0"):
        from_dict(GanConfig, {**BASE, "search_sgd": {"lr": 0.0}})
    with pytest.raises(ConfigError, match="momentum"):
        from_dict(GanConfig, {**BASE, "search_sgd": {"lr": 0.1, "momentum": 1.0}})


W1A1_SPEC = {"weight": "bwn", "weight_bits": 1, "weight_opts": {"scale": "learned"}, "act": "rsign",
             "act_bits": 1, "act_opts": {"grad": "approx"}, "rprelu": True, "keep_full_precision": ["6"]}


def test_w1a1_recipe_trains_with_feature_distillation_and_staged_weights(fp_checkpoint, tmp_path):
    from lowbit.train.gan import GanTrainer

    cfg = qat_config(fp_checkpoint, W1A1_SPEC, steps=6, distill=1.0, distill_features=1.0,
                     weights_from_step=3, sample_every=6, checkpoint_every=6)
    seen: list[bool] = []
    original = GanTrainer.g_step

    def spy(self, n, gen):
        seen.append(self.G[0].weights_quantized)
        return original(self, n, gen)

    GanTrainer.g_step = spy
    try:
        result = train_gan(cfg, tmp_path / "w1a1", progress=False)
    finally:
        GanTrainer.g_step = original
    assert seen == [False, False, False, True, True, True]  # float weights up to step 3, then binary
    G = load_generator(result.model_path)
    assert G[0].weights_quantized and isinstance(G[2][1], QuantAct)
    acts = [f for f in freeze(G).values() if isinstance(f, FrozenAct)]
    assert [a.method for a in acts] == ["rsign", "rsign"] and all(a.shift is not None for a in acts)
    with pytest.raises(Exception, match="distill_features' must be >= 0 and needs init_from"):
        from_dict(GanConfig, {**BASE, "distill_features": 1.0})


def test_channel_pruned_student_distils_features_through_learned_adapters(fp_checkpoint, tmp_path):
    """GAN Compression's 1x1 adapters: a student with half the channels matches the FP teacher's features
    through trained adapters, which a resumed run restores exactly."""
    from lowbit.train.checkpoint import load_checkpoint
    from lowbit.train.distill import FeatureTaps

    def config(steps):
        cfg = qat_config(fp_checkpoint, G_SPEC, steps=steps, distill=1.0, distill_features=1.0,
                         sample_every=8, checkpoint_every=4)
        cfg.generator.transforms = [{"type": "prune", "kind": "channels", "ratio": 0.5}]
        return cfg

    full = train_gan(config(8), tmp_path / "full", progress=False)
    train_gan(config(4), tmp_path / "cut", progress=False)
    resumed = train_gan(config(8), tmp_path / "cut", resume=True, progress=False)
    assert resumed.history[-1] == full.history[-1]
    a, b = load_checkpoint(full.model_path)["generator"], load_checkpoint(resumed.model_path)["generator"]
    assert all(torch.equal(value, b[key]) for key, value in a.items())
    adapters = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors")["distill_adapters"]
    # the teacher has twice the student's channels at every tap
    assert adapters and all(v.shape[0] == 2 * v.shape[1] for v in adapters.values())
    student, teacher = load_generator(full.model_path), load_generator(fp_checkpoint)
    taps = FeatureTaps(student, teacher, torch.randn(2, 16))
    assert set(taps.adapters) == {key.split(".")[0] for key in adapters}


ALL_BINARY = {"weight": "bwn", "weight_bits": 1, "act": "act", "act_bits": 1}


def test_staged_layers_keep_float_weights_in_the_named_layers_only(fp_checkpoint, tmp_path):
    from lowbit.train.gan import GanTrainer

    cfg = qat_config(fp_checkpoint, ALL_BINARY, steps=4, weights_from_step=2, staged_layers=["0", "6"],
                     sample_every=4, checkpoint_every=4)
    seen: list[tuple[bool, bool, bool]] = []
    original = GanTrainer.g_step

    def spy(self, n, gen):
        seen.append(tuple(self.G[i].weights_quantized for i in (0, 3, 6)))
        return original(self, n, gen)

    GanTrainer.g_step = spy
    try:
        train_gan(cfg, tmp_path / "staged", progress=False)
    finally:
        GanTrainer.g_step = original
    hidden_only, every = (False, True, False), (True, True, True)
    assert seen == [hidden_only, hidden_only, every, every]  # 0 and 6 float up to step 2, then binary


def test_staged_layers_are_checked(fp_checkpoint, tmp_path):
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="set weights_from_step > 0 or drop staged_layers"):
        qat_config(fp_checkpoint, ALL_BINARY, staged_layers=["0"])
    cfg = qat_config(fp_checkpoint, ALL_BINARY, weights_from_step=2, staged_layers=["9"])
    with pytest.raises(ConfigError, match="'9' matches no quantized layer; the quantized layers are 0, 3, 6"):
        train_gan(cfg, tmp_path / "typo", progress=False)
    assert not (tmp_path / "typo").exists()


def test_recalibrate_bn_reestimates_the_saved_generator_after_the_last_step(fp_checkpoint, tmp_path):
    from lowbit.train.gan import latent
    from lowbit.train.loop import seeded_generator
    from lowbit.train.recalibrate import batch_norms, recalibrate_batchnorm

    def run(name, batches):
        cfg = qat_config(fp_checkpoint, ALL_BINARY, steps=4, recalibrate_bn=batches, sample_every=4,
                         checkpoint_every=4)
        return train_gan(cfg, tmp_path / name, progress=False)

    plain, recalibrated = run("plain", 0), run("recalibrated", 3)
    assert recalibrated.history == plain.history  # after the last update: training itself is unchanged
    expected, got = load_generator(plain.model_path), load_generator(recalibrated.model_path)
    gen = seeded_generator(0, 4, 0, 0, 1)
    recalibrate_batchnorm(expected, lambda _: latent(BASE["batch_size"], 16, gen, torch.device("cpu")), 3)
    before = load_generator(plain.model_path).state_dict()
    for key, value in got.state_dict().items():
        assert torch.equal(value, expected.state_dict()[key]), key
        if key.endswith("running_mean"):
            assert not torch.equal(value, before[key]), key
    with pytest.raises(Exception, match="'recalibrate_bn' is a number of latent batches"):
        qat_config(fp_checkpoint, ALL_BINARY, recalibrate_bn=-1)
    assert len(batch_norms(got)) == 2


def test_distill_warmup_trains_g_on_the_teacher_alone_and_leaves_d_untouched(fp_checkpoint, tmp_path):
    from lowbit.train.gan import latent
    from lowbit.train.loop import seeded_generator

    cfg = qat_config(fp_checkpoint, ALL_BINARY, steps=3, distill=2.0, distill_warmup=2, log_every=1,
                     sample_every=3, checkpoint_every=3)
    warm = train_gan(dataclasses.replace(cfg, steps=2), tmp_path / "warm", progress=False)
    assert [sorted(row) for row in warm.history] == [["g_loss", "step"]] * 2
    fp_d, fp_g = load_discriminator(fp_checkpoint), load_generator(fp_checkpoint)
    for key, value in load_discriminator(warm.model_path).state_dict().items():
        assert torch.equal(value, fp_d.state_dict()[key]), key  # no D update during the warm-up
    student = build_networks(cfg)[0].train()
    z = latent(BASE["batch_size"], 16, seeded_generator(0, 1, 0, 0), torch.device("cpu"))
    with torch.no_grad():
        expected = 2.0 * (student(z) - fp_g(z)).abs().mean().item()
    assert warm.history[0]["g_loss"] == pytest.approx(expected, rel=1e-5)
    full = train_gan(cfg, tmp_path / "full", progress=False)
    assert "d_loss" in full.history[2] and full.history[:2] == warm.history
    # one row over the warm-up and the first adversarial step: each loss averaged over the steps that had it
    (row,) = train_gan(dataclasses.replace(cfg, log_every=3), tmp_path / "row", progress=False).history
    assert row["d_loss"] == pytest.approx(full.history[2]["d_loss"], rel=1e-6)
    assert row["g_loss"] == pytest.approx(sum(r["g_loss"] for r in full.history) / 3, rel=1e-6)
    with pytest.raises(Exception, match="'distill_warmup' .* needs distill, distill_features or"):
        qat_config(fp_checkpoint, ALL_BINARY, distill_warmup=5)


def _normalised_l1_of_activations(critic: nn.Sequential, student: torch.Tensor, teacher: torch.Tensor):
    """The perceptual distance written out layer by layer: run both batches through the Sequential critic,
    and at every LeakyReLU output take mean |a - b| / mean |b|; average over those layers."""
    terms, a, b = [], student, teacher
    for layer in critic:
        a, b = layer(a), layer(b)
        if isinstance(layer, nn.LeakyReLU):
            terms.append((a - b).abs().mean() / b.abs().mean())
    return sum(terms) / len(terms)


def test_perceptual_loss_is_zero_for_equal_images_and_a_differentiable_distance_otherwise(fp_checkpoint):
    from lowbit.train.distill import PerceptualLoss

    critic = load_discriminator(fp_checkpoint)
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    loss = PerceptualLoss(critic)
    gen = torch.Generator().manual_seed(3)
    teacher = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1
    assert loss(teacher.clone(), teacher).item() == 0.0
    student = (teacher + 0.3 * torch.randn(8, 1, 16, 16, generator=gen)).requires_grad_(True)
    value = loss(student, teacher)
    with torch.no_grad():
        expected = _normalised_l1_of_activations(load_discriminator(fp_checkpoint), student, teacher)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 0
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in critic.parameters())  # frozen: no gradient
    assert all(torch.equal(v, before[k]) for k, v in critic.state_dict().items())  # eval mode: BN stats kept


def test_distill_perceptual_trains_g_through_a_frozen_copy_of_the_pretrained_d(fp_checkpoint, tmp_path):
    from lowbit.train.distributed import current
    from lowbit.train.gan import GanTask, latent
    from lowbit.train.loop import seeded_generator

    cfg = qat_config(fp_checkpoint, ALL_BINARY, steps=4, distill_perceptual=3.0, distill_warmup=2,
                     log_every=1, sample_every=4, checkpoint_every=2)
    fp_d, fp_g = load_discriminator(fp_checkpoint), load_generator(fp_checkpoint)
    student = build_networks(cfg)[0].train()
    z = latent(BASE["batch_size"], 16, seeded_generator(0, 1, 0, 0), torch.device("cpu"))
    with torch.no_grad():
        expected = 3.0 * _normalised_l1_of_activations(fp_d, student(z), fp_g(z)).item()
    full = train_gan(cfg, tmp_path / "full", progress=False)
    assert full.history[0]["g_loss"] == pytest.approx(expected, rel=1e-5)  # the warm-up: perceptual term only
    assert "d_loss" in full.history[2]
    live_d = load_discriminator(full.model_path).state_dict()
    assert any(not torch.equal(v, fp_d.state_dict()[k]) for k, v in live_d.items())  # the live D trains ...
    task = GanTask(cfg, torch.device("cpu"), current())
    critic = task.trainer.distiller.perceptual.critic
    assert critic is not task.trainer.D and not any(p.requires_grad for p in critic.parameters())
    optimised = {id(p) for group in task.trainer.opt_g.param_groups + task.trainer.opt_d.param_groups
                 for p in group["params"]}
    assert not optimised & {id(p) for p in critic.parameters()}  # ... the critic is in no optimiser
    train_gan(dataclasses.replace(cfg, steps=2), tmp_path / "cut", progress=False)
    resumed = train_gan(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.history == full.history


def test_distill_perceptual_is_checked():
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="'distill_perceptual' must be >= 0 and needs init_from"):
        from_dict(GanConfig, {**BASE, "distill_perceptual": 1.0})
    with pytest.raises(ConfigError, match="'distill_perceptual' must be >= 0"):
        from_dict(GanConfig, {**BASE, "init_from": "x.safetensors", "distill_perceptual": -1.0})


def test_feature_matching_adds_the_distance_of_d_mean_activations_on_real_and_fake(fp_checkpoint, tmp_path):
    from lowbit.errors import ConfigError
    from lowbit.train.distributed import current
    from lowbit.train.gan import GanTask, latent
    from lowbit.train.gan_losses import dcgan_g_loss
    from lowbit.train.loop import seeded_generator

    cfg = qat_config(fp_checkpoint, ALL_BINARY, steps=1, feature_matching=5.0)
    trainer = GanTask(cfg, torch.device("cpu"), current()).trainer
    real = torch.rand(BASE["batch_size"], 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    G, D = build_networks(cfg)
    G.train(), D.train()
    z = latent(BASE["batch_size"], 16, seeded_generator(0, 1, 0, 0), torch.device("cpu"))
    with torch.no_grad():  # written out: the layers' outputs, batch means, squared differences
        a, b, terms = G(z), real, []
        fake_score = D(a)
        for layer in D:
            a, b = layer(a), layer(b)
            if isinstance(layer, nn.LeakyReLU):
                terms.append((a.mean(0) - b.mean(0)).square().mean())
        expected = dcgan_g_loss(fake_score) + 5.0 * sum(terms) / len(terms)
    got = trainer.g_step(BASE["batch_size"], seeded_generator(0, 1, 0, 0), real=real)
    assert got == pytest.approx(expected.item(), rel=1e-5) and sum(terms) > 0
    with pytest.raises(ValueError, match="feature_matching needs the real batch"):
        trainer.g_step(BASE["batch_size"], seeded_generator(0, 1, 0, 0))
    with pytest.raises(ConfigError, match="'feature_matching' is the weight"):
        qat_config(fp_checkpoint, ALL_BINARY, feature_matching=-1.0)
    runs = {weight: train_gan(dataclasses.replace(cfg, steps=2, feature_matching=weight, log_every=1,
                                                  sample_every=2, checkpoint_every=2),
                              tmp_path / str(weight), progress=False).history for weight in (0.0, 5.0)}
    assert runs[5.0][0]["d_loss"] == runs[0.0][0]["d_loss"]  # the loop hands G's step the real batch:
    assert runs[5.0][0]["g_loss"] > runs[0.0][0]["g_loss"]  # same D step, G's loss has the matching term


def test_fresh_discriminator_starts_d_from_random_weights_and_g_from_the_checkpoint(fp_checkpoint):
    from lowbit.train.distributed import current
    from lowbit.train.gan import GanTask

    fp_g, fp_d = load_generator(fp_checkpoint), load_discriminator(fp_checkpoint)
    for fresh in (False, True):
        task = GanTask(qat_config(fp_checkpoint, fresh_discriminator=fresh), torch.device("cpu"), current())
        g, d = task.trainer.G.state_dict(), task.trainer.D.state_dict()
        assert all(torch.equal(v, g[k]) for k, v in fp_g.state_dict().items())
        same_d = [torch.equal(v, d[k]) for k, v in fp_d.state_dict().items() if k.endswith("weight")]
        assert all(same_d) if not fresh else not any(same_d)


def test_a_checkpoint_accumulator_with_one_count_for_every_loss_still_resumes():
    """Checkpoints written before the per-loss counts hold {"sums", "count"}; they resume with that count."""
    from lowbit.train.loop import Accumulator

    acc = Accumulator.from_state({"sums": {"d_loss": 3.0, "g_loss": 6.0}, "count": 3})
    acc.add({"g_loss": 2.0})
    assert acc.row(4) == {"step": 4, "d_loss": 1.0, "g_loss": 2.0}
    assert Accumulator.from_state(acc.state()) == Accumulator()
