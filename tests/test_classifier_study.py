"""Classifier studies (seed 002 Tables 1/3/4 shape): trial configs, reuse of finished runs,
ratios against the reference trial and the CLI, on a tiny digits setup."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from lowbit import cli
from lowbit.commands.classify import ClassifierStudy, summarize, trial_config
from lowbit.config import from_dict
from lowbit.errors import ConfigError

BASE = {"model": "extractor-8", "kwargs": {"feature_dim": 16}, "data": {"dataset": "digits", "limit": 300},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0}, "epochs": 2, "batch_size": 64,
        "threads": 1}
TRIALS = {"fp": {}, "sgt-w1": {"init_from": "@fp", "epochs": 1,
                               "quant": {"weight": "search", "weight_bits": 1,
                                         "weight_opts": {"scale": 1.0, "mode": "sgt"}}}}


def test_trial_config_merges_overrides_and_resolves_trial_references(tmp_path):
    study = from_dict(ClassifierStudy, {"name": "s", "base": "b.yaml", "trials": TRIALS, "seeds": [4]})
    cfg = trial_config(study, BASE, "sgt-w1", 4, tmp_path)
    assert cfg.init_from == str(tmp_path / "fp-s4" / "model.safetensors")
    assert cfg.seed == 4 and cfg.epochs == 1 and cfg.data.limit == 300 and cfg.optim.name == "adam"
    assert cfg.quant.weight_opts["mode"] == "sgt" and cfg.name == "sgt-w1-s4"
    bad = from_dict(ClassifierStudy, {"name": "s", "base": "b",
                                      "trials": {"fp": {}, "x": {"init_from": "@y"}}})
    with pytest.raises(ConfigError, match="names no trial"):
        trial_config(bad, BASE, "x", 0, tmp_path)
    typo = from_dict(ClassifierStudy, {"name": "s", "base": "b", "trials": {"fp": {}, "x": {"epoch": 1}}})
    with pytest.raises(ConfigError, match=r"'trials\.x\.epoch' \(did you mean 'epochs'"):
        trial_config(typo, BASE, "x", 0, tmp_path)
    shared = from_dict(ClassifierStudy, {"name": "s", "base": "b", "seeds": [0, 4],
                                         "trials": {"fp": {"seeds": [0]}, **{"sgt-w1": TRIALS["sgt-w1"]}}})
    assert shared.trial_seeds("fp") == [0] and shared.trial_seeds("sgt-w1") == [0, 4]
    assert trial_config(shared, BASE, "sgt-w1", 4, tmp_path).init_from == str(tmp_path / "fp-s0" /
                                                                              "model.safetensors")
    with pytest.raises(ConfigError, match="runs none of the study seeds"):
        from_dict(ClassifierStudy, {"name": "s", "base": "b", "trials": {"fp": {"seeds": [7]}}})
    with pytest.raises(ConfigError, match="reference"):
        from_dict(ClassifierStudy, {"name": "s", "base": "b.yaml", "trials": {"a": {}}})


def test_summary_averages_and_picks_the_best_seed():
    rows = [{"trial": "t", "method": "m", "seed": s, "top1": a, "top5": 99.0, "delta_top1": d,
             "test_loss": 0.5, "time_ratio": 1.5, "memory_ratio": r, "multiplication_free": True}
            for s, a, d, r in [(0, 80.0, 2.0, 1.2), (1, 90.0, 1.0, 1.4)]]
    (row,) = summarize(rows)
    assert row["avg_top1"] == 85.0 and row["best_top1"] == 90.0 and row["avg_delta_top1"] == 1.5
    assert row["memory_ratio"] == pytest.approx(1.3) and row["seeds"] == 2


def test_study_cli_runs_trials_writes_tables_and_reuses_finished_runs(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "tiny-study", "base": "base.yaml", "trials": TRIALS}))
    out = tmp_path / "out"
    assert cli.main(["classifier-study", str(study), "--out", str(out), "--quiet"]) == 0
    assert "sgt-w1" in capsys.readouterr().out
    with open(out / "tiny-study.csv") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    fp, sgt = rows["fp"], rows["sgt-w1"]
    assert float(fp["time_ratio"]) == float(fp["memory_ratio"]) == 1.0 and float(fp["delta_top1"]) == 0
    assert float(sgt["delta_top1"]) == pytest.approx(float(fp["top1"]) - float(sgt["top1"]))
    assert sgt["multiplication_free"] == "True" and fp["multiplication_free"] == "False"
    assert float(sgt["top1"]) > 30.0  # chance is 10%
    sgt_metrics = json.loads((out / "sgt-w1-s0" / "metrics.json").read_text())
    assert float(sgt["memory_ratio"]) == pytest.approx(sgt_metrics["peak_train_bytes"] / json.loads(
        (out / "fp-s0" / "metrics.json").read_text())["peak_train_bytes"])
    assert (out / "tiny-study.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tiny-study-summary.csv").is_file()
    assert json.loads((out / "tiny-study.json").read_text())[1]["trial"] == "sgt-w1"
    stamp = (out / "fp-s0" / "metrics.json").stat().st_mtime_ns
    assert cli.main(["classifier-study", str(study), "--out", str(out), "--quiet"]) == 0  # reuses both runs
    assert (out / "fp-s0" / "metrics.json").stat().st_mtime_ns == stamp
    code = cli.main(["classifier-study", str(study), "--out", str(out), "--quiet",
                     "--set", "trials.fp.epochs=3"])
    assert code == 2 and "another config" in capsys.readouterr().err
