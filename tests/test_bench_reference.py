"""The benchmark's answers gate (bench/reference.py): an independent reference, checked against our members and
against answers written by hand from docs/policies.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.reference import Answer, Expected, Gate, reference_answers
from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image
from tests.conftest import image_bytes, write_ensemble


def spec_for(folder: Path, task: str, policy: str):
    return load_ensembles(write_ensemble(folder, task=task, policy={"name": policy}))["trio"]


@pytest.mark.parametrize(
    ("task", "policy"), [("multiclass", "mean"), ("binary", "majority")], ids=["multiclass-mean", "binary-majority"]
)
def test_the_reference_and_our_members_agree_though_they_share_no_input_code(
    tmp_path: Path, task: str, policy: str
) -> None:
    spec = spec_for(tmp_path, task, policy)
    images = [image_bytes(seed, size=(40, 30)) for seed in range(6)]
    found = reference_answers(spec, images)
    ours = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    probs = ours.probabilities([decode_image(data, spec.limits) for data in images])
    for m, member in enumerate(spec.members):
        theirs = torch.tensor([found[i].probs[member.name] for i in range(len(images))], dtype=torch.float32)
        torch.testing.assert_close(probs[m].float(), theirs, atol=1e-5, rtol=0)
    gate = Gate(spec)
    body = ours.render(probs, spec.policy)
    answers = [
        Answer({n: (v["label"], v["score"]) for n, v in e["members"].items()}, e["label"], e["score"])
        for e in body["predictions"]
    ]
    assert [gate.problem(a, e) for a, e in zip(answers, found, strict=True)] == [None] * len(images)


def test_majority_by_hand(tmp_path: Path) -> None:
    """Binary labels [absent, present], positive `present`, threshold 0.5; k = 2 of 3; the score is the share."""
    gate = Gate(spec_for(tmp_path, "binary", "majority"))
    probs = {"mobile": (0.1, 0.9), "pool_rgb": (0.8, 0.2), "pool_gray": (0.4, 0.6)}
    assert gate.combine(probs) == Answer(
        {"mobile": ("present", 0.9), "pool_rgb": ("absent", 0.8), "pool_gray": ("present", 0.6)}, "present", 2 / 3
    )


def test_weighted_mean_by_hand(tmp_path: Path) -> None:
    """Weights 1, 2, 1 (pool_rgb has weight 2); the argmax of the weighted mean, scored by it."""
    gate = Gate(spec_for(tmp_path, "multiclass", "mean"))
    probs = {"mobile": (0.6, 0.3, 0.1), "pool_rgb": (0.2, 0.7, 0.1), "pool_gray": (0.5, 0.1, 0.4)}
    answer = gate.combine(probs)
    assert answer.label == "dog" and answer.score == pytest.approx((0.3 + 1.4 + 0.1) / 4)
    assert answer.members == {"mobile": ("cat", 0.6), "pool_rgb": ("dog", 0.7), "pool_gray": ("cat", 0.5)}


RIGHT = {"mobile": ("present", 0.9), "pool_rgb": ("absent", 0.8), "pool_gray": ("present", 0.6)}


@pytest.mark.parametrize(
    ("members", "label", "score", "problem"),
    [
        (RIGHT, "present", 2 / 3, None),
        (RIGHT, "present", 2 / 3 + 1e-4, None),
        (
            {**RIGHT, "pool_rgb": ("present", 0.2)},
            "present",
            1.0,
            "pool_rgb: label 'present', expected 'absent' (p [0.8000, 0.2000])",
        ),
        (RIGHT, "absent", 1 / 3, "combined label 'absent', expected 'present'"),
        (RIGHT, "present", 0.5, "combined score 0.500000, expected 0.666667"),
        (
            {**RIGHT, "mobile": ("present", 0.95)},
            "present",
            2 / 3,
            "mobile: score 0.950000 for 'present', expected 0.900000",
        ),
        (
            {"mobile": ("present", 0.9)},
            "present",
            1.0,
            "members ['mobile'], expected ['mobile', 'pool_gray', 'pool_rgb']",
        ),
    ],
    ids=[
        "right",
        "score-within-tolerance",
        "member-label",
        "combined-label",
        "combined-score",
        "member-score",
        "member-missing",
    ],
)
def test_the_gate_names_what_is_wrong(
    tmp_path: Path, members: dict, label: str, score: float, problem: str | None
) -> None:
    gate = Gate(spec_for(tmp_path, "binary", "majority"))
    probs = {"mobile": (0.1, 0.9), "pool_rgb": (0.8, 0.2), "pool_gray": (0.4, 0.6)}
    assert gate.problem(Answer(members, label, score), Expected(probs, gate.combine(probs))) == problem


def test_a_vote_at_the_threshold_may_go_either_way_but_the_combination_must_follow_it(tmp_path: Path) -> None:
    """pool_gray's 0.5005 is within the tolerance of the threshold: an engine may call it absent; then 1 of 3
    votes is present and majority must answer absent."""
    gate = Gate(spec_for(tmp_path, "binary", "majority"))
    probs = {"mobile": (0.1, 0.9), "pool_rgb": (0.8, 0.2), "pool_gray": (0.4995, 0.5005)}
    expected = Expected(probs, gate.combine(probs))
    flipped = {**RIGHT, "pool_gray": ("absent", 0.4995)}
    assert gate.problem(Answer(flipped, "absent", 2 / 3), expected) is None
    assert gate.problem(Answer(flipped, "present", 2 / 3), expected) == "combined label 'present', expected 'absent'"
