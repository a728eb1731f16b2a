"""Every policy's exact output for every task, plus parameter resolution and the registry contract.

Probabilities are dyadic fractions, so every sum and mean below is exact in float64.
"""

from __future__ import annotations

import pytest
import torch

from handlers.answers.policies import Votes, combine
from handlers.config.policy import POLICY_TABLE, VOTE_POLICIES, PolicySpec, policy_names, resolve_policy
from handlers.errors import InvalidPolicy

# probs[member, image, label]
BINARY = torch.tensor(
    [
        [[0.125, 0.875], [0.75, 0.25]],
        [[0.625, 0.375], [0.625, 0.375]],
        [[0.375, 0.625], [0.875, 0.125]],
    ],
    dtype=torch.float64,
)
MULTICLASS = torch.tensor(
    [
        [[0.5, 0.25, 0.25], [0.5, 0.375, 0.125], [0.5, 0.5, 0.0]],
        [[0.625, 0.25, 0.125], [0.25, 0.625, 0.125], [0.25, 0.5, 0.25]],
        [[0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [0.25, 0.25, 0.5]],
    ],
    dtype=torch.float64,
)
MULTILABEL = torch.tensor(
    [[[0.75, 0.25]], [[0.5, 0.125]], [[0.25, 0.875]]],
    dtype=torch.float64,
)
TASKS = {
    "binary": (BINARY, 1),
    "multiclass": (MULTICLASS, None),
    "multilabel": (MULTILABEL, None),
}


def run(task: str, name: str, *, k: int | None = None, threshold: float | None = 0.5, weights=(1.0, 1.0, 1.0)):
    probs, positive = TASKS[task]
    policy = PolicySpec(name=name, k=k, threshold=None if task == "multiclass" else threshold)
    decision = combine(probs, Votes(task, torch.tensor(weights, dtype=torch.float64), positive, policy))
    chosen = [[i for i, on in enumerate(row) if on] for row in decision.chosen.tolist()]
    scores = [[row[i] for i in picks] for row, picks in zip(decision.score.tolist(), chosen, strict=True)]
    return chosen, scores


@pytest.mark.parametrize(
    ("task", "name", "kwargs", "chosen", "scores"),
    [
        # binary: member votes (p >= 0.5) are image 0: yes, no, yes; image 1: no, no, no.
        pytest.param("binary", "any", {}, [[1], [0]], [[2 / 3], [1.0]], id="binary-any"),
        pytest.param("binary", "all", {}, [[0], [0]], [[1 / 3], [1.0]], id="binary-all"),
        pytest.param("binary", "majority", {}, [[1], [0]], [[2 / 3], [1.0]], id="binary-majority"),
        pytest.param("binary", "k_of_n", {"k": 3}, [[0], [0]], [[1 / 3], [1.0]], id="binary-k3"),
        pytest.param(
            "binary", "any", {"threshold": 0.375}, [[1], [1]], [[1.0], [1 / 3]], id="binary-any-low-threshold"
        ),
        pytest.param("binary", "mean", {}, [[1], [0]], [[0.625], [0.75]], id="binary-mean"),
        pytest.param(
            "binary", "mean", {"threshold": 0.75}, [[0], [0]], [[0.375], [0.75]], id="binary-mean-high-threshold"
        ),
        pytest.param(
            "binary", "mean", {"weights": (1.0, 2.0, 1.0)}, [[1], [0]], [[0.5625], [0.71875]], id="binary-mean-weighted"
        ),
        pytest.param("binary", "max", {}, [[1], [0]], [[0.875], [0.875]], id="binary-max"),
        # multiclass: image 0 votes a, a, b; image 1 a, b, c (tie -> b by mean 5/12);
        # image 2 a (argmax tie -> lower index), b, c (tie -> b by mean 5/12).
        pytest.param("multiclass", "any", {}, [[0], [1], [1]], [[2 / 3], [1 / 3], [1 / 3]], id="multiclass-any"),
        pytest.param("multiclass", "all", {}, [[], [], []], [[], [], []], id="multiclass-all-abstains"),
        pytest.param("multiclass", "majority", {}, [[0], [], []], [[2 / 3], [], []], id="multiclass-majority"),
        pytest.param(
            "multiclass", "k_of_n", {"k": 1}, [[0], [1], [1]], [[2 / 3], [1 / 3], [1 / 3]], id="multiclass-k1"
        ),
        pytest.param("multiclass", "mean", {}, [[0], [1], [1]], [[11 / 24], [5 / 12], [5 / 12]], id="multiclass-mean"),
        pytest.param(
            "multiclass",
            "mean",
            {"weights": (0.5, 0.5, 3.0)},
            [[1], [2], [2]],
            [[0.4375], [0.40625], [0.40625]],
            id="multiclass-mean-weighted",
        ),
        pytest.param(
            "multiclass", "max", {}, [[0], [1], [0]], [[0.625], [0.625], [0.5]], id="multiclass-max-first-wins"
        ),
        # multilabel: red votes yes, yes (0.5 >= 0.5), no; round votes no, no, yes.
        pytest.param("multilabel", "any", {}, [[0, 1]], [[2 / 3, 1 / 3]], id="multilabel-any"),
        pytest.param("multilabel", "all", {}, [[]], [[]], id="multilabel-all"),
        pytest.param("multilabel", "majority", {}, [[0]], [[2 / 3]], id="multilabel-majority"),
        pytest.param("multilabel", "mean", {}, [[0]], [[0.5]], id="multilabel-mean"),
        pytest.param("multilabel", "max", {}, [[0]], [[0.75]], id="multilabel-max"),
    ],
)
def test_policy_output(task: str, name: str, kwargs: dict, chosen: list, scores: list) -> None:
    assert run(task, name, **kwargs) == (chosen, scores)


def test_any_trades_precision_for_recall() -> None:
    """On the same votes, `any` says positive at least wherever `all` and `majority` do."""
    positives = {name: run("binary", name, threshold=0.375)[0] for name in ("any", "majority", "all")}
    assert positives == {"any": [[1], [1]], "majority": [[1], [0]], "all": [[1], [0]]}


@pytest.mark.parametrize(
    ("requested", "default", "task", "expected"),
    [
        pytest.param(
            {}, PolicySpec("majority", threshold=0.25), "binary", PolicySpec("majority", threshold=0.25), id="default"
        ),
        pytest.param(
            {"threshold": "0.75"},
            PolicySpec("any", threshold=0.25),
            "binary",
            PolicySpec("any", threshold=0.75),
            id="override-default-param",
        ),
        pytest.param(
            {"policy": "all"},
            PolicySpec("any", threshold=0.25),
            "binary",
            PolicySpec("all", threshold=0.5),
            id="other-policy-fresh-params",
        ),
        pytest.param(
            {"policy": "k_of_n", "k": "2"}, PolicySpec("mean"), "multiclass", PolicySpec("k_of_n", k=2), id="k-as-text"
        ),
        pytest.param(
            {"policy": "k_of_n", "k": 3}, None, "multilabel", PolicySpec("k_of_n", k=3, threshold=0.5), id="k-as-int"
        ),
        pytest.param(
            {"policy": "mean", "threshold": "1"},
            None,
            "binary",
            PolicySpec("mean", threshold=1.0),
            id="threshold-bound",
        ),
    ],
)
def test_resolve_policy(requested: dict, default: PolicySpec | None, task: str, expected: PolicySpec) -> None:
    assert resolve_policy(requested, default=default, task=task, n_members=3) == expected


@pytest.mark.parametrize(
    ("requested", "task", "message"),
    [
        pytest.param(
            {"policy": "vote"},
            "binary",
            "unknown policy 'vote'; valid policies: all, any, cascade, k_of_n, majority, max, mean",
            id="unknown-name",
        ),
        pytest.param(
            {"policy": "k_of_n"}, "binary", "policy 'k_of_n' needs parameter k (an integer from 1 to 3)", id="k-missing"
        ),
        pytest.param(
            {"policy": "k_of_n", "k": "4"}, "binary", "k must be an integer from 1 to 3, got '4'", id="k-too-big"
        ),
        pytest.param(
            {"policy": "k_of_n", "k": "0"}, "binary", "k must be an integer from 1 to 3, got '0'", id="k-zero"
        ),
        pytest.param(
            {"policy": "k_of_n", "k": "1.5"}, "binary", "k must be an integer from 1 to 3, got '1.5'", id="k-fraction"
        ),
        pytest.param(
            {"policy": "any", "k": "2"},
            "binary",
            "policy 'any' takes no parameter k; only k_of_n does",
            id="k-not-taken",
        ),
        pytest.param(
            {"policy": "mean", "threshold": "1.5"},
            "binary",
            "threshold must be a number in [0, 1], got '1.5'",
            id="threshold-high",
        ),
        pytest.param(
            {"policy": "mean", "threshold": "nan"},
            "binary",
            "threshold must be a number in [0, 1], got 'nan'",
            id="threshold-nan",
        ),
        pytest.param(
            {"policy": "mean", "threshold": "high"},
            "binary",
            "threshold must be a number in [0, 1], got 'high'",
            id="threshold-text",
        ),
        pytest.param(
            {"policy": "mean", "threshold": "0.5"},
            "multiclass",
            "threshold applies to binary and multilabel ensembles; this one is multiclass",
            id="threshold-multiclass",
        ),
        pytest.param(
            {"polcy": "any"},
            "binary",
            "unknown policy parameter(s) ['polcy']; valid: policy, k, threshold, confidence, early_exit",
            id="typo",
        ),
    ],
)
def test_resolve_policy_rejects(requested: dict, task: str, message: str) -> None:
    with pytest.raises(InvalidPolicy) as caught:
        resolve_policy(requested, default=PolicySpec("mean", threshold=0.5), task=task, n_members=3)
    assert str(caught.value) == message
    assert caught.value.status == 400


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_every_policy_gives_one_decision_per_image(name: str, task: str) -> None:
    """Registry invariant: shapes match, multiclass/binary choose at most one label, binary exactly one."""
    probs, _ = TASKS[task]
    chosen, _ = run(task, name, k=2 if name == "k_of_n" else None)
    assert len(chosen) == probs.shape[1]
    if task != "multilabel":
        assert all(len(labels) <= 1 for labels in chosen)
    if task == "binary":
        assert all(len(labels) == 1 for labels in chosen)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        pytest.param(1, {"any": 1, "all": 1, "majority": 1, "k_of_n": 2}, id="one-member"),
        pytest.param(4, {"any": 1, "all": 4, "majority": 3, "k_of_n": 2}, id="four-members"),
        pytest.param(5, {"any": 1, "all": 5, "majority": 3, "k_of_n": 2}, id="five-members"),
    ],
)
def test_the_table_derives_each_votes_k_from_n(n: int, expected: dict[str, int]) -> None:
    """docs/policies.md: k = 1, n, floor(n/2)+1 and the given k (here 2)."""
    assert {name: POLICY_TABLE[name].k(n, 2) for name in VOTE_POLICIES} == expected  # type: ignore[misc]


def test_early_exit_is_refused_with_a_reason_exactly_where_the_policy_is_no_vote() -> None:
    refused = {name for name, policy in POLICY_TABLE.items() if policy.early_exit_refused is not None}
    assert (VOTE_POLICIES, refused) == (("any", "all", "majority", "k_of_n"), {"mean", "max", "cascade"})
