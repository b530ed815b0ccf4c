"""Study configs: a base trial config plus axes whose cartesian product is the list of trials, or named
trials (override mappings) x seeds (``lowbit.studies.named``).

An axis is either a list of values set on dotted ``keys`` (or kept only as a named parameter),
or a mapping ``label -> overrides`` (named variants). Any string ``"$name"`` in the base or in a
variant is replaced by the value the trial takes on axis ``name``, so one variant such as
``{train.d_quant.weight_bits: $bits}`` combines with a ``bits`` axis.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

from lowbit.config import closest, load_config, read_yaml
from lowbit.errors import ConfigError


@dataclasses.dataclass
class Axis:
    """One dimension of a study grid: plain values (set on ``keys``) or labelled override variants."""

    name: str
    values: Any
    keys: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.values, dict):
            if self.keys:
                raise ConfigError(f"axis '{self.name}': 'keys' only applies to a list of values; "
                                  "remove 'keys' or give 'values' as a list")
            for label, overrides in self.values.items():
                if not isinstance(overrides, dict):
                    raise ConfigError(f"axis '{self.name}': variant '{label}' must be a mapping of "
                                      f"dotted keys to values, got {overrides!r}")
        elif not isinstance(self.values, list) or not self.values:
            raise ConfigError(f"axis '{self.name}': 'values' must be a non-empty list or a mapping "
                              "label -> overrides")

    def choices(self) -> list[tuple[Any, dict[str, Any]]]:
        """(parameter value, overrides) for every point on this axis."""
        if isinstance(self.values, dict):
            return [(label, dict(overrides)) for label, overrides in self.values.items()]
        return [(value, {key: value for key in self.keys}) for value in self.values]


@dataclasses.dataclass
class MixedSpec:
    """Per-layer mixed precision (run after the D/G search): lower single layers of G to ``bits``."""

    bits: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    layer_key: str = "train.g_quant.overrides"
    bits_field: str = "weight_bits"


@dataclasses.dataclass
class SearchSpec:
    """Seed 001 §4.2's search: the lowest D bits with G at full precision, then the lowest G bits."""

    target: float
    metric: Literal["fid", "is"] = "fid"
    bits: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    d_keys: list[str] = dataclasses.field(default_factory=lambda: ["train.d_quant.weight_bits"])
    g_keys: list[str] = dataclasses.field(default_factory=lambda: ["train.g_quant.weight_bits"])
    mixed: MixedSpec | None = None

    def __post_init__(self) -> None:
        if not self.bits or any(b < 1 or b > 32 for b in self.bits):
            raise ConfigError(f"search.bits {self.bits} must be a non-empty list of bit-widths in 1..32")
        self.bits = sorted(set(self.bits))

    def meets(self, value: float) -> bool:
        """Whether a score reaches the target (FID at most ``target``, IS at least ``target``)."""
        if value != value:  # NaN never meets a target
            return False
        return value <= self.target if self.metric == "fid" else value >= self.target


@dataclasses.dataclass
class StudyConfig:
    """A whole study: which trial function runs, its shared config, the grid, search or named trials, and
    resources. ``base`` may name a YAML file (relative to the study file) holding the shared config.
    ``measures`` names registered per-trial measures (``lowbit.studies.measures``, e.g. ``packed``).

    Named trials: ``trials`` maps a name to overrides merged into ``base``; each runs once per seed of
    ``seeds`` (a trial's own ``seeds`` list restricts it); ``init_from: "@NAME"`` starts a trial from the
    model NAME trained with the same seed (or NAME's first seed); ``reference`` (default: the first trial)
    is the trial others are compared with."""

    name: str
    trial: str = "gan"
    base: dict[str, Any] | str = dataclasses.field(default_factory=dict)
    axes: list[Axis] = dataclasses.field(default_factory=list)
    trials: dict[str, dict[str, Any] | None] = dataclasses.field(default_factory=dict)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    reference: str | None = None
    measures: list[str] = dataclasses.field(default_factory=list)
    select: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    search: SearchSpec | None = None
    state_metric: str = "fid"
    plot_x: str = ""
    workers: int = 1
    backend: Literal["pool", "ray"] = "pool"
    address: str | None = None
    out_dir: str = ""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: give at least 1 worker")
        names = [axis.name for axis in self.axes]
        if len(set(names)) != len(names):
            raise ConfigError(f"study '{self.name}': axis names {names} repeat; give each axis its own name")
        for key in self.select:
            if key not in names:
                raise ConfigError(f"select: '{key}' is not an axis{closest(key, names)}; "
                                  f"valid: {', '.join(names)}")
        if self.trials:
            self._check_named()
        elif self.seeds != [0] or self.reference is not None:
            raise ConfigError(f"study '{self.name}': 'seeds' and 'reference' apply to named 'trials'; "
                              "for a grid add a seed axis (values: [0, 1], keys: [train.seed])")

    def _check_named(self) -> None:
        if self.axes or self.search is not None:
            raise ConfigError(f"study '{self.name}' has named 'trials' and 'axes'/'search'; use one of them")
        if not self.seeds:
            raise ConfigError("study seeds must list at least one seed, e.g. [0, 1, 2]")
        self.reference = self.reference or next(iter(self.trials))
        if self.reference not in self.trials:
            raise ConfigError(f"study reference '{self.reference}' is not a trial; "
                              f"trials: {', '.join(self.trials)}")
        for trial in self.trials:
            if not self.trial_seeds(trial):
                raise ConfigError(f"trial '{trial}' runs none of the study seeds {self.seeds}; fix its seeds")

    def trial_seeds(self, trial: str) -> list[int]:
        """The study seeds that named trial ``trial`` runs."""
        only = (self.trials[trial] or {}).get(TRIAL_SEEDS)
        return [seed for seed in self.seeds if only is None or seed in only]

    def seed_of(self, trial: str, seed: int) -> int:
        """The seed of named trial ``trial``'s run that stands for ``seed`` (itself, or its first seed)."""
        seeds = self.trial_seeds(trial)
        return seed if seed in seeds else seeds[0]

    def results_dir(self) -> Path:
        """Where this study writes its table, trials and plots."""
        return Path(self.out_dir or Path("results") / self.name)


#: a key of a named trial (not a config field) restricting the seeds that trial runs
TRIAL_SEEDS = "seeds"


@dataclasses.dataclass(frozen=True)
class Trial:
    """One job of a study: a stable id, a readable name, its axis values, its full config and the ids of
    the trials it starts from (run before it)."""

    id: str
    name: str
    params: dict[str, Any]
    config: dict[str, Any]
    after: tuple[str, ...] = ()


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read and validate a study YAML (with ``key=value`` overrides); a ``base`` file name is read,
    relative to the study file."""
    study = load_config(StudyConfig, path, overrides)
    if isinstance(study.base, str):
        study.base = read_yaml(Path(path).parent / study.base)
    return study


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; a mapping value is merged into an existing mapping."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"key '{key}': '{part}' holds {child!r}, not a section; fix the key")
        node = child
    node[parts[-1]] = merge(node.get(parts[-1]), value)


def merge(old: Any, new: Any) -> Any:
    """Deep-merge mapping ``new`` into mapping ``old`` (keys taken literally); anything else replaces."""
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = merge(old.get(key), value)
        return merged
    return copy.deepcopy(new)


def substitute(node: Any, params: dict[str, Any]) -> Any:
    """Replace every string ``"$name"`` in a nested structure by ``params[name]``."""
    if isinstance(node, dict):
        return {key: substitute(value, params) for key, value in node.items()}
    if isinstance(node, list):
        return [substitute(value, params) for value in node]
    if isinstance(node, str) and node.startswith("$"):
        name = node[1:]
        if name not in params:
            valid = ", ".join("$" + p for p in params) or "none"
            raise ConfigError(f"'{node}' names no axis; valid: {valid}")
        return params[name]
    return node


def make_trial(base: dict[str, Any], params: dict[str, Any], overrides: dict[str, Any]) -> Trial:
    """A trial from the base config, its axis values and the dotted overrides they imply."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(config, key, value)
    config = substitute(config, params)
    return Trial(id=trial_id(params, config), name=trial_name(params), params=dict(params), config=config)


def expand(study: StudyConfig) -> list[Trial]:
    """Every trial of a grid study (those ``select`` keeps), in axis order (the last axis varies fastest)."""
    trials = []
    for combo in itertools.product(*(axis.choices() for axis in study.axes)):
        params = {axis.name: value for axis, (value, _) in zip(study.axes, combo, strict=True)}
        if any(str(params[key]) not in map(str, kept) for key, kept in study.select.items()):
            continue
        overrides: dict[str, Any] = {}
        for _, axis_overrides in combo:
            overrides.update(axis_overrides)
        trials.append(make_trial(study.base, params, overrides))
    return trials


def trial_name(params: dict[str, Any]) -> str:
    """A readable name such as ``model=dcgan,bits=3`` (``base`` for a trial without parameters)."""
    return ",".join(f"{key}={value}" for key, value in params.items()) or "base"


def trial_id(params: dict[str, Any], config: dict[str, Any]) -> str:
    """A filesystem-safe id: the readable name plus a hash of the full config (a changed config re-runs)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", trial_name(params))[:80]
    return f"{slug}-{digest}"
