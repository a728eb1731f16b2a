"""The pure parts of `make bench-deadline` (bench/deadline.py): which images are slowed and how the slowed member
knows them, how a reply is counted, one round's figures and the verdict, on hand-written inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench.deadline import (
    ANSWERED,
    LOST,
    NO_DEADLINE,
    QUORUM,
    SLOWED,
    SLOWED_CLASS,
    WITH_DEADLINE,
    Record,
    Reference,
    classify,
    input_digest,
    p99_verdict,
    round_summary,
    slow_digests,
    slowed_model_file,
    summarize,
)

BASE = '''"""A model file."""

from __future__ import annotations

import torch
from torch import nn


class Base(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(dim=1, keepdim=True)
'''


def test_a_row_has_one_digest_whatever_its_layout_or_mode() -> None:
    rows = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inferred = rows.clone()
    assert input_digest(rows[0]) == input_digest(rows.to(memory_format=torch.channels_last)[0])
    assert input_digest(rows[0]) == input_digest(inferred[0])
    assert input_digest(rows[0]) != input_digest(rows[1])
    assert len(input_digest(rows[0])) == 16


def test_the_slowed_share_is_the_smallest_distinct_digests() -> None:
    digests = [f"{i:02d}" for i in range(30, 0, -1)] + ["01", "02"]
    assert slow_digests(digests, 0.1) == {"01", "02", "03"}
    assert slow_digests(["b", "a"], 0.1) == {"a"}  # at least one


def slowed_class(digests: frozenset[str]) -> tuple[type[torch.nn.Module], list[float]]:
    """The class the model file defines, with its sleeps recorded instead of slept."""
    namespace: dict[str, Any] = {"__name__": "slowed_models"}
    exec(compile(slowed_model_file(BASE, "Base", digests, 0.2), "slowed_models.py", "exec"), namespace)
    slept: list[float] = []
    namespace["time"] = SimpleNamespace(sleep=slept.append)
    return namespace[SLOWED_CLASS], slept


def test_the_slowed_member_sleeps_on_a_batch_holding_a_chosen_row_only() -> None:
    rows = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cls, slept = slowed_class(frozenset({input_digest(rows[1])}))
    model = cls()
    with torch.inference_mode():
        plain = model(rows[[0, 2]])
        assert slept == []
        slowed = model(rows)
    assert slept == [0.2]
    assert torch.equal(slowed, rows.flatten(1).sum(dim=1, keepdim=True)) and plain.shape == (2, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace(_method)?` is deprecated:FutureWarning")
def test_the_slowed_member_does_not_sleep_while_traced() -> None:
    rows = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    cls, slept = slowed_class(frozenset({input_digest(rows[0])}))
    torch.jit.trace(cls().eval(), rows, check_trace=False)  # the check would run it untraced
    assert slept == []


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        pytest.param(200, {"predictions": [{"label": "present"}]}, ANSWERED, id="answer"),
        pytest.param(503, {"code": 503, "type": "QuorumNotMet", "message": "m"}, QUORUM, id="quorum"),
        pytest.param(503, {"code": 503, "type": "ServiceUnavailableException"}, LOST, id="torchserve-503"),
        pytest.param(500, {"type": "QuorumNotMet"}, LOST, id="quorum-type-wrong-status"),
        pytest.param(200, {"predictions": []}, LOST, id="empty-answer"),
        pytest.param(200, ["not", "an", "answer"], LOST, id="not-an-object"),
    ],
)
def test_only_an_answer_or_an_explicit_quorum_refusal_is_not_lost(status: int, body: Any, expected: str) -> None:
    assert classify(status, body) == expected


KNOWN = Reference(
    truth=("absent", "present", "present", "absent"),
    slow=frozenset({1}),
    digests=frozenset({"d1"}),
    full=("absent", "present", "absent", "absent"),
    without_slowed=("absent", "absent", "present", "absent"),
)


def answered(image: int, ms: float, label: str, missing: dict[str, str] | None = None) -> Record:
    prediction = {"label": label, "missing": missing or {}, "partial": bool(missing)}
    return Record(ANSWERED, image, ms / 1000, prediction)


def test_one_round_counts_latencies_accuracy_and_missing() -> None:
    records = [
        answered(0, 10, "absent"),  # right, matches every member's label
        answered(1, 52, "absent", {SLOWED: "deadline"}),  # wrong, matches the label without the slowed member
        answered(2, 12, "present", {SLOWED: "busy"}),  # right, matches the label without it
        answered(3, 11, "present"),  # wrong, and a mismatch: every member says absent
        Record(QUORUM, 0, 0.02),
        Record(LOST, 3, error="HTTP 500: boom"),
    ]
    found = round_summary(records, KNOWN)
    assert (found["sent"], found["answered"], found["quorum_503"], found["lost"]) == (6, 4, 1, 1)
    assert found["latency_samples"] == 5 and found["p50_ms"] == 12.0 and found["p99_ms"] == 52.0
    assert found["accuracy"] == 0.5
    assert found["slowed_missing_share"] == 0.5
    assert found["slowed_missing_by_reason"] == {"busy": 1, "deadline": 1}
    assert found["slowed_missing_share_on_slow_images"] == 1.0
    assert found["partial_share"] == 0.5
    assert (found["label_mismatches"], found["labels_unchecked"], found["others_missing"]) == (1, 0, 0)
    assert found["slow_images_p50_ms"] == 52.0 and found["first_lost"] == "HTTP 500: boom"


def test_an_answer_missing_another_member_is_not_checked() -> None:
    found = round_summary([answered(0, 10, "present", {"resnet18": "error: RuntimeError: x"})], KNOWN)
    assert (found["labels_unchecked"], found["others_missing"], found["label_mismatches"]) == (1, 1, 0)


@pytest.mark.parametrize(
    ("low", "high", "lost", "expected"),
    [
        pytest.param(40.0, 65.0, 0, "met", id="on-the-limit"),
        pytest.param(60.0, 70.0, 0, "inconclusive", id="straddles"),
        pytest.param(66.0, 80.0, 0, "missed", id="above"),
        pytest.param(40.0, 50.0, 1, "missed: lost requests", id="lost"),
    ],
)
def test_the_verdict_needs_the_whole_p99_interval_under_the_limit_and_nothing_lost(
    low: float, high: float, lost: int, expected: str
) -> None:
    assert p99_verdict({"ci_low": low, "ci_high": high}, lost, 65) == expected


def summary_round(p50: float, p99: float, accuracy: float, answered: int = 100, lost: int = 0) -> dict[str, Any]:
    return {
        "sent": answered + lost,
        "answered": answered,
        "quorum_503": 0,
        "lost": lost,
        "p50_ms": p50,
        "p99_ms": p99,
        "images_per_s": 50.0,
        "accuracy": accuracy,
        "slowed_missing_share": 0.1,
        "slowed_missing_by_reason": {"deadline": 10},
        "partial_share": 0.05,
        "others_missing": 0,
        "label_mismatches": 0,
        "slow_images_p50_ms": 200.0,
        "other_images_p50_ms": 10.0,
        "first_lost": "",
    }


def test_a_client_count_compares_the_configurations_round_by_round() -> None:
    rounds = {
        NO_DEADLINE: [summary_round(10, 210, 0.78), summary_round(11, 220, 0.77)],
        WITH_DEADLINE: [summary_round(10, 55, 0.75), summary_round(10, 60, 0.74)],
    }
    pooled = {NO_DEADLINE: [0.01] * 99 + [0.21], WITH_DEADLINE: [0.01] * 99 + [0.06]}
    found = summarize(rounds, pooled)
    deadline = found["configs"][WITH_DEADLINE]
    assert deadline["sent"] == 200 and deadline["lost"] == 0
    assert deadline["p99_ms"]["median"] == 57.5 and 55 <= deadline["p99_ms"]["ci_low"] <= deadline["p99_ms"]["ci_high"]
    assert deadline["pooled_p99_ms"] == 60.0 and deadline["slowed_missing_by_reason"] == {"deadline": 20}
    assert deadline["accuracy"] == 0.745
    assert found["accuracy_cost_points"]["median"] == pytest.approx(3.0)
    assert found["p99_no_deadline_over_deadline"]["ratio"] > 3
    assert found["verdict"] == "met"
    rounds[WITH_DEADLINE][1] = summary_round(10, 60, 0.74, lost=1)
    assert summarize(rounds, pooled)["verdict"] == "missed: lost requests"
    assert not math.isnan(summarize(rounds, pooled)["configs"][NO_DEADLINE]["pooled_p50_ms"])
