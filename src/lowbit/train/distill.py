"""Feature distillation from a full-precision teacher (GAN Compression, Li et al., CVPR 2020, §3.2).

Where the student has other channel counts than the teacher (a channel-pruned student), a learned 1x1
convolution (a linear map for N x C features) maps the student's feature to the teacher's channels before
the comparison, as GAN Compression's adapters do; equal counts are compared directly.

Perceptual distillation (``PerceptualLoss``) compares the two networks' *images* in the feature space of a
frozen copy of the pretrained full-precision discriminator, the stand-in for VGG features in GAN compression
("Content-aware GAN compression", Liu et al. CVPR 2021; GAN Slimming's perceptual term, Wang et al.
ECCV 2020).

The taps are the inputs of the teacher's hidden activation modules (the pre-activations after
each BatchNorm) and of the student modules of the same name (its ``QuantAct``, or the
``RPReLU`` + ``QuantAct`` block that replaced them): the loss is the mean over taps of
``mean((f_student - f_teacher)^2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn import HIDDEN_ACTIVATIONS
from lowbit.train.checkpoint import load_weights


def tap_names(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names of the teacher's hidden activation modules that the student also has."""
    student_names = dict(student.named_modules())
    names = [n for n, m in teacher.named_modules()
             if isinstance(m, HIDDEN_ACTIVATIONS) and n in student_names]
    if not names:
        raise ConfigError("distill_features: the teacher has no hidden activation modules (ReLU, ...) "
                          "that the student shares, so there is no feature to match; set distill_features: 0")
    return names


def _key(name: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


class FeatureTaps:
    """Records the inputs of the tapped modules of a student and its teacher while active; ``adapters``
    (trained with the student) map student features to the teacher's channel count where they differ."""

    def __init__(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        self.names = tap_names(teacher, student)
        self.modules = {"student": dict(student.named_modules()), "teacher": dict(teacher.named_modules())}
        self.features: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.adapters = self._adapters(student, teacher, example)

    def _adapters(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> nn.ModuleDict:
        """A 1x1 conv (or linear map) per tap whose student and teacher channel counts differ."""
        modes = {m: m.training for m in (*student.modules(), *teacher.modules())}
        with torch.no_grad(), self.recording():
            student.eval()(example)
            teacher.eval()(example)
        for module, mode in modes.items():
            module.train(mode)
        adapters = nn.ModuleDict()
        for name in self.names:
            own, theirs = self.features["student"][name], self.features["teacher"][name]
            if own.shape[1] != theirs.shape[1]:
                size = (own.shape[1], theirs.shape[1])
                adapter = nn.Conv2d(*size, 1, bias=False) if own.dim() == 4 else nn.Linear(*size, bias=False)
                adapters[_key(name)] = adapter
        self.features = {"student": {}, "teacher": {}}
        return adapters

    def _adapted(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        key = _key(name)
        return self.adapters[key](feature) if key in self.adapters else feature

    @contextmanager
    def recording(self) -> Iterator[FeatureTaps]:
        """Hooks on inside the block only (so copies of the models and other passes record nothing)."""
        handles = [self.modules[side][name].register_forward_pre_hook(self._hook(side, name))
                   for side in self.modules for name in self.names]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, side: str, name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.features[side][name] = args[0]
        return record

    def loss(self) -> torch.Tensor:
        """Mean over taps of the mean squared difference, then forgets the recorded features."""
        student, teacher = self.features["student"], self.features["teacher"]
        terms = [(self._adapted(n, student[n]) - teacher[n].detach()).square().mean() for n in self.names]
        self.features = {"student": {}, "teacher": {}}
        return torch.stack(terms).mean()


#: builds the adapters' optimiser from their parameters
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class DistillWeights(Protocol):
    """The config fields of distillation (GanConfig and I2IConfig have them)."""

    distill: float
    distill_features: float
    init_from: str | None


def check_weights(distill: float, distill_features: float, init_from: str | None,
                  distill_perceptual: float = 0.0) -> None:
    """Every distillation weight must be >= 0, and any one needs a teacher checkpoint (``init_from``, or
    the GAN config's ``teacher``), passed as ``init_from``."""
    for key, value in (("distill", distill), ("distill_features", distill_features),
                       ("distill_perceptual", distill_perceptual)):
        if value < 0 or (value and init_from is None):
            raise ConfigError(f"'{key}' must be >= 0 and needs init_from or teacher (the FP teacher), "
                              f"got {value}")


def hidden_activations(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model(x)`` and the outputs of its hidden activation modules (LeakyReLU, ReLU, ...) in call order."""
    found: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _args, out: found.append(out))
               for m in model.modules() if isinstance(m, HIDDEN_ACTIVATIONS)]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, found


class PerceptualLoss:
    """The mean over a frozen critic's hidden activations (every conv block's output) of
    ``mean |f(student image) - f(teacher image)| / mean |f(teacher image)|``: an L1 distance normalised per
    layer, so each block counts alike whatever its scale. The critic is a private copy, in eval mode (its
    BatchNorm running statistics) and frozen: it gets no gradient and no optimiser step."""

    def __init__(self, critic: nn.Module) -> None:
        self.critic = critic.eval().requires_grad_(False)
        if not any(isinstance(m, HIDDEN_ACTIVATIONS) for m in self.critic.modules()):
            raise ConfigError("distill_perceptual: the discriminator has no hidden activation modules "
                              "(LeakyReLU, ...) whose outputs could be compared; set distill_perceptual: 0")

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The hidden activations of the critic on ``images``, in network order."""
        return hidden_activations(self.critic, images)[1]

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The per-layer normalised L1 distance of the two image batches' features (0 when they are equal)."""
        with torch.no_grad():
            targets = self.features(teacher)
        terms = [(own - target).abs().mean() / target.abs().mean().clamp_min(1e-8)
                 for own, target in zip(self.features(student), targets, strict=True)]
        return torch.stack(terms).mean()


class Distiller:
    """The FP teacher's pull on a generator: ``distill`` x mean |G(x) - T(x)| (output L1) plus
    ``distill_features`` x the ``FeatureTaps`` loss plus ``distill_perceptual`` x the ``PerceptualLoss`` of
    the two images; owns the adapters and their optimiser. Shared by the noise GAN (x = latents) and the
    image-to-image GAN (x = input images)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, example: torch.Tensor, distill: float,
                 distill_features: float, optimizer: OptimizerFactory, distill_perceptual: float = 0.0,
                 critic: nn.Module | None = None) -> None:
        if distill_perceptual and critic is None:
            raise ConfigError("distill_perceptual needs the pretrained discriminator (init_from's D) as the "
                              "frozen critic; pass critic or set distill_perceptual: 0")
        self.teacher = teacher.to(example.device).eval().requires_grad_(False)
        self.distill, self.distill_features = distill, distill_features
        self.distill_perceptual = distill_perceptual
        self.perceptual = PerceptualLoss(critic.to(example.device)) if distill_perceptual else None
        self.taps = FeatureTaps(student, self.teacher, example) if distill_features else None
        adapters = list(self.taps.adapters.to(example.device).parameters()) if self.taps is not None else []
        self.opt_adapters = optimizer(adapters) if adapters else None

    def forward(self, student: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(student(x), teacher(x))``, recording both networks' features when feature distillation is on."""
        with self.taps.recording() if self.taps is not None else nullcontext():
            out = student(x)
            with torch.no_grad():
                target = self.teacher(x)
        return out, target

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted output L1, the weighted feature loss of the last ``forward`` and the weighted
        perceptual distance of ``out`` to ``target``."""
        loss = self.distill * (out - target).abs().mean() if self.distill else out.new_zeros(())
        if self.taps is not None:
            loss = loss + self.distill_features * self.taps.loss()
        if self.perceptual is not None:
            loss = loss + self.distill_perceptual * self.perceptual(out, target)
        return loss

    def step(self) -> None:
        """One update of the adapters (after the generator's backward pass)."""
        if self.opt_adapters is not None:
            self.opt_adapters.step()
            self.opt_adapters.zero_grad(set_to_none=True)

    def state(self) -> dict[str, Any]:
        """The adapters and their optimiser (empty without adapters), for a checkpoint."""
        if self.opt_adapters is None:
            return {}
        return {"distill_adapters": self.taps.adapters.state_dict(),
                "optim_adapters": self.opt_adapters.state_dict()}

    def load_state(self, state: dict[str, Any], source: str) -> None:
        """Restore what ``state()`` saved; a mismatch names ``source``."""
        if self.opt_adapters is not None:
            load_weights(self.taps.adapters, state["distill_adapters"], f"{source} (distillation adapters)")
            self.opt_adapters.load_state_dict(state["optim_adapters"])


def logit_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015 (§2): ``T^2 KL(softmax(t/T) || softmax(s/T))``, batch mean; the T^2 keeps the
    soft targets' gradients at the scale of the hard-label loss when T changes."""
    if student.shape != teacher.shape:
        raise ConfigError(f"logit distillation: the student gives logits of shape {list(student.shape)}, the "
                          f"teacher {list(teacher.shape)}; use a teacher trained on the same classes")
    log_student = torch.log_softmax(student / temperature, dim=1)
    log_teacher = torch.log_softmax(teacher / temperature, dim=1)
    kl = torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return temperature**2 * kl
