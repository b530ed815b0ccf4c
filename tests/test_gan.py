"""GAN zoo, losses and trainer: shapes, loss formulas, real short runs, resume, divergence, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.models import create_model, list_models
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.gan import (
    BatchStream,
    GanConfig,
    GanTrainer,
    TrainingDivergedError,
    latent,
    seeded_generator,
    train_gan,
)
from lowbit.train.gan_losses import (
    dcgan_d_loss,
    dcgan_g_loss,
    gradient_penalty,
    lsgan_d_loss,
    lsgan_g_loss,
    wasserstein_d_loss,
    wasserstein_g_loss,
)
from lowbit.train.networks import load_generator
from tiny_gan import tiny_gan


def tiny_config(**changes) -> GanConfig:
    """A DCGAN on 16x16 sklearn digits small enough for a test."""
    return from_dict(GanConfig, tiny_gan(**changes))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("size,channels", [(16, 1), (28, 1), (32, 3), (64, 3)])
def test_dcgan_shapes_and_flat_chain(size, channels):
    g = create_model(f"dcgan-g-{size}", width=4, latent_dim=10)
    z = torch.randn(3, g.latent_dim)
    images = g(z)
    assert images.shape == (3, channels, size, size)
    assert images.abs().max() <= 1.0
    assert (
        isinstance(g, nn.Sequential) and isinstance(g[0], nn.ConvTranspose2d) and isinstance(g[-1], nn.Tanh)
    )
    assert g[0].in_channels == 10 and g[0].kernel_size == (4, 4)
    for name in (f"dcgan-d-{size}", f"dcgan-d-{size}-nobn"):
        d = create_model(name, width=4)
        assert d(images).shape == (3,)
    nobn = create_model(f"dcgan-d-{size}-nobn", width=4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    assert create_model(f"dcgan-d-{size}", width=4).lowbit_kwargs == {"width": 4}


def test_dcgan_128_is_registered_and_width_scales_channels():
    assert {"dcgan-g-128", "dcgan-d-128", "dcgan-d-128-nobn"} <= set(list_models())
    g = create_model("dcgan-g-28", width=16)
    assert [m.out_channels for m in g if isinstance(m, nn.ConvTranspose2d)] == [64, 32, 16, 1]


def test_dcgan_rejects_bad_width():
    with pytest.raises(ConfigError, match="width"):
        create_model("dcgan-g-28", width=0)


# ----------------------------------------------------------------------------- loss formulas


def test_loss_formulas_match_their_definitions():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.0])
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    assert torch.allclose(dcgan_d_loss(real, fake), expected_d, atol=1e-6)
    assert torch.allclose(dcgan_g_loss(fake), -torch.log(sig(fake)).mean(), atol=1e-6)
    assert math.isclose(float(wasserstein_d_loss(real, fake)), (-1.8 / 3) - (1.5 / 3), rel_tol=1e-6)
    assert math.isclose(float(wasserstein_g_loss(fake)), 1.8 / 3, rel_tol=1e-6)
    lsd = (
        0.5 * sum((r - 1) ** 2 for r in (2.0, -1.0, 0.5)) / 3 + 0.5 * sum(f**2 for f in (-3.0, 0.2, 1.0)) / 3
    )
    assert math.isclose(float(lsgan_d_loss(real, fake)), lsd, rel_tol=1e-6)
    assert math.isclose(float(lsgan_g_loss(fake)), 0.5 * ((-4) ** 2 + 0.8**2 + 0) / 3, rel_tol=1e-6)


def test_gradient_penalty_of_a_linear_critic_is_norm_minus_one_squared():
    w = torch.tensor([[3.0, 4.0]])  # gradient of x -> w.x is w everywhere, ||w|| = 5
    critic = nn.Linear(2, 1, bias=False)
    critic.weight.data.copy_(w)
    penalty = gradient_penalty(lambda x: critic(x).squeeze(1), torch.randn(8, 2), torch.randn(8, 2))
    assert math.isclose(float(penalty.detach()), (5.0 - 1.0) ** 2, rel_tol=1e-5)


# ----------------------------------------------------------------------------- update rules on real data


@pytest.mark.parametrize(
    "loss,disc",
    [
        ("dcgan", "dcgan-d-16"),
        ("lsgan", "dcgan-d-16"),
        ("wgan", "dcgan-d-16"),
        ("wgan-gp", "dcgan-d-16-nobn"),
    ],
)
def test_each_player_lowers_its_own_loss(loss, disc):
    """D steps against a fixed G lower the D loss; G steps against a fixed D lower the G loss."""
    cfg = tiny_config(
        loss=loss,
        discriminator={"model": disc, "kwargs": {"width": 8}},
        betas=[0.5, 0.999],
        generator={"model": "dcgan-g-16", "kwargs": {"width": 8, "latent_dim": 16}, "lr": 1e-3},
    )
    cfg.discriminator.lr = 1e-3
    torch.manual_seed(0)
    trainer = GanTrainer(
        cfg,
        create_model("dcgan-g-16", width=8, latent_dim=16),
        create_model(disc, width=8),
        torch.device("cpu"),
    )
    trainer.clip = None
    from lowbit.data import load

    real = load("digits", size=16, limit=32)[0]
    d_losses = [trainer.d_step(real, seeded_generator(1)) for _ in range(25)]
    g_losses = [trainer.g_step(32, seeded_generator(2)) for _ in range(25)]
    assert sum(d_losses[-5:]) < sum(d_losses[:5])
    assert sum(g_losses[-5:]) < sum(g_losses[:5])


def test_g_step_leaves_d_untouched_and_matches_the_unfrozen_gradient():
    """G's update backpropagates through a frozen D: no D gradients are made, D's parameters are
    trainable again afterwards, and G gets the same gradient as through a trainable D."""
    cfg = tiny_config()
    torch.manual_seed(0)
    trainer = GanTrainer(cfg, create_model("dcgan-g-16", width=8, latent_dim=16),
                         create_model("dcgan-d-16", width=8), torch.device("cpu"))
    reference_g = copy.deepcopy(trainer.G)
    reference_d = copy.deepcopy(trainer.D)
    z = latent(32, 16, seeded_generator(3), torch.device("cpu"))
    trainer.loss.g_loss(reference_d(reference_g(z))).backward()
    captured: list[torch.Tensor] = []
    trainer.opt_g.register_step_pre_hook(
        lambda opt, args, kwargs: captured.extend(p.grad.clone() for p in trainer.G.parameters()))
    trainer.g_step(32, seeded_generator(3))
    assert all(p.grad is None and p.requires_grad for p in trainer.D.parameters())
    assert all(p.grad is None for p in trainer.G.parameters())  # freed right after the step
    expected = [p.grad for p in reference_g.parameters()]
    assert len(captured) == len(expected) > 0
    for got, want in zip(captured, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 10.0) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel, computed on flattened pixels."""
    x, y = x.flatten(1), y.flatten(1)

    def k(a, b):
        return torch.exp(-(torch.cdist(a, b) ** 2) / (2 * bandwidth**2)).mean()

    return float(k(x, x) + k(y, y) - 2 * k(x, y))


def test_short_dcgan_run_moves_samples_towards_the_data(tmp_path):
    from lowbit.data import load

    cfg = tiny_config(steps=150, log_every=25, sample_every=150, checkpoint_every=150)
    torch.manual_seed(cfg.seed)
    untrained = create_model("dcgan-g-16", width=8, latent_dim=16).eval()
    result = train_gan(cfg, tmp_path / "run", progress=False)
    trained = load_generator(result.model_path)
    real = load("digits", split="test", size=16)[0][:256]
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before, after = _mmd(untrained(z), real), _mmd(trained(z), real)
    assert after < 0.5 * before
    d = [row["d_loss"] for row in result.history]
    assert d[-1] < d[0] < 2 * math.log(2) + 0.1  # D starts near chance (log 4) and learns
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[0] == "step,d_loss,g_loss"
    assert result.samples is not None and result.samples.is_file()
    assert any((tmp_path / "run" / "tb").iterdir())


# ------------------------------------------------------------------- data stream, resume, divergence


def test_batch_stream_shards_the_same_global_batch_across_ranks():
    images = torch.arange(40.0).view(40, 1, 1, 1)
    whole = BatchStream(images, 8, seed=3).batch(7)
    parts = [BatchStream(images, 8, seed=3, rank=r, world=2).batch(7) for r in range(2)]
    assert sorted(torch.cat(parts).flatten().tolist()) == sorted(whole.flatten().tolist())
    epoch0 = torch.cat([BatchStream(images, 8, seed=3).batch(i) for i in range(5)])
    assert sorted(epoch0.flatten().tolist()) == list(range(40))


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = train_gan(tiny_config(steps=20), tmp_path / "full", progress=False)
    train_gan(tiny_config(steps=10), tmp_path / "cut", progress=False)
    resumed = train_gan(tiny_config(steps=20), tmp_path / "cut", resume=True, progress=False)
    assert resumed.history == full.history
    a, b = load_checkpoint(full.model_path), load_checkpoint(resumed.model_path)
    for key, value in a["generator"].items():
        assert torch.equal(value, b["generator"][key]), key


def test_resume_refuses_a_changed_config(tmp_path):
    train_gan(tiny_config(steps=10), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="loss"):
        train_gan(tiny_config(steps=20, loss="lsgan"), tmp_path / "run", resume=True, progress=False)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A corrupted (NaN) training image drawn at step 16 stops the run; the step-15 checkpoint survives."""
    import lowbit.data

    cfg = tiny_config(steps=30, checkpoint_every=5)
    images, labels = lowbit.data.load("digits", size=16)
    poisoned_draw = 15  # the 16th batch, drawn at step 16 (one critic step per generator step)
    bad_index = (
        BatchStream(torch.arange(len(images)).view(-1, 1, 1, 1), cfg.batch_size, cfg.seed)
        .batch(poisoned_draw)[0]
        .item()
    )
    images[bad_index] = float("nan")
    monkeypatch.setattr(lowbit.data, "load", lambda *a, **k: (images, labels))
    with pytest.raises(
        TrainingDivergedError,
        match=r"discriminator loss became nan at step 16; the last good "
        r"checkpoint .*last.safetensors is kept",
    ):
        train_gan(cfg, tmp_path / "run", progress=False)
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert kept["step"] == 15
    assert all(torch.isfinite(t).all() for t in kept["discriminator"].values())
