"""GAN objectives with the optimiser defaults of their papers: DCGAN, WGAN, WGAN-GP, LSGAN.

Every discriminator returns raw scores (no sigmoid); each loss is a pair of functions of those
scores. ``GAN_LOSSES[name]`` holds the functions plus the paper's optimiser, learning rate, betas,
critic steps per generator step, weight clipping and gradient-penalty settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import unknown_name_error
from lowbit.train.optim import fused_if_supported


def dcgan_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))) with D = sigmoid(score) (Goodfellow et al. 2014, eq. 1)."""
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def dcgan_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log D(G(z)) (Goodfellow et al. 2014, §3)."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def wasserstein_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Critic loss E[D(G(z))] - E[D(x)], the negated Wasserstein estimate (Arjovsky et al. 2017, alg. 1)."""
    return fake.mean() - real.mean()


def wasserstein_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator loss -E[D(G(z))] (Arjovsky et al. 2017, alg. 1)."""
    return -fake.mean()


def lsgan_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2]: LSGAN with the 0-1 coding a=0, b=1 (Mao et al. 2017, eq. 2)."""
    return 0.5 * ((real - 1.0) ** 2).mean() + 0.5 * (fake**2).mean()


def lsgan_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """1/2 E[(D(G(z)) - 1)^2]: LSGAN generator loss with c=1 (Mao et al. 2017, eq. 2)."""
    return 0.5 * ((fake - 1.0) ** 2).mean()


def feature_matching_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """||E f(x) - E f(G(z))||^2 (Salimans et al. 2016, §3.1) for each of D's intermediate layers f: the mean
    over features of the squared difference of the two batch means, averaged over the layers."""
    terms = [(r.detach().mean(0) - f.mean(0)).square().mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(terms).mean()


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2], x_hat = e*x + (1-e)*G(z), e ~ U[0,1] (Gulrajani et al. 2017, eq. 3)."""
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator).to(real)
    mixed = (eps * real + (1.0 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


@dataclass(frozen=True)
class GanLoss:
    """One GAN algorithm: its two losses and the training defaults of its paper."""

    name: str
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    optimizer: str
    lr: float
    betas: tuple[float, float]
    n_critic: int
    clip: float | None = None
    gp_weight: float = 0.0


GAN_LOSSES: dict[str, GanLoss] = {
    "dcgan": GanLoss("dcgan", dcgan_d_loss, dcgan_g_loss, "adam", 2e-4, (0.5, 0.999), 1),
    "lsgan": GanLoss("lsgan", lsgan_d_loss, lsgan_g_loss, "adam", 2e-4, (0.5, 0.999), 1),
    "wgan": GanLoss(
        "wgan", wasserstein_d_loss, wasserstein_g_loss, "rmsprop", 5e-5, (0.0, 0.0), 5, clip=0.01
    ),
    "wgan-gp": GanLoss(
        "wgan-gp", wasserstein_d_loss, wasserstein_g_loss, "adam", 1e-4, (0.0, 0.9), 5, gp_weight=10.0
    ),
}


def get_loss(name: str) -> GanLoss:
    """The GAN algorithm called ``name``; an unknown name lists the valid ones."""
    if name not in GAN_LOSSES:
        raise unknown_name_error("GAN loss", name, GAN_LOSSES)
    return GAN_LOSSES[name]


def make_optimizer(loss: GanLoss, params, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """The optimiser family of ``loss`` (Adam or RMSprop) over ``params``."""
    params = list(params)
    if loss.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused_if_supported(params))
