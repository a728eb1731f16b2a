"""`make evaluate`'s answers with members missing (archive_scripts/evaluate_missing.py), on hand-made probabilities.

Three members a, b, c of a binary ensemble, four images; the positive probabilities (members by images) and the truth:

    a: 0.75 0.75 0.75 0.25     votes + + + -
    b: 0.75 0.25 0.25 0.25     votes + - - -
    c: 0.25 0.25 0.75 0.25     votes - - + -
    truth: 1 0 0 1

`majority` of all three answers + - + - (accuracy 0.5). Without a, k counts the two that answered (k=2): b and c
give - - - -; images 0 and 2 differ, and both are partial (one vote in, a could have made k=2 of 3); images 1 and 3
are settled without a (no vote in, and a alone cannot reach 2). Without b: images 0 and 1 are partial (a and c split)
and only image 0 differs: partial is conservative. `mean` depends on every member, so every image with one missing is
partial. Every probability is a dyadic fraction, so every mean and share is exact.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy
import pytest
import torch

from archive_scripts.evaluate_missing import FULL, missing_sets, missing_table, missing_tables, policies, report
from handlers.answers.decide import Decider
from handlers.config.files import load_ensembles
from handlers.config.policy import resolve_policy
from handlers.config.specs import EnsembleSpec

POSITIVE = torch.tensor(
    [[0.75, 0.75, 0.75, 0.25], [0.75, 0.25, 0.25, 0.25], [0.25, 0.25, 0.75, 0.25]], dtype=torch.float64
)
PROBS = torch.stack([1 - POSITIVE, POSITIVE], dim=-1)  # [member, image, label]
TRUTH = numpy.array([1, 0, 0, 1])
YAML = """
ensembles:
  trio:
    version: "1.0"
    task: binary
    labels: [absent, present]
    positive_label: present
    policy: {name: majority}
    input: {size: [8, 8]}
    members:
      - {name: a, arch: "torchvision:resnet18", weights: a.pt}
      - {name: b, arch: "torchvision:resnet18", weights: b.pt}
      - {name: c, arch: "torchvision:resnet18", weights: c.pt}
"""

# row: (members answering, accuracy, change, share partial, share differing from the full ensemble)
MAJORITY = {
    FULL: (3, 0.5, 0.0, 0.0, 0.0),
    "without a": (2, 0.5, 0.0, 0.5, 0.5),
    "without b": (2, 0.25, -0.25, 0.5, 0.25),
    "without c": (2, 0.75, 0.25, 0.5, 0.25),
    "without a, b": (1, 0.25, -0.25, 1.0, 0.25),
    "without a, c": (1, 0.75, 0.25, 1.0, 0.25),
    "without b, c": (1, 0.25, -0.25, 1.0, 0.25),
}
MEAN = {
    FULL: (3, 0.5, 0.0, 0.0, 0.0),
    "without a": (2, 0.5, 0.0, 1.0, 0.0),
    "without b": (2, 0.25, -0.25, 1.0, 0.25),
    "without c": (2, 0.25, -0.25, 1.0, 0.25),
    "without a, b": (1, 0.25, -0.25, 1.0, 0.25),
    "without a, c": (1, 0.75, 0.25, 1.0, 0.25),
    "without b, c": (1, 0.25, -0.25, 1.0, 0.25),
}
CASES = [
    (policy, row, values) for policy, rows in (("majority", MAJORITY), ("mean", MEAN)) for row, values in rows.items()
]


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> EnsembleSpec:
    path = Path(tmp_path_factory.mktemp("trio")) / "ensembles.yaml"
    path.write_text(YAML)
    return load_ensembles(path, check_files=False)["trio"]


def table_for(spec: EnsembleSpec, policy: str, decider: Decider | None = None) -> dict:
    resolved = resolve_policy({"policy": policy}, default=spec.policy, task=spec.task, n_members=3)
    return missing_table(spec, decider or Decider(spec), PROBS, TRUTH, resolved)


@pytest.mark.parametrize(
    ("policy", "row", "expected"), CASES, ids=[f"{policy}-{row.replace(' ', '_')}" for policy, row, _ in CASES]
)
def test_each_row_is_the_hand_computed_answer(spec: EnsembleSpec, policy: str, row: str, expected: tuple) -> None:
    values = table_for(spec, policy)[row]
    answering, accuracy, change, partial, differs = expected
    assert (values["answering"], values["quality"], values["delta"], values["partial"], values["differs"]) == (
        answering,
        accuracy,
        change,
        partial,
        differs,
    )
    assert values["differs"] <= values["partial"]


@pytest.mark.parametrize("policy", ["majority", "mean"], ids=["majority", "mean"])
def test_the_rows_are_full_each_member_then_each_pair(spec: EnsembleSpec, policy: str) -> None:
    assert list(table_for(spec, policy)) == list(MAJORITY)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (1, [(), (0,)]),
        (2, [(), (0,), (1,)]),
        (3, [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]),
        (4, [(), (0,), (1,), (2,), (3,), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
    ],
    ids=["one-member", "two-members-no-pairs", "three-members", "four-members"],
)
def test_pairs_only_while_a_member_is_left(members: int, expected: list) -> None:
    assert missing_sets(members) == expected


@pytest.mark.parametrize(
    ("required", "min_members", "expected"),
    [
        (True, 1, {FULL: "met", "without a": "refused", "without a, b": "refused"}),
        (False, 1, {FULL: "met", "without a": "met", "without a, b": "met"}),
        (False, 2, {FULL: "met", "without a": "met", "without a, b": "refused"}),
    ],
    ids=["required-members-refuse", "soft-min1-answers", "soft-min2-refuses-one-left"],
)
def test_the_quorum_as_configured(spec: EnsembleSpec, required: bool, min_members: int, expected: dict) -> None:
    configured = replace(
        spec,
        members=tuple(replace(m, required=required) for m in spec.members),
        deadline=replace(spec.deadline, min_members=min_members),
    )
    table = table_for(configured, "majority", Decider(configured))
    assert {row: table[row]["quorum as configured"] for row in expected} == expected


def test_the_default_policy_comes_first_and_the_report_says_the_members_are_taken_as_soft(spec: EnsembleSpec) -> None:
    assert list(policies(spec, 2)) == ["majority", "all", "any", "k_of_n (k=2)", "max", "mean"]
    result = missing_tables(spec, Decider(spec), PROBS, TRUTH, 2)
    assert result["default"] == "majority" and list(result["tables"]) == list(policies(spec, 2))
    assert result["tables"]["mean"]["without b"]["quality"] == MEAN["without b"][1]
    printed = report(spec, result)
    assert "every row with a member missing is refused (503 QuorumNotMet)" in printed
    assert "if the missing members were `required: false`" in printed
    assert "| without a, c | 1 | 0.750 | +0.250 | 100.0% | 25.0% |" in printed


class NeverPartial(Decider):
    """A decider whose answers never say partial: what evaluate_missing's check must catch."""

    def decide(self, probs, policy, members, **options):
        answer = super().decide(probs, policy, members, **options)
        return replace(answer, partial=[False] * len(answer.partial))


def test_an_answer_that_differs_without_being_partial_fails_the_evaluation(spec: EnsembleSpec) -> None:
    with pytest.raises(AssertionError, match="trio without a: an answer differs, not partial"):
        table_for(spec, "majority", NeverPartial(spec))
