"""Multi-precision search (seed 001 §4.2) and its per-layer mixed-precision extension.

Step 1 finds the lowest D bits that meet the quality target with G at full precision; step 2
the lowest G bits that meet it with that D. Each step scans the candidate bits from the lowest
up, ``workers`` candidates at a time, and stops at the first batch holding a passing one, so the
answer is the lowest passing bit-width whatever the batch size. The mixed mode then measures how
much lowering each G layer alone hurts (its sensitivity), and greedily lowers layers, least
sensitive first, keeping each change only while the target still holds. Every trial goes through
the study runner, so all of them are in the results table and a re-run resumes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from lowbit.config import unknown_name_error
from lowbit.errors import ConfigError
from lowbit.studies.execute import resolve_trial
from lowbit.studies.runner import StudyRunner
from lowbit.studies.spec import MixedSpec, SearchSpec, StudyConfig, Trial, make_trial
from lowbit.studies.store import dump_json

FULL_PRECISION = 32
DESCRIBERS = {"gan": "lowbit.studies.trials:generator_layers"}


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """What a weight layer costs: weight count, FLOPs (SPEC §5 formulas) and its input activation bits."""

    name: str
    params: int
    flops: int
    act_bits: int = FULL_PRECISION


def weight_bytes(layers: Sequence[LayerCost], bits: dict[str, int]) -> float:
    """Weight storage in bytes at the given per-layer bits (codes only; scales and biases excluded)."""
    return sum(layer.params * bits[layer.name] for layer in layers) / 8


def bops(layers: Sequence[LayerCost], bits: dict[str, int]) -> float:
    """Bit operations: sum over layers of FLOPs x weight bits x input-activation bits."""
    return float(sum(layer.flops * bits[layer.name] * layer.act_bits for layer in layers))


def describer(study: StudyConfig, allow_imports: bool = False) -> Callable[[dict[str, Any]], list[LayerCost]]:
    """The function listing the generator's weight layers for the trial kind of this study (an import-path
    trial's ``<function>_layers`` only with ``allow_imports``)."""
    ref = DESCRIBERS.get(study.trial, f"{study.trial}_layers" if ":" in study.trial else "")
    if not ref:
        raise unknown_name_error("layer describer for trial", study.trial, DESCRIBERS)
    return resolve_trial(ref, allow_imports)


def _config_key(trial: Trial) -> str:
    """Trials with equal configs give equal results: the first greedy try repeats a sensitivity probe."""
    return json.dumps(trial.config, sort_keys=True, default=str)


class PrecisionSearch:
    """The greedy D-then-G bit search of one study, run through a StudyRunner."""

    def __init__(self, study: StudyConfig, runner: StudyRunner) -> None:
        if study.search is None:
            raise ConfigError(f"study '{study.name}' has no 'search' section; add one or use 'axes'")
        self.study = study
        self.spec: SearchSpec = study.search
        self.runner = runner
        self.steps: list[dict[str, Any]] = []

    def score(self, record: dict[str, Any]) -> float:
        """The record's target metric (NaN when the trial failed or did not report it)."""
        value = record.get("metrics", {}).get(self.spec.metric) if record.get("status") == "ok" else None
        return float("nan") if value is None else float(value)

    def _step(self, phase: str, record: dict[str, Any], bits: int, layer: str | None = None) -> bool:
        """Log one search step; returns whether its score meets the target."""
        meets = self.spec.meets(self.score(record))
        self.steps.append({"phase": phase, "layer": layer, "bits": bits, "trial": record["id"],
                           "score": self.score(record), "meets": meets})
        return meets

    def _trial(self, params: dict[str, Any], overrides: dict[str, Any]) -> Trial:
        return make_trial(self.study.base, params, overrides)

    def _bit_overrides(self, d_bits: int, g_bits: int) -> dict[str, Any]:
        overrides = {key: d_bits for key in self.spec.d_keys}
        overrides.update({key: g_bits for key in self.spec.g_keys})
        return overrides

    def lowest_passing(self, phase: str, make: Callable[[int], Trial]) -> int | None:
        """Scan the candidate bits from the lowest up, ``workers`` at a time; the lowest passing one."""
        bits = self.spec.bits
        for start in range(0, len(bits), self.runner.workers):
            batch = bits[start:start + self.runner.workers]
            records = self.runner.run([make(b) for b in batch])
            meets = [self._step(phase, record, bits=b) for b, record in zip(batch, records, strict=True)]
            passing = [b for b, ok in zip(batch, meets, strict=True) if ok]
            if passing:
                return passing[0]
        return None

    def run(self) -> dict[str, Any]:
        """Run the whole search; write and return its summary (also saved as search.json)."""
        d_found = self.lowest_passing("d", lambda b: self._trial(
            {"phase": "d", "d_bits": b, "g_bits": FULL_PRECISION}, self._bit_overrides(b, FULL_PRECISION)))
        d_bits = d_found or FULL_PRECISION
        g_found = self.lowest_passing("g", lambda b: self._trial(
            {"phase": "g", "d_bits": d_bits, "g_bits": b}, self._bit_overrides(d_bits, b)))
        summary: dict[str, Any] = {"metric": self.spec.metric, "target": self.spec.target,
                                   "d_bits": d_found, "g_bits": g_found}
        if self.spec.mixed is not None and g_found is not None:
            base_score = next(s["score"] for s in self.steps if s["phase"] == "g" and s["bits"] == g_found)
            summary["mixed"] = self.mixed(self.spec.mixed, d_bits, g_found, base_score)
        summary["steps"] = self.steps
        dump_json(self.runner.results_dir / "search.json", summary)
        return summary

    def _mixed_trial(self, mixed: MixedSpec, phase: str, d_bits: int, g_bits: int,
                     layer_bits: dict[str, int]) -> Trial:
        overrides = self._bit_overrides(d_bits, g_bits)
        overrides[mixed.layer_key] = {name: {mixed.bits_field: b} for name, b in layer_bits.items()}
        label = ";".join(f"{name}:{b}" for name, b in layer_bits.items())
        return self._trial({"phase": phase, "d_bits": d_bits, "g_bits": g_bits, "layers": label}, overrides)

    def mixed(self, mixed: MixedSpec, d_bits: int, g_bits: int, base_score: float) -> dict[str, Any]:
        """Per-layer mode: lower the least sensitive G layers below ``g_bits`` while the target holds."""
        lower = sorted(b for b in mixed.bits if b < g_bits)
        layers = describer(self.study, self.runner.allow_imports)(self.make_base_config(d_bits, g_bits))
        uniform = {layer.name: g_bits for layer in layers}
        if not lower:
            return self._mixed_summary(layers, uniform, uniform, [], None)
        probes = [self._mixed_trial(mixed, "sensitivity", d_bits, g_bits, {layer.name: lower[0]})
                  for layer in layers]
        sensitivity = self.runner.run(probes)
        known = {_config_key(t): r for t, r in zip(probes, sensitivity, strict=True)}
        ranked = self._rank(layers, [self.score(r) for r in sensitivity], base_score, g_bits - lower[0])
        for layer, record in zip(layers, sensitivity, strict=True):
            self._step("sensitivity", record, bits=lower[0], layer=layer.name)
        chosen: dict[str, int] = {}
        best_score = None
        for layer in ranked:
            for b in lower:
                trial = self._mixed_trial(mixed, "mixed", d_bits, g_bits, {**chosen, layer.name: b})
                record = known.get(_config_key(trial)) or self.runner.run([trial])[0]
                if self._step("mixed", record, bits=b, layer=layer.name):
                    chosen[layer.name] = b
                    best_score = self.score(record)
                    break
        return self._mixed_summary(layers, uniform, {**uniform, **chosen}, ranked, best_score)

    def make_base_config(self, d_bits: int, g_bits: int) -> dict[str, Any]:
        """The trial config at uniform (d_bits, g_bits), as the layer describer sees it."""
        return self._trial({}, self._bit_overrides(d_bits, g_bits)).config

    def _rank(self, layers: Sequence[LayerCost], scores: Sequence[float], base_score: float,
              saved_bits: int) -> list[LayerCost]:
        """Layers ordered by score lost per weight bit saved (least sensitive first; failed ones last)."""
        sign = 1.0 if self.spec.metric == "fid" else -1.0

        def cost(item: tuple[LayerCost, float]) -> float:
            layer, score = item
            if score != score:
                return float("inf")
            return sign * (score - base_score) / max(layer.params * saved_bits, 1)

        return [layer for layer, _ in sorted(zip(layers, scores, strict=True), key=cost)]

    def _mixed_summary(self, layers: Sequence[LayerCost], uniform: dict[str, int], chosen: dict[str, int],
                       order: Sequence[LayerCost], score: float | None) -> dict[str, Any]:
        fp = {layer.name: FULL_PRECISION for layer in layers}
        return {
            "layer_bits": chosen,
            "order": [layer.name for layer in order],
            "score": score,
            "bytes": weight_bytes(layers, chosen), "bytes_uniform": weight_bytes(layers, uniform),
            "bytes_fp32": weight_bytes(layers, fp),
            "bops": bops(layers, chosen), "bops_uniform": bops(layers, uniform),
            "bops_fp32": bops(layers, fp),
            "layers": [dataclasses.asdict(layer) for layer in layers],
        }
