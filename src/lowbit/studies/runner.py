"""Run a list of trials on a local process pool or on Ray, streaming results to the study table.

Pool backend: ``workers`` slots, each pinned to its own share of the CPU cores
(``os.sched_setaffinity`` + ``torch.set_num_threads``), its output going to the trial's
``worker.log``; every trial runs in a fresh process,
forked from a server that has already imported torch and the trial's module, so a crash - even
a segfault - fails only that trial. Ray backend: one Ray task per trial (``max_retries=0``),
on a local Ray runtime or on the cluster at ``address``. Either way a finished trial is written at once to
``trials/<id>/result.json`` and to ``results.csv`` / ``results.json``; on a re-run, trials that
finished ``ok`` are skipped (failed ones run again).
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from lowbit.errors import ConfigError
from lowbit.studies.execute import check_trial_ref, execute_trial, failed_record, trial_module
from lowbit.studies.measures import apply_measures, check_measures, pending_measures
from lowbit.studies.spec import Trial
from lowbit.studies.store import read_record, stored_form, trial_dir, write_record, write_table

Backend = Literal["pool", "ray"]
# imported once by the fork server instead of by every trial (torch's optimizers import dynamo lazily, ~2 s)
PRELOAD = ["torch", "torch._dynamo", "lowbit.studies.execute"]


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def core_groups(workers: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """Split the cores into ``workers`` contiguous groups (round-robin single cores if workers > cores)."""
    cores = list(cores if cores is not None else available_cores())
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    size, extra = divmod(len(cores), workers)
    groups, start = [], 0
    for index in range(workers):
        stop = start + size + (1 if index < extra else 0)
        groups.append(cores[start:stop])
        start = stop
    return groups


WORKER_LOG = "worker.log"


def _thread_env(threads: int) -> None:
    """Thread counts for OpenMP / MKL in a worker (torch's own is set by execute_trial)."""
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _pool_main(trial_ref: str, trial: Trial, results_dir: str, cores: list[int], state_metric: str) -> None:
    """Entry point of a pool worker process: pin to ``cores``, log to the trial's directory, run it."""
    os.sched_setaffinity(0, cores)
    _thread_env(len(cores))
    log_path = trial_dir(results_dir, trial.id) / WORKER_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    execute_trial(trial_ref, trial, results_dir, len(cores), state_metric)


def _ray_main(trial_ref: str, trial: Trial, results_dir: str, threads: int,
              state_metric: str) -> dict[str, Any]:
    """Body of a Ray task: run one trial with ``threads`` torch threads and return its record."""
    _thread_env(threads)
    return execute_trial(trial_ref, trial, results_dir, threads, state_metric)


class StudyRunner:
    """Runs batches of trials of one study, keeping the study table up to date as each one ends."""

    def __init__(self, results_dir: str | Path, trial_ref: str, workers: int = 1, backend: Backend = "pool",
                 address: str | None = None, state_metric: str = "fid", progress: bool = True,
                 desc: str = "study", allow_imports: bool = False, measures: Sequence[str] = ()) -> None:
        check_trial_ref(trial_ref, allow_imports)
        check_measures(trial_ref, list(measures))
        if workers < 1:
            raise ConfigError(f"workers={workers}: give at least 1 worker")
        if backend not in ("pool", "ray"):
            raise ConfigError(f"unknown backend '{backend}'; valid: pool, ray")
        self.results_dir = Path(results_dir)
        self.trial_ref = trial_ref
        self.allow_imports = allow_imports
        self.workers = workers
        self.backend = backend
        self.address = address
        self.state_metric = state_metric
        self.progress = progress
        self.desc = desc
        self.measures = list(measures)
        self.records: dict[str, dict[str, Any] | None] = {}  # None: requested, not finished yet

    def run(self, trials: Sequence[Trial]) -> list[dict[str, Any]]:
        """Run the trials not yet finished ok; return every trial's record in the given order."""
        todo = []
        for trial in trials:
            previous = read_record(self.results_dir, trial.id)
            if previous is not None and previous.get("status") == "ok":
                self._check_same_config(previous, trial)
                self.records[trial.id] = self._measured(previous)
            else:
                self.records.setdefault(trial.id, None)
                todo.append(trial)
        if todo:
            bar = tqdm(total=len(todo), desc=self.desc, unit="trial", disable=not self.progress)
            stream = self._pool(todo) if self.backend == "pool" else self._ray(todo)
            for record in stream:
                record = self._measured(record)
                self.records[record["id"]] = record
                self._write_table()
                bar.set_postfix_str(f"{record['name']}: {record['status']}", refresh=False)
                bar.update()
            bar.close()
        self._write_table()
        return [self.records[trial.id] for trial in trials]

    def _check_same_config(self, record: dict[str, Any], trial: Trial) -> None:
        """A finished trial is reused only if it ran exactly this config (ids without a config hash, as
        named trials have, could otherwise reuse another config's run)."""
        if record.get("config") != stored_form(trial.config):
            raise ConfigError(f"{trial_dir(self.results_dir, trial.id)} holds a finished run of another "
                              "config; use another results directory or delete that trial's directory")

    def _measured(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` after the study's measures (``lowbit.studies.measures``)."""
        if pending_measures(self.trial_ref, self.measures, record):
            apply_measures(self.trial_ref, self.measures, record, trial_dir(self.results_dir, record["id"]))
            write_record(self.results_dir, record)
        return record

    def finished(self) -> list[dict[str, Any]]:
        """Records of every finished trial requested so far, in request order."""
        return [record for record in self.records.values() if record is not None]

    def _write_table(self) -> None:
        write_table(self.results_dir, self.finished())

    def _pool(self, trials: Sequence[Trial]) -> Iterator[dict[str, Any]]:
        """Run trials in fresh processes, ``workers`` at a time, each slot pinned to its cores."""
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD + [trial_module(self.trial_ref)])
        groups = core_groups(self.workers)
        free = list(range(len(groups)))
        pending = collections.deque(trials)
        running: dict[int, tuple[Any, Trial, int, float]] = {}
        try:
            while pending or running:
                while pending and free:
                    slot, trial = free.pop(0), pending.popleft()
                    (trial_dir(self.results_dir, trial.id) / "result.json").unlink(missing_ok=True)
                    process = context.Process(target=_pool_main, name=f"lowbit-trial-{trial.id}",
                                              args=(self.trial_ref, trial, str(self.results_dir),
                                                    groups[slot], self.state_metric))
                    process.start()
                    running[process.sentinel] = (process, trial, slot, time.perf_counter())
                for sentinel in multiprocessing.connection.wait(list(running)):
                    process, trial, slot, started = running.pop(sentinel)
                    process.join()
                    free.append(slot)
                    yield self._collect(trial, process.exitcode, time.perf_counter() - started)
        finally:
            for process, *_ in running.values():
                process.terminate()
                process.join()

    def _collect(self, trial: Trial, exitcode: int | None, seconds: float) -> dict[str, Any]:
        """The record a pool worker wrote, or a failed record when the process died first."""
        record = read_record(self.results_dir, trial.id)
        if record is None:
            log = trial_dir(self.results_dir, trial.id) / WORKER_LOG
            error = (f"worker process died (exit code {exitcode}) before the trial finished "
                     f"(out of memory or a native crash?); see {log}")
            record = failed_record(trial, error, seconds)
            write_record(self.results_dir, record)
        return record

    def _ray(self, trials: Sequence[Trial]) -> Iterator[dict[str, Any]]:
        """Run trials as Ray tasks, at most ``workers`` in flight, collecting them as they finish."""
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            self._ray_init(ray)
        try:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // self.workers)
            task = ray.remote(_ray_main).options(num_cpus=cpus, max_retries=0)
            pending = collections.deque(trials)
            running: dict[Any, tuple[Trial, float]] = {}
            while pending or running:
                while pending and len(running) < self.workers:
                    trial = pending.popleft()
                    ref = task.remote(self.trial_ref, trial, str(self.results_dir), cpus, self.state_metric)
                    running[ref] = (trial, time.perf_counter())
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    trial, begun = running.pop(ref)
                    try:
                        record = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        record = failed_record(trial, f"ray task failed: {str(exc).splitlines()[0]}",
                                               time.perf_counter() - begun)
                    write_record(self.results_dir, record)
                    yield record
        finally:
            if started_here:
                ray.shutdown()

    def _ray_init(self, ray: Any) -> None:
        """Connect to the cluster at ``address``, or start a local runtime on this process's cores."""
        import logging

        if self.address:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            return
        path = os.pathsep.join(p for p in sys.path if p)
        ray.init(num_cpus=len(available_cores()), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
