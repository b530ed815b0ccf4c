"""Summaries of the datasets for ``lowbit data info``: images per split and image shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowbit.data.datasets import SPLITS, get_spec, read_arrays
from lowbit.errors import LowbitError


@dataclass
class DatasetInfo:
    """What is available of one dataset: counts per readable split, shape, or why it is unavailable."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None
    problem: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def describe(name: str, root: str | Path | None = None, **options) -> DatasetInfo:
    """Read each split of ``name`` (uint8, no conversion) and record its size and image shape."""
    info = DatasetInfo(name)
    if get_spec(name).needs_root and root is None:
        info.problem = "needs --root DIR (the folder holding its images)"
        return info
    for split in SPLITS:
        try:
            images, _ = read_arrays(name, split, root, **options)
        except LowbitError as exc:
            info.problem = str(exc)
            continue
        info.counts[split] = len(images)
        info.shape = tuple(images.shape[1:])
    return info


def format_table(infos: list[DatasetInfo]) -> str:
    """A plain-text table: dataset, train, test, total, C x H x W (or the reason it is unavailable)."""
    lines = [f"{'dataset':<14}{'train':>9}{'test':>9}{'total':>9}  shape (C x H x W)"]
    for info in infos:
        if not info.counts:
            lines.append(f"{info.name:<14}  not available: {info.problem}")
            continue
        train, test = (f"{info.counts[s]:,}" if s in info.counts else "-" for s in SPLITS)
        shape = "x".join(str(d) for d in info.shape)
        lines.append(f"{info.name:<14}{train:>9}{test:>9}{info.total:>9,}  {shape}")
    return "\n".join(lines)
