"""Full vs centered search logits under SGD and Adam, on a regression with a known best assignment.

Each seed draws 12 target codes over the pow2-2 values {-1, -1/2, 1/2, 1}, 256 Gaussian inputs and
their exact targets; a 12-weight ``QuantLinear`` search layer (scale 1) starts from random float
weights and trains on the mean squared error until its picked codes equal the targets (solved) or
the step budget runs out. Prints, per mode x optimiser x logits layout, how many seeds were solved
and the median number of steps. Not a test (about 30 s); run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_logits.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lowbit.nn import QuantLinear

VALUES = torch.tensor([-1.0, -0.5, 0.5, 1.0])
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def steps_to_solve(seed: int, mode: str, optimizer: str, logits: str, lr: float, budget: int) -> int | None:
    """Steps until the layer picks every target code, or None within ``budget`` steps."""
    gen = torch.Generator().manual_seed(seed)
    target_codes = torch.randint(0, len(VALUES), (12,), generator=gen)
    inputs = torch.randn(256, 12, generator=gen)
    targets = inputs @ VALUES[target_codes]
    torch.manual_seed(seed)
    layer = QuantLinear(12, 1, bias=False, method="search", bits=2,
                        opts={"scale": 1.0, "mode": mode, "logits": logits})
    quantizer = layer.weight_quantizer
    opt = OPTIMIZERS[optimizer]([quantizer.logits], lr=lr)
    for step in range(1, budget + 1):
        opt.zero_grad()
        (layer(inputs)[:, 0] - targets).square().mean().backward()
        opt.step()
        if torch.equal(quantizer.value_logits().detach().argmax(dim=0)[0], target_codes):
            return step
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=400, help="steps per run")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| mode | optimiser | logits | solved | median steps |")
    print("| --- | --- | --- | --- | --- |")
    for mode in ("rdhs", "sgt"):
        for optimizer in OPTIMIZERS:
            for logits in ("full", "centered"):
                runs = [steps_to_solve(seed, mode, optimizer, logits, args.lr, args.budget)
                        for seed in range(args.seeds)]
                solved = [r for r in runs if r is not None]
                median = f"{statistics.median(solved):.0f}" if solved else "-"
                print(f"| {mode} | {optimizer} | {logits} | {len(solved)}/{args.seeds} | {median} |")


if __name__ == "__main__":
    main()
