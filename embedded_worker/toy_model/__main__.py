"""`python -m embedded_worker.toy_model train --out DIR`: retrain the built-in shapes model.

Writes DIR/model (a diffusers folder, safetensors), DIR/loss.csv, DIR/loss.png
and DIR/training.json. Copy DIR/model over embedded_worker/toy_model/shapes
to ship it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .training import TrainingPlan, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedded_worker.toy_model", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("train", help="train the shapes pipeline on CPU")
    command.add_argument("--out", type=Path, required=True)
    for field in dataclasses.fields(TrainingPlan):
        command.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    plan = TrainingPlan(**{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingPlan)})
    train(args.out, plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
