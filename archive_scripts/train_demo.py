"""Train the demo ensembles' members on generated data and save their weights where ensembles.yaml says.

Usage: python -m archive_scripts.train_demo [--ensemble shapes] [--config ensembles.yaml] [--record-digests]

Three demos: `shapes` (binary: is there a triangle?), `multishape` (multilabel, in the CheXNet mould:
which of five kinds of shapes are in the image?) and `digits` (multiclass, on scikit-learn's real
handwriting: a timm member, a Hugging Face ViT published with save_pretrained, and one of our own). Each member is
trained on the tensors the serving code itself produces (`handlers.inputs.images`), so training and serving see
identical inputs. The multilabel demo writes each member's checkpoint in a different published layout
(DataParallel, Lightning-style, safetensors), read back by its `state_dict:` rules in ensembles.yaml. Nothing is
downloaded; every run with the same seeds gives the same data.

Training runs under pinned kernels (`archive_scripts.pinned_kernels`), so every x86-64 CPU with AVX2 trains
the same weights bit for bit; the script restarts itself under them. What it trained is then checked
against the digests committed in `archive_scripts/demo_weights.json` (`archive_scripts.demo_weights`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archive_scripts import demo_weights, pinned_kernels
from archive_scripts.checkpoint_layouts import LAYOUTS
from archive_scripts.demo_data import LABELS, MULTILABEL_LABELS, POSITIVE, make_multilabel_split, make_split
from archive_scripts.digits_demo import LABELS as DIGIT_LABELS
from archive_scripts.digits_demo import split as digits_split
from archive_scripts.digits_demo import vit as digits_vit
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec, InputSpec, MemberSpec
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


@dataclass(frozen=True)
class Trained:
    """One member as training left it: seconds spent and the digest of its tensors (demo_weights.state_digest)."""

    seconds: float
    digest: str


def train(spec: EnsembleSpec, *, save: bool = True) -> dict[str, Trained]:
    """Train every member of `spec` (a demo of DEMOS), write its weights unless `save` is False, and return each one's
    seconds and digest. The caller chooses the kernels and threads (pinned_kernels.apply, or torch's defaults)."""
    demo = DEMOS[spec.name]
    if spec.labels != demo.labels or spec.positive_label != demo.positive_label:
        raise SystemExit(f"{spec.name}: the demo data has labels {demo.labels} with positive {demo.positive_label!r}")
    start = time.perf_counter()
    samples = demo.samples(demo.train_size, TRAIN_SEED)
    targets = demo.targets(samples)
    specs = [_image_input(spec, m) for m in spec.members]
    inputs = batch_tensors([s.image for s in samples], specs)
    print(f"{spec.name}: generated {len(samples)} training images in {time.perf_counter() - start:.1f}s", flush=True)
    trained = {}
    for index, (member, member_input) in enumerate(zip(spec.members, specs, strict=True)):
        start = time.perf_counter()
        torch.manual_seed(TRAIN_SEED + index)
        recipe = demo.recipes.get(member.name, Recipe())
        module = recipe.create() if recipe.create else build_member(member, spec.base_dir)

        def scores(batch: torch.Tensor, module: nn.Module = module, member: MemberSpec = member) -> torch.Tensor:
            return pick(module(batch), member.output.select)

        _fit(module, scores, inputs[member_input], targets, recipe, demo.loss(), label=f"{spec.name}/{member.name}")
        if save:
            _save(module, member, spec.base_dir, recipe)
        trained[member.name] = Trained(time.perf_counter() - start, demo_weights.state_digest(module.state_dict()))
        where = f" -> {member.weights}" if save else " (not saved)"
        print(f"trained {member.name} ({member.arch}) in {trained[member.name].seconds:.1f}s{where}", flush=True)
    return trained


def _image_input(spec: EnsembleSpec, member: MemberSpec) -> InputSpec:
    """The member's image input: the demos are images, generated or scanned."""
    member_input = spec.member_input(member)
    if not isinstance(member_input, InputSpec):
        raise SystemExit(f"{spec.name}/{member.name}: the demos train on images; this member takes tensors")
    return member_input


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
        print(
            f"  {label}: epoch {epoch + 1}/{recipe.epochs}, loss {total / batches:.3f}, "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )
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
    parser.add_argument("--record-digests", action="store_true", help="pin what this run trains in demo_weights.json")
    parser.add_argument(
        "--accept-other-weights", action="store_true", help="keep weights that differ from the pinned ones"
    )
    parser.add_argument("--no-save", action="store_true", help="train and report digests, write no weights")
    parser.add_argument("--unpinned", action="store_true", help="torch's own kernel choice (bench/pinned_training.py)")
    parser.add_argument("--json", type=Path, help="write each member's seconds and digest, and the kernels, here")
    args = parser.parse_args()
    if not args.unpinned:
        pinned_kernels.reexec_pinned("archive_scripts.train_demo", sys.argv[1:])
        try:
            pinned_kernels.apply()
        except pinned_kernels.PinUnavailable as e:
            if not args.accept_other_weights:
                raise SystemExit(
                    f"cannot train the pinned demo weights: {e}. `make demo ACCEPT_OTHER_WEIGHTS=1` trains anyway."
                ) from e
            print(f"warning: {e}", file=sys.stderr)
    kernels = pinned_kernels.describe()
    print(f"training under {kernels}", flush=True)
    specs = load_ensembles(args.config, check_files=False)
    trained: dict[str, dict[str, Trained]] = {}
    for name in args.ensemble or list(DEMOS):
        trained[name] = train(specs[name], save=not args.no_save)
        print(
            f"trained {len(specs[name].members)} members of {name} "
            f"in {sum(t.seconds for t in trained[name].values()):.1f}s",
            flush=True,
        )
    digests = {name: {member: t.digest for member, t in members.items()} for name, members in trained.items()}
    if args.json:
        report = {name: {member: vars(t) for member, t in members.items()} for name, members in trained.items()}
        args.json.write_text(json.dumps({"kernels": kernels, "members": report}, indent=2) + "\n")
    if not args.no_save:
        _check_saved(specs, digests)
    if args.record_digests:
        demo_weights.record(digests, kernels)
        print(f"recorded the digests of {sum(map(len, digests.values()))} members in {demo_weights.PINNED}")
        return
    if args.no_save or args.unpinned:
        return
    mismatched = demo_weights.differences(digests, demo_weights.pinned())
    if mismatched:
        message = demo_weights.mismatch_message(mismatched, kernels)
        if not args.accept_other_weights:
            raise SystemExit(message)
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(
            f"the weights of {sum(map(len, digests.values()))} members are the pinned ones ({demo_weights.PINNED.name})"
        )


def _check_saved(specs: dict[str, EnsembleSpec], digests: dict[str, dict[str, str]]) -> None:
    """Every saved file must read back, under its member's rules, to the tensors training left in memory."""
    for name, members in digests.items():
        read = demo_weights.read_back(specs[name])
        wrong = sorted(member for member, digest in members.items() if read[member] != digest)
        if wrong:
            raise SystemExit(f"{name}: the weights files of {wrong} do not read back to the trained tensors")


if __name__ == "__main__":
    main()
