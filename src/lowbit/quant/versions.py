"""Version tracking for the quantizers' caches (a quantized weight, a search pick), which are
keyed on the parameter's version counter. Fused optimisers (``fused=True``) update parameters in
place without bumping it (torch 2.13), which would leave a cache stale; a global optimiser
post-step hook bumps the version of every parameter a fused group has just updated."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

_hook: list[RemovableHandle] = []


def _bump_fused_parameters(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        if group.get("fused"):
            increment_version(list(group["params"]))


def track_fused_optimizer_steps() -> None:
    """Register the post-step hook (once per process); every quantizer calls this when built."""
    if not _hook:
        _hook.append(register_optimizer_step_post_hook(_bump_fused_parameters))
