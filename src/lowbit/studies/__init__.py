"""Studies: grids of quantized training trials and the multi-precision search, run on a process
pool or Ray, with results streamed to CSV/JSON tables (see docs/studies.md)."""

from lowbit.studies.spec import Axis, SearchSpec, StudyConfig, Trial, expand, load_study
from lowbit.studies.states import STATES, StateRule, classify_curve, classify_history
from lowbit.studies.study import run_study

__all__ = ["Axis", "STATES", "SearchSpec", "StateRule", "StudyConfig", "Trial", "classify_curve",
           "classify_history", "expand", "load_study", "run_study"]
