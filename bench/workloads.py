"""The ensembles the benchmark serves, the images it sends, and the labels every answer must carry."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from PIL import Image

from archive_scripts.demo_data import make_split
from handlers.answers.policies import Votes, member_votes
from handlers.config.files import load_ensembles
from handlers.config.policy import resolve_policy
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

PNG_SIGNATURE = b"\x89PNG"
TORCHVISION_TRIO = {"resnet18": "resnet18", "mobilenet": "mobilenet_v3_small", "squeezenet": "squeezenet1_1"}


@dataclass(frozen=True)
class Workload:
    """An ensemble (weights on disk), the encoded images to send, and each member's label per image."""

    name: str
    config: Path
    spec: EnsembleSpec
    images: tuple[bytes, ...]
    expected: tuple[dict[str, str], ...]

    def on_plan(self, plan: str) -> Workload:
        """The same workload with every member on one fixed plan (`frozen`: today's plans, the engines' baseline)."""
        return replace(self, spec=self.spec.with_plan(plan))

    def at_precision(self, precision: str, folder: Path) -> Workload:
        """The same workload with every member at a lossy `precision`, calibrated on the workload's own images
        (written to `folder`)."""
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(self.images):
            suffix = ".png" if data.startswith(PNG_SIGNATURE) else ".jpg"
            (folder / f"{i:03d}{suffix}").write_bytes(data)
        # Not gated here (min_agreement 0): the benchmark reports the agreement the build measured and the labels
        # that differ from fp32 (its mismatches), where a user's build would refuse below 0.99.
        execution = replace(
            self.spec.execution, plan="auto", precision=precision, calibration=str(folder.resolve()), min_agreement=0.0
        )
        members = tuple(replace(member, execution=None) for member in self.spec.members)
        return replace(self, spec=replace(self.spec, execution=execution, members=members))


def torchvision_trio(folder: Path, count: int, seed: int = 31337) -> Workload:
    """resnet18 + mobilenet_v3_small + squeezenet1_1, 10 classes, fixed random weights; 256x256 JPEGs in."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    members = []
    for name, builder in TORCHVISION_TRIO.items():
        torch.save(
            torchvision.models.get_model(builder, weights=None, num_classes=10).state_dict(), folder / f"{name}.pt"
        )
        members.append(
            {"name": name, "arch": f"torchvision:{builder}", "kwargs": {"num_classes": 10}, "weights": f"{name}.pt"}
        )
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": [f"class{i}" for i in range(10)],
        "input": {"size": [224, 224]},
        "members": members,
    }
    (folder / "ensembles.yaml").write_text(yaml.safe_dump({"ensembles": {"tvtrio": ensemble}}))
    spec = load_ensembles(folder / "ensembles.yaml")["tvtrio"]
    rng = random.Random(1)
    images = tuple(_jpeg(sample.image.resize((256, 256)), rng) for sample in make_split(count, seed))
    return with_expected("torchvision-trio", folder / "ensembles.yaml", spec, images)


def demo(count: int, seed: int = 4242) -> Workload:
    """The trained demo ensemble of ensembles.yaml, on held-out PNGs (run `make demo` first)."""
    config = Path("ensembles.yaml").resolve()
    spec = load_ensembles(config)["shapes"]
    images = []
    for sample in make_split(count, seed):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return with_expected("demo-shapes", config, spec, tuple(images))


def _jpeg(image: Image.Image, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.choice((85, 90, 95)))
    return buffer.getvalue()


def with_expected(name: str, config: Path, spec: EnsembleSpec, images: tuple[bytes, ...]) -> Workload:
    """Each member's label per image, computed in-process one image at a time by the members as given (eager)."""
    ensemble = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    policy = resolve_policy({}, default=spec.policy, task=spec.task, n_members=len(spec.members))
    expected: list[dict[str, Any]] = []  # A label per member, or a list of labels (multilabel): see below.
    for data in images:
        probs = ensemble.probabilities([decode_image(data, spec.limits)])
        votes = member_votes(probs, Votes(spec.task, torch.ones(len(spec.members)), spec.positive_index, policy))
        chosen = [[spec.labels[j] for j in votes[i, 0].nonzero().flatten().tolist()] for i in range(len(spec.members))]
        # The members view holds one label per member, or for multilabel its list of labels, in label order.
        labels = chosen if spec.task == "multilabel" else [found[0] for found in chosen]
        expected.append({m.name: member_labels for m, member_labels in zip(spec.members, labels, strict=True)})
    return Workload(name=name, config=config, spec=spec, images=images, expected=tuple(expected))
