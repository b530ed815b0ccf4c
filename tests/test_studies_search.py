"""Multi-precision search on a mocked evaluator with a known answer, and BOPs / size accounting."""

from __future__ import annotations

import itertools
import json

import pytest

from lowbit.report.studies import build_study_page
from lowbit.studies import StudyConfig, run_study
from lowbit.studies.search import LayerCost, bops, weight_bytes
from lowbit.studies.spec import MixedSpec, SearchSpec

BASE_FID = 10.0
LAYER_PENALTY_1BIT = {"main.0": 0.5, "main.3": 30.0, "main.6": 1.0}
LAYERS = [LayerCost("main.0", params=100, flops=4000, act_bits=32),
          LayerCost("main.3", params=1000, flops=90000, act_bits=1),
          LayerCost("main.6", params=50, flops=7000, act_bits=1)]


def mock_fid(d_bits: int, g_bits: int, layer_bits: dict[str, int]) -> float:
    """A known quality surface: D fails below 3 bits, G below 2, each layer at 1 bit adds a fixed penalty."""
    fid = BASE_FID + (200.0 if d_bits < 3 else 0.0)
    fid += 100.0 if g_bits < 2 else (5.0 if g_bits == 2 else 0.0)
    return fid + sum(LAYER_PENALTY_1BIT[name] for name, bits in layer_bits.items() if bits == 1)


def mock_gan(config: dict, out_dir) -> dict:
    """The mocked evaluator: reads the bits the search set and returns the known FID."""
    with open(out_dir / "calls.txt", "a") as handle:
        handle.write("call\n")
    train = config["train"]
    overrides = train["g_quant"].get("overrides", {})
    layer_bits = {name: spec["weight_bits"] for name, spec in overrides.items()}
    fid = mock_fid(train["d_quant"]["weight_bits"], train["g_quant"]["weight_bits"], layer_bits)
    return {"fid": fid, "history": [{"step": 0, "fid": fid}]}


def mock_gan_layers(config: dict) -> list[LayerCost]:
    """Layer describer of the mocked trial (the generator's weight layers)."""
    return LAYERS


def _study(tmp_path, target: float, bits: list[int]) -> StudyConfig:
    base = {"train": {"d_quant": {"weight_bits": 32}, "g_quant": {"weight_bits": 32}}}
    return StudyConfig(name="search", trial="test_studies_search:mock_gan", base=base,
                       search=SearchSpec(target=target, bits=bits, mixed=MixedSpec(bits=[1])),
                       out_dir=str(tmp_path / "search"))


def test_weight_bytes_and_bops_follow_their_formulas():
    bits = {"main.0": 8, "main.3": 2, "main.6": 1}
    assert weight_bytes(LAYERS, bits) == (100 * 8 + 1000 * 2 + 50 * 1) / 8
    assert bops(LAYERS, bits) == 4000 * 8 * 32 + 90000 * 2 * 1 + 7000 * 1 * 1


def test_search_finds_the_known_lowest_bits_and_layer_mix(tmp_path):
    target, candidates = 20.0, [1, 2, 3, 4, 5, 6, 7, 8]
    records = run_study(_study(tmp_path, target, candidates), workers=2, progress=False, allow_imports=True)
    summary = json.loads((tmp_path / "search" / "search.json").read_text())

    expected_d = min(b for b in candidates if mock_fid(b, 32, {}) <= target)
    expected_g = min(b for b in candidates if mock_fid(expected_d, b, {}) <= target)
    assert (summary["d_bits"], summary["g_bits"]) == (expected_d, expected_g) == (3, 2)

    names = [layer.name for layer in LAYERS]
    assignments = [dict(zip(names, combo, strict=True))
                   for combo in itertools.product([1, expected_g], repeat=len(names))]
    feasible = [bits for bits in assignments if mock_fid(expected_d, expected_g, bits) <= target]
    smallest = min(feasible, key=lambda bits: weight_bytes(LAYERS, bits))
    mixed = summary["mixed"]
    assert mixed["layer_bits"] == smallest == {"main.0": 1, "main.3": 2, "main.6": 1}
    assert mixed["order"] == ["main.0", "main.6", "main.3"]
    assert mixed["bytes"] == weight_bytes(LAYERS, smallest)
    assert mixed["bops"] == bops(LAYERS, smallest)
    assert mixed["bytes_uniform"] == weight_bytes(LAYERS, dict.fromkeys(names, 2))
    assert mixed["score"] == pytest.approx(mock_fid(3, 2, smallest))

    phases = [r["params"]["phase"] for r in records]
    assert phases.count("d") == 4 and phases.count("g") == 2  # batches of 2: d in {1,2},{3,4}; g in {1,2}
    # the first greedy try (main.0 at 1 bit alone) is the sensitivity probe's config: reused, not re-run
    assert phases.count("sensitivity") == 3 and phases.count("mixed") == 2
    assert [s["phase"] for s in summary["steps"]].count("mixed") == 3
    assert all(r["status"] == "ok" for r in records)
    assert all(step["meets"] == (step["score"] <= target) for step in summary["steps"])

    html = build_study_page(tmp_path / "search").read_text()
    assert "Lowest D bits with G at full precision: 3; lowest G bits with that D: 2." in html
    assert f"<td>mixed</td><td>{weight_bytes(LAYERS, smallest):.4g}</td>" in html
    assert html.count("<img ") == 2  # FID against D / G bits, FID curves

    again = run_study(_study(tmp_path, target, candidates), workers=2, progress=False, allow_imports=True)
    assert len(again) == len(records)
    for record in again:
        calls = tmp_path / "search" / "trials" / record["id"] / "calls.txt"
        assert len(calls.read_text().splitlines()) == 1


def test_search_keeps_full_precision_when_no_bits_meet_the_target(tmp_path):
    run_study(_study(tmp_path, target=50.0, bits=[1, 2]), workers=1, progress=False, allow_imports=True)
    summary = json.loads((tmp_path / "search" / "search.json").read_text())
    assert summary["d_bits"] is None
    assert summary["g_bits"] == 2  # searched with D at full precision: 10 + 5 <= 50
    assert [(s["phase"], s["bits"]) for s in summary["steps"][:4]] == [("d", 1), ("d", 2), ("g", 1), ("g", 2)]
