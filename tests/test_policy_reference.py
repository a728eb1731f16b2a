"""Golden answers computed by hand from docs/policies.md: the independent reference must reproduce each one.

The reference (tests/policy_reference.py) is what the serving tests compare the server with, so it is checked
here against small probability tables whose answers are worked out in the comments.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixture_reference import close
from tests.policy_reference import Policy, Task, predict

ABC = Task("multiclass", ("a", "b", "c"))
AB = Task("multiclass", ("a", "b"))
PAIR = Task("binary", ("absent", "present"), "present")
TAGS = Task("multilabel", ("red", "round"))
EQUAL = {"m1": 1.0, "m2": 1.0, "m3": 1.0}

CASES = [
    # mean, weights 1 and 2: (1*[.6 .3 .1] + 2*[.2 .5 .3]) / 3 = [1.0 1.3 0.7] / 3 = [.333333 .433333 .233333] -> b.
    pytest.param(
        ABC,
        {"m1": [0.6, 0.3, 0.1], "m2": [0.2, 0.5, 0.3]},
        {"m1": 1.0, "m2": 2.0},
        Policy("mean", top_k=2),
        None,
        {"label": "b", "score": 1.3 / 3, "top": [{"label": "b", "score": 1.3 / 3}, {"label": "a", "score": 1.0 / 3}]},
        id="multiclass-mean-weighted-top2",
    ),
    # majority of 3 needs 2: votes a, b, a -> a with 2 of 3 votes.
    pytest.param(
        ABC,
        {"m1": [0.6, 0.3, 0.1], "m2": [0.2, 0.5, 0.3], "m3": [0.5, 0.4, 0.1]},
        EQUAL,
        Policy("majority"),
        None,
        {"label": "a", "score": 2 / 3},
        id="multiclass-majority",
    ),
    # all needs 3 votes; a has 2: the ensemble abstains. top still ranks by share: a 2/3, b 1/3.
    pytest.param(
        ABC,
        {"m1": [0.6, 0.3, 0.1], "m2": [0.2, 0.5, 0.3], "m3": [0.5, 0.4, 0.1]},
        EQUAL,
        Policy("all", top_k=2),
        None,
        {"label": None, "score": None, "top": [{"label": "a", "score": 2 / 3}, {"label": "b", "score": 1 / 3}]},
        id="multiclass-all-abstains",
    ),
    # One vote each for a and b. A vote ignores weights: the plain mean [.4 .6] picks b (the weighted mean,
    # (3*[.7 .3] + 1*[.1 .9]) / 4 = [.55 .45], would pick a). Share 1/2.
    pytest.param(
        AB,
        {"m1": [0.7, 0.3], "m2": [0.1, 0.9]},
        {"m1": 3.0, "m2": 1.0},
        Policy("any"),
        None,
        {"label": "b", "score": 0.5},
        id="multiclass-vote-tie-plain-mean",
    ),
    # Each member's argmax is tied between a and b: the lowest index, a, is its vote; both vote a.
    pytest.param(
        ABC,
        {"m1": [0.4, 0.4, 0.2], "m2": [0.4, 0.4, 0.2]},
        {"m1": 1.0, "m2": 1.0},
        Policy("any"),
        None,
        {
            "label": "a",
            "score": 1.0,
            "members": {m: {"label": "a", "score": 0.4, "top": [{"label": "a", "score": 0.4}]} for m in ("m1", "m2")},
        },
        id="multiclass-argmax-tie-lowest-index",
    ),
    # max: confidences .6, .5, .5 -> m1 decides: its argmax a, its probability .6, its ranking as top.
    pytest.param(
        ABC,
        {"m1": [0.6, 0.3, 0.1], "m2": [0.2, 0.5, 0.3], "m3": [0.5, 0.4, 0.1]},
        EQUAL,
        Policy("max", top_k=3),
        None,
        {
            "label": "a",
            "score": 0.6,
            "top": [{"label": "a", "score": 0.6}, {"label": "b", "score": 0.3}, {"label": "c", "score": 0.1}],
        },
        id="multiclass-max",
    ),
    # majority of 2 needs 2; one positive vote (.7): an even split is no majority, the negative label with share 1/2.
    pytest.param(
        PAIR,
        {"m1": 0.7, "m2": 0.2},
        {"m1": 1.0, "m2": 1.0},
        Policy("majority"),
        None,
        {
            "label": "absent",
            "score": 0.5,
            "members": {"m1": {"label": "present", "score": 0.7}, "m2": {"label": "absent", "score": 0.8}},
        },
        id="binary-majority-even-split",
    ),
    # any with threshold .25: only .3 >= .25, one positive vote settles it; share 1/3.
    pytest.param(
        PAIR,
        {"m1": 0.3, "m2": 0.1, "m3": 0.2},
        EQUAL,
        Policy("any", threshold=0.25),
        None,
        {"label": "present", "score": 1 / 3},
        id="binary-any-threshold",
    ),
    # k_of_n k=2 at threshold .5: votes yes, no, yes -> present, 2/3.
    pytest.param(
        PAIR,
        {"m1": 0.9, "m2": 0.4, "m3": 0.5},
        EQUAL,
        Policy("k_of_n", k=2),
        None,
        {"label": "present", "score": 2 / 3},
        id="binary-k-of-n-threshold-inclusive",
    ),
    # mean (.4 + .6) / 2 = .5 >= .5: present, score .5.
    pytest.param(
        PAIR,
        {"m1": 0.4, "m2": 0.6},
        {"m1": 1.0, "m2": 1.0},
        Policy("mean"),
        None,
        {"label": "present", "score": 0.5},
        id="binary-mean-at-threshold",
    ),
    # max: confidences max(p, 1-p) = .8, .95, .6 -> m2 decides: absent, with its probability of absent .95.
    pytest.param(
        PAIR,
        {"m1": 0.8, "m2": 0.05, "m3": 0.6},
        EQUAL,
        Policy("max"),
        None,
        {"label": "absent", "score": 0.95},
        id="binary-max",
    ),
    # max: confidences .9 and .9: the member declared first, m1, decides: present .9.
    pytest.param(
        PAIR,
        {"m1": 0.9, "m2": 0.1},
        {"m1": 1.0, "m2": 1.0},
        Policy("max"),
        None,
        {"label": "present", "score": 0.9},
        id="binary-max-tie-first-declared",
    ),
    # k_of_n k=2: red yes from m1, m2 (2 of 3: on); round yes from m2 only (1 of 3: off). Scores are the yes shares.
    pytest.param(
        TAGS,
        {"m1": [0.6, 0.4], "m2": [0.7, 0.6], "m3": [0.2, 0.4]},
        EQUAL,
        Policy("k_of_n", k=2),
        None,
        {"labels": ["red"], "scores": {"red": 2 / 3, "round": 1 / 3}},
        id="multilabel-k-of-n",
    ),
    # max per label: red confidences .6, .7 -> m2 decides red: .3 (off); round .6, .9 -> m2: .9 (on).
    pytest.param(
        TAGS,
        {"m1": [0.6, 0.4], "m2": [0.3, 0.9]},
        {"m1": 1.0, "m2": 1.0},
        Policy("max"),
        None,
        {"labels": ["round"], "scores": {"red": 0.3, "round": 0.9}},
        id="multilabel-max-per-label",
    ),
    # cascade, cheapest first m2 then m1: m2's top probability .95 >= .9 settles it; m1 never runs.
    pytest.param(
        ABC,
        {"m1": [0.1, 0.8, 0.1], "m2": [0.95, 0.05, 0.0]},
        {"m1": 1.0, "m2": 1.0},
        Policy("cascade"),
        ["m2", "m1"],
        {
            "label": "a",
            "score": 0.95,
            "skipped": ["m1"],
            "early_exit": True,
            "members": {"m2": {"label": "a", "score": 0.95, "top": [{"label": "a", "score": 0.95}]}},
        },
        id="cascade-stops-at-the-first-confident-member",
    ),
    # cascade: after m1 the top probability is max(.6, .4) = .6; after m2 the mean .75 < .9 still: mean over both.
    pytest.param(
        PAIR,
        {"m1": 0.6, "m2": 0.9},
        {"m1": 1.0, "m2": 1.0},
        Policy("cascade"),
        ["m1", "m2"],
        {"label": "present", "score": 0.75, "skipped": []},
        id="cascade-runs-every-member",
    ),
    # [1 0] and [0 1]: the mean [.5 .5] has entropy ln 2 = .693147, each member 0; they disagree fully;
    # votes 1-1: margin 0.
    pytest.param(
        AB,
        {"m1": [1.0, 0.0], "m2": [0.0, 1.0]},
        {"m1": 1.0, "m2": 1.0},
        Policy("mean", uncertainty=True),
        None,
        {
            "uncertainty": {
                "entropy": 0.693147,
                "expected_entropy": 0.0,
                "mutual_information": 0.693147,
                "vote_margin": 0.0,
            }
        },
        id="uncertainty-multiclass-disagreement",
    ),
    # weights 1 and 3 (normalised .25, .75): mean p = .25*.8 + .75*.2 = .35;
    # H(.35) = .35*1.049822 + .65*.430783 = .647447; H(.8) = H(.2) = .8*.223144 + .2*1.609438 = .500402,
    # so expected .500402 and MI .147045; votes 1 yes, 1 no: margin 0. The score is P(absent) = 1 - .35.
    pytest.param(
        PAIR,
        {"m1": 0.8, "m2": 0.2},
        {"m1": 1.0, "m2": 3.0},
        Policy("mean", uncertainty=True),
        None,
        {
            "label": "absent",
            "score": 0.65,
            "uncertainty": {
                "entropy": 0.647447,
                "expected_entropy": 0.500402,
                "mutual_information": 0.147045,
                "vote_margin": 0.0,
            },
        },
        id="uncertainty-binary-weighted",
    ),
    # Per label: red is on for all 3 (margin |3-0|/3 = 1), round for 1 (|1-2|/3 = 1/3);
    # members' entropies of 1 and 0 are 0.
    pytest.param(
        TAGS,
        {"m1": [1.0, 1.0], "m2": [1.0, 0.0], "m3": [1.0, 0.0]},
        EQUAL,
        Policy("any", uncertainty=True),
        None,
        {
            "uncertainty": {
                "entropy": {"red": 0.0, "round": 0.636514},  # H(1/3) = (1/3) ln 3 + (2/3) ln 1.5 = .366204 + .270310
                "expected_entropy": {"red": 0.0, "round": 0.0},
                "mutual_information": {"red": 0.0, "round": 0.636514},
                "vote_margin": {"red": 1.0, "round": 1 / 3},
            }
        },
        id="uncertainty-multilabel-per-label",
    ),
]


@pytest.mark.parametrize(("task", "members", "weights", "policy", "order", "want"), CASES)
def test_reference_reproduces_hand_computed_answers(
    task: Task,
    members: dict[str, Any],
    weights: dict[str, float],
    policy: Policy,
    order: list[str] | None,
    want: dict[str, Any],
) -> None:
    got = predict(task, members, weights, policy, cheapest_first=order)
    for key, value in want.items():
        assert close(got[key], value), f"{key}: reference {got[key]!r}, by hand {value!r}"


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        pytest.param(Policy("k_of_n"), "k_of_n needs k in 1..2, got None", id="k-missing"),
        pytest.param(Policy("k_of_n", k=3), "k_of_n needs k in 1..2, got 3", id="k-above-n"),
        pytest.param(Policy("median"), "unknown policy 'median'", id="unknown-policy"),
    ],
)
def test_reference_refuses_what_the_docs_do_not_define(policy: Policy, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict(PAIR, {"m1": 0.2, "m2": 0.7}, {"m1": 1.0, "m2": 1.0}, policy)
