"""Copy a finished training run's model file into the model hub (``lowbit/assets/pretrained``) with its card.

    python scripts/ship_pretrained.py RUN_DIR NAME --command "the training command" [--minutes M]

The card (``NAME.card.json``) records the command, the training time and the FP test-split scores
(``lowbit.metrics.evaluate`` on the run's dataset), so the hub's listing says how each asset was made.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lowbit.models import hub
from lowbit.train.gan import checkpoint_config, load_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--command", required=True)
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock training time")
    parser.add_argument("--samples", type=int, default=10_000, help="evaluation samples")
    args = parser.parse_args()
    from lowbit.metrics import evaluate

    source = args.run_dir / "model.safetensors"
    cfg = checkpoint_config(source)
    scores = evaluate(load_generator(source), cfg.data.dataset, n=args.samples, progress=False)
    target = hub.asset_dir("pretrained") / f"{args.name}.safetensors"
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(source.with_suffix(suffix), target.with_suffix(suffix))
        target.with_suffix(suffix).chmod(0o644)
    card = {"name": args.name, "dataset": cfg.data.dataset, "generator": cfg.generator.model,
            "generator_kwargs": cfg.generator.kwargs, "discriminator": cfg.discriminator.model,
            "steps": cfg.steps, "command": args.command, "train_minutes": args.minutes,
            "scores": scores, "scored_on": f"{cfg.data.dataset} test split, n={scores['n']}"}
    card_path = target.parent / f"{args.name}{hub.CARD_SUFFIX}"
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    card_path.chmod(0o644)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
