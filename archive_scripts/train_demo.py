"""Train the demo ensemble's members on generated data and save their state_dicts where ensembles.yaml says.

Usage: python -m archive_scripts.train_demo [--ensemble shapes] [--config ensembles.yaml]

Each member is trained on the tensors the serving code itself produces (`handlers.preprocess`), so
training and serving see identical inputs. Nothing is downloaded; every run with the same seeds
gives the same data.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from archive_scripts.demo_data import LABELS, POSITIVE, make_split
from handlers.manifest import EnsembleSpec, load_ensembles
from handlers.members import build_member
from handlers.preprocess import batch_tensors

TRAIN_SEED = 20261125
TRAIN_SIZE = 4000


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings for one member; small enough that the whole demo trains in about a minute."""

    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 64


RECIPES = {"resnet18": Recipe(epochs=5), "strided": Recipe(epochs=10), "tinycnn_gray": Recipe(epochs=8)}


def train(spec: EnsembleSpec, *, threads: int) -> dict[str, float]:
    """Train every member of `spec`, write its weights, and return seconds spent per member."""
    if tuple(spec.labels) != LABELS or spec.positive_label != POSITIVE:
        raise SystemExit(f"{spec.name}: the demo data has labels {LABELS} with positive {POSITIVE!r}")
    torch.set_num_threads(threads)
    samples = make_split(TRAIN_SIZE, TRAIN_SEED)
    targets = torch.tensor([s.label for s in samples])
    specs = [spec.member_input(m) for m in spec.members]
    inputs = batch_tensors([s.image for s in samples], specs)
    seconds = {}
    for index, (member, member_input) in enumerate(zip(spec.members, specs, strict=True)):
        start = time.perf_counter()
        torch.manual_seed(TRAIN_SEED + index)
        module = build_member(member, spec.base_dir)
        _fit(module, inputs[member_input], targets, RECIPES.get(member.name, Recipe()))
        path = spec.base_dir / member.weights
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path)
        seconds[member.name] = time.perf_counter() - start
        print(f"trained {member.name} ({member.arch}) in {seconds[member.name]:.1f}s -> {member.weights}", flush=True)
    return seconds


def _fit(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, recipe: Recipe) -> None:
    optimiser = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=1e-4)
    steps = recipe.epochs * -(-len(inputs) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(inputs))
        for batch in order.split(recipe.batch_size):
            optimiser.zero_grad(set_to_none=True)
            loss_fn(module(inputs[batch]), targets[batch]).backward()
            optimiser.step()
            schedule.step()
    module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--ensemble", default="shapes")
    parser.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    args = parser.parse_args()
    spec = load_ensembles(args.config, check_files=False)[args.ensemble]
    total = sum(train(spec, threads=args.threads).values())
    print(f"trained {len(spec.members)} members of {spec.name} in {total:.1f}s")


if __name__ == "__main__":
    main()
