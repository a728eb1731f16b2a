"""Train the demo ensembles' members on generated data and save their weights where ensembles.yaml says.

Usage: python -m archive_scripts.train_demo [--ensemble shapes] [--config ensembles.yaml]

Three demos: `shapes` (binary: is there a triangle?), `multishape` (multilabel, in the CheXNet mould:
which of five kinds of shapes are in the image?) and `digits` (multiclass, on scikit-learn's real
handwriting: a timm member, a Hugging Face ViT published with save_pretrained, and one of our own). Each member is trained on the tensors the serving
code itself produces (`handlers.inputs.images`), so training and serving see identical inputs. The
multilabel demo writes each member's checkpoint in a different published layout (DataParallel,
Lightning-style, safetensors), read back by its `state_dict:` rules in ensembles.yaml. Nothing is
downloaded; every run with the same seeds gives the same data.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archive_scripts.checkpoint_layouts import LAYOUTS
from archive_scripts.demo_data import LABELS, MULTILABEL_LABELS, POSITIVE, make_multilabel_split, make_split
from archive_scripts.digits_demo import LABELS as DIGIT_LABELS
from archive_scripts.digits_demo import split as digits_split
from archive_scripts.digits_demo import vit as digits_vit
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec, MemberSpec
from handlers.execution.outputs import pick
from handlers.inputs.images import batch_tensors
from handlers.weights.loading import build_member

TRAIN_SEED = 20261125


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings for one member, and the published layout its checkpoint is written in."""

    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 64
    layout: str | None = None
    # A member whose architecture is written by training itself (a Hugging Face folder's config.json) is created here.
    create: Callable[[], nn.Module] | None = None


@dataclass(frozen=True)
class Demo:
    """What one demo ensemble learns from: its labels, generated images with targets, loss and recipes."""

    labels: tuple[str, ...]
    positive_label: str | None
    samples: Callable[[int, int], Sequence[Any]]
    targets: Callable[[Sequence[Any]], torch.Tensor]
    loss: Callable[[], nn.Module]
    train_size: int
    recipes: dict[str, Recipe] = field(default_factory=dict)


DEMOS = {
    "shapes": Demo(
        labels=LABELS,
        positive_label=POSITIVE,
        samples=make_split,
        targets=lambda samples: torch.tensor([s.label for s in samples]),
        loss=nn.CrossEntropyLoss,
        train_size=4000,
        recipes={"resnet18": Recipe(epochs=5), "strided": Recipe(epochs=10), "tinycnn_gray": Recipe(epochs=8)},
    ),
    "multishape": Demo(
        labels=MULTILABEL_LABELS,
        positive_label=None,
        samples=make_multilabel_split,
        targets=lambda samples: torch.tensor([s.labels for s in samples], dtype=torch.float32),
        # Weighted as CheXNet's loss is: each label is absent 1.5 times as often as present.
        loss=lambda: nn.BCEWithLogitsLoss(pos_weight=torch.full((len(MULTILABEL_LABELS),), 1.5)),
        train_size=3000,
        recipes={
            "mobilenet": Recipe(epochs=4, lr=1e-2, batch_size=64, layout="data_parallel"),
            "strided": Recipe(epochs=8, lr=1e-2, batch_size=16, layout="safetensors"),
            "tinycnn_gray": Recipe(epochs=3, lr=1e-2, batch_size=16, layout="lightning"),
        },
    ),
    "digits": Demo(
        labels=DIGIT_LABELS,
        positive_label=None,
        samples=lambda count, seed: digits_split()[0],
        targets=lambda samples: torch.tensor([s.label for s in samples]),
        loss=nn.CrossEntropyLoss,
        train_size=0,
        recipes={
            "timm_resnet": Recipe(epochs=10),
            "vit": Recipe(epochs=30, layout="hugging_face", create=digits_vit),
            "tinycnn": Recipe(epochs=15),
        },
    ),
}


def train(spec: EnsembleSpec, *, threads: int) -> dict[str, float]:
    """Train every member of `spec` (a demo of DEMOS), write its weights, and return seconds spent per member."""
    demo = DEMOS[spec.name]
    if spec.labels != demo.labels or spec.positive_label != demo.positive_label:
        raise SystemExit(f"{spec.name}: the demo data has labels {demo.labels} with positive {demo.positive_label!r}")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    samples = demo.samples(demo.train_size, TRAIN_SEED)
    targets = demo.targets(samples)
    specs = [spec.member_input(m) for m in spec.members]
    inputs = batch_tensors([s.image for s in samples], specs)
    print(f"{spec.name}: generated {len(samples)} training images in {time.perf_counter() - start:.1f}s", flush=True)
    seconds = {}
    for index, (member, member_input) in enumerate(zip(spec.members, specs, strict=True)):
        start = time.perf_counter()
        torch.manual_seed(TRAIN_SEED + index)
        recipe = demo.recipes.get(member.name, Recipe())
        module = recipe.create() if recipe.create else build_member(member, spec.base_dir)
        scores = lambda batch, module=module, member=member: pick(module(batch), member.output.select)  # noqa: E731
        _fit(module, scores, inputs[member_input], targets, recipe, demo.loss(), label=f"{spec.name}/{member.name}")
        _save(module, member, spec.base_dir, recipe)
        seconds[member.name] = time.perf_counter() - start
        print(f"trained {member.name} ({member.arch}) in {seconds[member.name]:.1f}s -> {member.weights}", flush=True)
    return seconds


def _fit(
    module: nn.Module,
    scores: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    recipe: Recipe,
    loss_fn: nn.Module,
    *,
    label: str,
) -> None:
    """Train `module` on `scores` (its forward's output, selected as the member's `output:` says)."""
    optimiser = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=1e-4)
    steps = recipe.epochs * -(-len(inputs) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, total_steps=steps)
    module.train()
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(inputs))
        total, batches = 0.0, 0
        for batch in order.split(recipe.batch_size):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(scores(inputs[batch]), targets[batch])
            loss.backward()
            optimiser.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        print(f"  {label}: epoch {epoch + 1}/{recipe.epochs}, loss {total / batches:.3f}, {time.perf_counter() - start:.1f}s", flush=True)
    module.eval()


def _save(module: nn.Module, member: MemberSpec, base_dir: Path, recipe: Recipe) -> None:
    """Write the weights in the recipe's layout; its rules must be the ones ensembles.yaml gives the member."""
    path = base_dir / member.weights
    path.parent.mkdir(parents=True, exist_ok=True)
    if recipe.layout is None:
        torch.save(module.state_dict(), path)
        rules: dict[str, Any] = {}
    else:
        rules = LAYOUTS[recipe.layout](module, path)
    if rules != member.state_dict.to_dict():
        raise SystemExit(
            f"member {member.name!r}: its {recipe.layout or 'plain'} checkpoint reads back with state_dict: {rules}, "
            f"but ensembles.yaml gives {member.state_dict.to_dict()}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--ensemble", action="append", choices=sorted(DEMOS), help="default: every demo")
    parser.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    args = parser.parse_args()
    specs = load_ensembles(args.config, check_files=False)
    for name in args.ensemble or list(DEMOS):
        total = sum(train(specs[name], threads=args.threads).values())
        print(f"trained {len(specs[name].members)} members of {name} in {total:.1f}s", flush=True)


if __name__ == "__main__":
    main()
