"""The benchmark's answers gate: an in-process reference that shares none of our decode, transform or render code.

Written from our documentation (docs/policies.md, the `input` section of docs/ensembles-yaml) and the
libraries' own APIs: Pillow opens each image, torchvision's `transforms.v2` resizes and normalizes it
for each member's declared input, each member is built as its publisher builds it (torchvision's
`get_model`, or the model file's class) with its state dict loaded strictly, and the vote and the
combination follow the policy table. Only the user's declaration (ensembles.yaml, parsed) is shared.

Every served answer is checked against it: each member's label and score, the combined label and
score. Scores must agree within `TOLERANCE` (engines such as ONNX Runtime and OpenVINO reorder float
sums); a label may differ from the reference only where the reference itself is within `TOLERANCE`
of a tie (a vote at the threshold, or two labels that close), and then the combined label must be the
one the policy gives for the member labels the answer reports.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from handlers.config.specs import EnsembleSpec, InputSpec, MemberSpec

TOLERANCE = 2e-3
VOTE_POLICIES = ("any", "all", "majority", "k_of_n")


@dataclass(frozen=True)
class Answer:
    """One image's answer as a contender gives it: each member's (label, score), the combined label and score."""

    members: Mapping[str, tuple[str, float]]
    label: str | None
    score: float


@dataclass(frozen=True)
class Expected:
    """The reference for one image: each member's probabilities, and the combined answer from them."""

    probs: Mapping[str, tuple[float, ...]]
    answer: Answer


def reference_answers(spec: EnsembleSpec, images: Sequence[bytes]) -> tuple[Expected, ...]:
    """The reference answer for each encoded image: the ensemble's members as their publishers build them."""
    if spec.task not in ("multiclass", "binary"):
        raise ValueError(f"the reference covers multiclass and binary ensembles, not {spec.task}")
    modules = {member.name: _module(spec, member) for member in spec.members}
    transforms = {member.name: _transform(spec, member) for member in spec.members}
    gate, found = Gate(spec), []
    for data in images:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
        probs: dict[str, tuple[float, ...]] = {}
        with torch.inference_mode():
            for member in spec.members:
                mode = _image_input(spec, member).color_mode
                row = transforms[member.name](image if mode == "RGB" else image.convert(mode))
                probs[member.name] = tuple(torch.softmax(modules[member.name](row[None]).double(), dim=1)[0].tolist())
        found.append(Expected(probs, gate.combine(probs)))
    return tuple(found)


class Gate:
    """The policy as docs/policies.md states it, and the check of an answer against the reference's."""

    def __init__(self, spec: EnsembleSpec) -> None:
        self.spec = spec

    def vote(self, p: Sequence[float]) -> tuple[str, float]:
        """One member's label and score: multiclass argmax (lowest index on a tie); binary, positive at >= threshold."""
        labels = self.spec.labels
        if self.spec.task == "binary":
            positive = self.spec.positive_index
            assert positive is not None
            chosen = positive if p[positive] >= self._threshold() else 1 - positive
            return labels[chosen], p[chosen]
        best = max(range(len(p)), key=lambda j: (p[j], -j))
        return labels[best], p[best]

    def combine(self, probs: Mapping[str, Sequence[float]]) -> Answer:
        """The combined answer under the default policy, with every member's own vote."""
        members = {name: self.vote(p) for name, p in probs.items()}
        policy = self.spec.policy
        if policy.name == "mean":
            weights = {m.name: m.weight for m in self.spec.members}
            total = sum(weights[name] for name in probs)
            mean = [
                sum(weights[name] * p[j] for name, p in probs.items()) / total for j in range(len(self.spec.labels))
            ]
            label, score = self.vote(mean)
            return Answer(members, label, score)
        if policy.name in VOTE_POLICIES:
            label, score = self.tally({name: label for name, (label, _) in members.items()})
            return Answer(members, label, score)
        raise ValueError(f"the reference implements mean and the vote policies, not {policy.name}")

    def tally(self, votes: Mapping[str, str]) -> tuple[str, float]:
        """k-of-n over member labels (binary: positive with >= k positive votes).

        The score is the chosen label's share.
        """
        n = len(votes)
        k = {"any": 1, "all": n, "majority": n // 2 + 1}.get(self.spec.policy.name, self.spec.policy.k or 1)
        counts = {label: sum(v == label for v in votes.values()) for label in self.spec.labels}
        if self.spec.task == "binary":
            positive = self.spec.labels[self.spec.positive_index or 0]
            negative = next(label for label in self.spec.labels if label != positive)
            chosen = positive if counts[positive] >= k else negative
            return chosen, counts[chosen] / n
        raise ValueError("multiclass vote policies are not used by the benchmark's workloads")

    def problem(self, answer: Answer, expected: Expected) -> str | None:
        """Why `answer` disagrees with the reference beyond tolerance, or None when it agrees."""
        want_label: str | None
        if set(answer.members) != set(expected.probs):
            return f"members {sorted(answer.members)}, expected {sorted(expected.probs)}"
        for name, (label, score) in answer.members.items():
            p = expected.probs[name]
            want_label, want_score = expected.answer.members[name]
            if label != want_label and not self._near_tie(p, label):
                return f"{name}: label {label!r}, expected {want_label!r} (p {_fmt(p)})"
            if label in self.spec.labels and abs(score - p[self.spec.labels.index(label)]) > TOLERANCE:
                return f"{name}: score {score:.6f} for {label!r}, expected {p[self.spec.labels.index(label)]:.6f}"
        if self.spec.policy.name in VOTE_POLICIES:
            want_label, want_score = self.tally({name: label for name, (label, _) in answer.members.items()})
        else:
            want_label, want_score = expected.answer.label, expected.answer.score
            if answer.label != want_label and answer.label in self.spec.labels:
                near = self._mean_of(expected.probs, answer.label)  # A label within tolerance of the top one is a tie.
                if abs(want_score - near) <= TOLERANCE:
                    want_label, want_score = answer.label, near
        if answer.label != want_label:
            return f"combined label {answer.label!r}, expected {want_label!r}"
        if abs(answer.score - want_score) > TOLERANCE:
            return f"combined score {answer.score:.6f}, expected {want_score:.6f}"
        return None

    def _near_tie(self, p: Sequence[float], label: str) -> bool:
        if label not in self.spec.labels:
            return False
        j = self.spec.labels.index(label)
        if self.spec.task == "binary":
            positive = self.spec.positive_index or 0
            return abs(p[positive] - self._threshold()) <= TOLERANCE
        return max(p) - p[j] <= TOLERANCE

    def _mean_of(self, probs: Mapping[str, Sequence[float]], label: str) -> float:
        weights = {m.name: m.weight for m in self.spec.members}
        j = self.spec.labels.index(label)
        return sum(weights[name] * p[j] for name, p in probs.items()) / sum(weights[name] for name in probs)

    def _threshold(self) -> float:
        return 0.5 if self.spec.policy.threshold is None else self.spec.policy.threshold


def _fmt(p: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in p) + "]"


def _image_input(spec: EnsembleSpec, member: MemberSpec) -> InputSpec:
    """The member's declared image input; the reference takes images only."""
    declared = spec.member_input(member)
    if not isinstance(declared, InputSpec):
        raise ValueError(f"{member.name}: the reference takes images, not tensors")
    return declared


def _transform(spec: EnsembleSpec, member: MemberSpec) -> v2.Compose:
    """The member's declared input (stretch resize, bilinear, then mean/std), as torchvision's transforms."""
    declared = _image_input(spec, member)
    if declared.resize != "stretch" or declared.tta != "none":
        raise ValueError(f"{member.name}: the reference implements `resize: stretch` without tta")
    return v2.Compose(
        [
            v2.Resize(list(declared.size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(declared.mean), list(declared.std)),
        ]
    )


def _module(spec: EnsembleSpec, member: MemberSpec) -> torch.nn.Module:
    """The member built as its publisher builds it, its state dict loaded strictly, in eval mode."""
    kind, _, target = member.arch.partition(":")
    if kind == "torchvision":
        module = torchvision.models.get_model(target, weights=None, **member.kwargs)
    else:
        module = getattr(_model_file(str(spec.base_dir / kind)), target)(**member.kwargs)
    state = torch.load(spec.base_dir / member.weights, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module.eval()


@cache
def _model_file(path: str) -> object:
    loaded = importlib.util.spec_from_file_location(Path(path).stem + "_reference", path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


class GateJudge:
    """A load generator's judge (bench/loadgen.py): every answer checked by the gate against the reference; the
    first few problems are kept for the report, since a point with any is invalid."""

    KEPT = 5

    def __init__(self, gate: Gate, expected: Sequence[Expected]) -> None:
        self.gate, self.expected, self.problems = gate, expected, list[str]()

    def __call__(self, indices: list[int], answers: Sequence[Answer]) -> int:
        wrong = abs(len(answers) - len(indices))
        for i, answer in zip(indices, answers, strict=False):
            if (problem := self.gate.problem(answer, self.expected[i])) is not None:
                wrong += 1
                if len(self.problems) < self.KEPT:
                    self.problems.append(f"image {i}: {problem}")
        return wrong
