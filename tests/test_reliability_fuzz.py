"""Bounded fuzzing (a few seconds): random damage to a checkpoint and its sidecar, and random YAML mutations
of a shipped config. Every case must end in success or one clean `error:` line (exit code 2) - a
traceback, a bare exception or a hang (over 20 s) fails the test and prints the case to replay."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.config import from_dict, load_config, to_dict
from lowbit.errors import LowbitError
from lowbit.pipeline import RunConfig, _validate
from lowbit.train.checkpoint import save_checkpoint
from lowbit.train.gan import GanConfig
from lowbit.train.networks import CHECKPOINT_KIND, build_networks
from tiny_gan import tiny_gan

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "dcgan-mnist-w4a1.yaml"
CASES = 120  # per fuzz test at most; after MIN_CASES it stops early once its time budget is spent
MIN_CASES = 15
BUDGET_S = 4.0
HANG_S = 20

TOKENS = ["-1", "0", "1", ".nan", ".inf", "-.inf", "1e309", "99999999999999999999", "null", "~", "[]", "{}",
          "'x'", "true", "&a [1, 2]", "*a", "!!python/object/apply:os.system ['true']", "[[[[", "{a: ",
          "\"\\x00\"", "-0.0", "2", "em", "sign", "[1, [2, [3]]]", "{weight: em}", "&b {x: *b}"]


@contextlib.contextmanager
def deadline(seconds: int, case: str) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"hang (> {seconds} s) on {case}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(cases: Callable[[random.Random], Iterator[tuple[str, Callable[[], None]]]], seed: int) -> int:
    """Run generated cases (at least MIN_CASES, then until CASES or BUDGET_S); each may succeed or raise
    a LowbitError only. Returns how many ran."""
    rng, start, count = random.Random(seed), time.monotonic(), 0
    for case, run in cases(rng):
        if count >= CASES or (count >= MIN_CASES and time.monotonic() - start > BUDGET_S):
            break
        with deadline(HANG_S, case):
            try:
                run()
            except LowbitError:
                pass
            except Exception as exc:  # noqa: BLE001 - the point: report which case escaped
                raise AssertionError(f"{case}: {type(exc).__name__}: {exc}") from exc
        count += 1
    return count


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real tiny GAN model file (untrained weights) to damage."""
    cfg = from_dict(GanConfig, tiny_gan())
    generator, discriminator = build_networks(cfg)
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    return save_checkpoint(path, {"kind": CHECKPOINT_KIND, "config": to_dict(cfg), "step": 0, "history": [],
                                  "generator": generator.state_dict(),
                                  "discriminator": discriminator.state_dict()})


def flip(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1-4 random bytes replaced, or cut at a random length."""
    if rng.random() < 0.25:
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def mutate_json(node, rng: random.Random, depth: int = 0):
    """A copy of a JSON value with one random sub-value replaced, removed or deeply nested."""
    replacements = [None, -1, 0, 1e308, "x", [], {}, {"__tensor__": "nope"}, {"__dict__": 5},
                    {"__tuple__": {}}, [[[[[1]]]]], True, {"__dict__": [[[1], 2]]}]
    if isinstance(node, (dict, list)) and node and rng.random() < 0.85 - 0.05 * depth:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = rng.choice(keys)
        copy = dict(node) if isinstance(node, dict) else list(node)
        if rng.random() < 0.15:
            del copy[key]
        else:
            copy[key] = mutate_json(node[key], rng, depth + 1)
        return copy
    return rng.choice(replacements)


def checkpoint_cases(model: Path, work: Path) -> Callable[[random.Random], Iterator[tuple[str, Callable]]]:
    tensors, sidecar = model.read_bytes(), json.loads(model.with_suffix(".json").read_text())

    def generate(tensor_bytes: bytes, side_text: str) -> None:
        (work / "m.safetensors").write_bytes(tensor_bytes)
        (work / "m.json").write_text(side_text, encoding="utf-8", errors="surrogateescape")
        code = main(["generate", str(work / "m.safetensors"), "-n", "2", "-o", str(work / "g.png")])
        assert code in (0, 2)

    def cases(rng: random.Random) -> Iterator[tuple[str, Callable]]:
        while True:
            kind = rng.choice(["sidecar bytes", "sidecar json", "tensor bytes"])
            if kind == "sidecar bytes":
                text = flip(json.dumps(sidecar).encode(), rng).decode("utf-8", "surrogateescape")
                yield kind, lambda t=text: generate(tensors, t)
            elif kind == "sidecar json":
                meta = mutate_json(sidecar, rng)
                yield f"{kind} {json.dumps(meta)[:300]}", lambda m=meta: generate(tensors, json.dumps(m))
            else:
                damaged = flip(tensors, rng)
                meta = {**sidecar, "sha256": hashlib.sha256(damaged).hexdigest()}  # past the checksum
                yield kind, lambda d=damaged, m=meta: generate(d, json.dumps(m))

    return cases


def test_fuzzed_checkpoints_end_in_success_or_a_clean_error(model_file, tmp_path, capsys):
    count = fuzz(checkpoint_cases(model_file, tmp_path), seed=18)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert count >= MIN_CASES
    assert all(line.startswith("error: ") for line in errors), errors[:5]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ configs


def mutate_yaml(text: str, rng: random.Random) -> bytes:
    """``text`` after 1-3 random line edits (drop, duplicate, re-indent, new value, new key) or byte flips."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(lines))
        line, action = lines[index], rng.choice(["drop", "dup", "indent", "value", "value", "key", "bytes"])
        if action == "drop":
            del lines[index]
        elif action == "dup":
            lines.insert(index, line)
        elif action == "indent":
            lines[index] = " " * rng.choice([1, 2, 4]) + line
        elif action == "value" and ":" in line:
            lines[index] = line.split(":", 1)[0] + ": " + rng.choice(TOKENS)
        elif action == "key":
            lines.insert(index, rng.choice(["foo: 1", "qat: {steps: -5}", "eval: {samples: 10000000000}",
                                            "generator_quant: {weight: em, weight_bits: 0}", "<<: *a"]))
        if not lines:
            lines = [""]
    data = "\n".join(lines).encode("utf-8")
    return flip(data, rng) if rng.random() < 0.15 else data


def config_cases(work: Path) -> Callable[[random.Random], Iterator[tuple[str, Callable]]]:
    text = SHIPPED.read_text()

    def validate(data: bytes) -> None:
        path = work / "mutant.yaml"
        path.write_bytes(data)
        _validate(load_config(RunConfig, path))  # everything `lowbit run` checks before it writes

    def cases(rng: random.Random) -> Iterator[tuple[str, Callable]]:
        while True:
            data = mutate_yaml(text, rng)
            yield f"config {data[:2000]!r}", lambda d=data: validate(d)

    return cases


def test_fuzzed_configs_end_in_success_or_a_clean_error(tmp_path):
    torch.manual_seed(0)
    assert fuzz(config_cases(tmp_path), seed=18) >= MIN_CASES


def test_a_fuzzed_config_fails_cleanly_through_the_cli(tmp_path, capsys):
    """The CLI turns such a mutant into one error line (a shipped config with a python tag)."""
    mutant = tmp_path / "mutant.yaml"
    mutant.write_text(SHIPPED.read_text().replace("export: true", "export: !!python/name:os.system"))
    assert main(["run", str(mutant)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no tags" in err
