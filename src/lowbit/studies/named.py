"""Named trials x seeds (the classifier studies of seed 002, or any registered trial kind): each named
trial's overrides are merged into the base config, once per seed, and ``init_from: "@NAME"`` (for a gan
trial also ``train.teacher``) becomes the model file of trial NAME's run of the same seed, which therefore
runs first (``Trial.after``).

Trial ids are ``NAME-sSEED`` (no config hash), so studies that share a results directory share their
runs (a methods study and a randomness study both train ``fp``); a finished run whose config differs
is refused by the runner rather than silently reused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError
from lowbit.studies.execute import check_trial_config, registered_kind
from lowbit.studies.spec import TRIAL_SEEDS, StudyConfig, Trial, merge, trial_name
from lowbit.studies.store import trial_dir

#: an ``init_from`` (or ``teacher``) value "@NAME" means "the model of named trial NAME with the same seed"
TRIAL_REF = "@"


def named_trial_id(trial: str, seed: int) -> str:
    """The id (and directory name) of named trial ``trial``'s run with ``seed``."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{trial}-s{seed}")


def named_trial(study: StudyConfig, trial: str, seed: int, results_dir: str | Path) -> Trial:
    """Named trial ``trial`` of ``study`` with ``seed``: base + overrides, its ``@`` references resolved,
    validated against the trial kind's config (errors name ``trials.TRIAL.KEY``)."""
    kind = registered_kind(study.trial)
    changes = {k: v for k, v in (study.trials[trial] or {}).items() if k != TRIAL_SEEDS}
    config = copy.deepcopy(merge(study.base, changes))  # merge shares the base's untouched sections
    section = config.setdefault(kind.section, {}) if kind.section else config
    section.update(name=f"{trial}-s{seed}", seed=seed)
    after: list[str] = []
    for key in kind.model_refs:
        source = section.get(key)
        if isinstance(source, str) and source.startswith(TRIAL_REF):
            parent_id = _referenced_trial(study, trial, key, source, seed)
            section[key] = str(trial_dir(results_dir, parent_id) / kind.model)
            after.append(parent_id)
    check_trial_config(study.trial, config, where=f"trials.{trial}")
    params = {"trial": trial, "seed": seed}
    return Trial(id=named_trial_id(trial, seed), name=trial_name(params), params=params, config=config,
                 after=tuple(dict.fromkeys(after)))


def _referenced_trial(study: StudyConfig, trial: str, key: str, source: str, seed: int) -> str:
    """The id of the run that ``key: "@NAME"`` of named trial ``trial`` refers to (NAME's run of ``seed``)."""
    parent = source[len(TRIAL_REF):]
    if parent not in study.trials:
        raise ConfigError(f"trial '{trial}': {key} '{source}' names no trial; "
                          f"trials: {', '.join(study.trials)}")
    return named_trial_id(parent, study.seed_of(parent, seed))


def expand_named(study: StudyConfig, results_dir: str | Path) -> list[Trial]:
    """Every named trial x seed of ``study`` (seed by seed, trials in listed order)."""
    return [named_trial(study, trial, seed, results_dir)
            for seed in study.seeds for trial in study.trials if seed in study.trial_seeds(trial)]


def dependency_waves(trials: Sequence[Trial]) -> list[list[Trial]]:
    """The trials in waves: each wave holds the trials whose ``after`` trials ran in earlier waves (or
    are not in the list), in their given order, so a wave may run in parallel."""
    wanted = {trial.id for trial in trials}
    done: set[str] = set()
    waves, left = [], list(trials)
    while left:
        wave = [t for t in left if all(dep in done or dep not in wanted for dep in t.after)]
        if not wave:
            raise ConfigError(f"trials {', '.join(t.id for t in left)} start from each other in a cycle; "
                              "break the init_from '@' chain")
        waves.append(wave)
        done.update(t.id for t in wave)
        left = [t for t in left if t.id not in done]
    return waves


def rows_by_trial(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per named-trial record: ``trial`` and ``seed`` then the trial's metrics."""
    return [{"trial": r["params"]["trial"], "seed": r["params"]["seed"],
             **{k: v for k, v in r.get("metrics", {}).items() if k not in ("name", "seed")}}
            for r in records]
