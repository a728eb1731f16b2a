"""Deadlines, quorum and soft members, in-process on the faults ensemble (tests/conftest.py `write_fault_ensemble`).

What a served answer should be comes from the members' own modules (tests/fixture_models.py, loaded from their
files) and tests/policy_reference.py over the members that answered; whether it is `partial` from the definition
itself, by trying every vote the missing members could have cast. tests/test_deadlines_served.py runs the same
faults on a real TorchServe.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import yaml

from handlers.answers.policies import Votes
from handlers.answers.policies import partial as partial_images
from handlers.config.files import load_ensembles
from handlers.config.policy import PolicySpec
from handlers.ensemble import Ensemble, Reply
from handlers.errors import ConfigError, RequestError
from handlers.inputs.prepare import PreparedRequest, arrival
from tests import policy_reference as ref
from tests.conftest import FAULTY_MEMBERS, LABELS, NPY, marked, npy_bytes, write_fault_ensemble
from tests.fixture_models import TinyMLP

TASK = ref.Task("multiclass", tuple(LABELS["multiclass"]))
MEMBERS = list(FAULTY_MEMBERS)
BROKEN = "error: RuntimeError: injected fault on a marked instance"
SLOW, BROKEN_MARK, NAN, STIFF = 1.0, 2.0, 3.0, 4.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fault_ensemble(tmp_path_factory.mktemp("faults")).parent


@pytest.fixture(scope="module")
def faults(folder: Path) -> Ensemble:
    return Ensemble.from_spec(load_ensembles(folder / "ensembles.yaml")["faults"], torch.device("cpu"), parallelism=2)


@pytest.fixture(autouse=True)
def idle_lanes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with no member call still running from the one before."""
    yield
    if "faults" in request.fixturenames:
        assert request.getfixturevalue("faults").runner.wait_idle(5)


def clean_probabilities(folder: Path, values: numpy.ndarray) -> dict[str, numpy.ndarray]:
    """Each member's softmax on `values`, from its own module and file, without its faults."""
    out = {}
    for name, (extra, _) in FAULTY_MEMBERS.items():
        module = TinyMLP(in_features=12, num_classes=3, hidden=extra.get("hidden", 16))
        module.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True))
        with torch.no_grad():
            out[name] = torch.softmax(module.eval()(torch.from_numpy(values)), dim=1).numpy()
    return out


def expected(folder: Path, values: numpy.ndarray, missing: list[set[str]], policy: str = "majority") -> list[dict]:
    """Per image: the label of the members that answered, and whether some vote of the missing ones would have
    given the full ensemble another answer (partial)."""
    probs = clean_probabilities(folder, values)
    weights = dict.fromkeys(MEMBERS, 1.0)
    out = []
    for i, gone in enumerate(missing):
        answered = {m: probs[m][i] for m in MEMBERS if m not in gone}
        label = ref.predict(TASK, answered, weights, ref.Policy(policy))["label"]
        fulls = set()
        for cast in itertools.product(range(3), repeat=len(gone)):
            everyone = {m: probs[m][i] for m in MEMBERS}
            everyone.update({m: numpy.eye(3)[c] for m, c in zip(sorted(gone), cast, strict=True)})
            fulls.add(ref.predict(TASK, everyone, weights, ref.Policy(policy))["label"])
        out.append({"label": label, "partial": fulls != {label}})
    return out


def ask(ensemble: Ensemble, values: numpy.ndarray, **params: Any) -> PreparedRequest:
    row = {"body": npy_bytes(values), **{name: str(value).encode() for name, value in params.items()}}
    return ensemble.prepare(row, {"content-type": NPY["Content-Type"]})


def answered(reply: Reply) -> list[dict]:
    assert reply.status == 200, reply.body
    return [{"label": p["label"], "missing": p["missing"], "partial": p["partial"]} for p in reply.body["predictions"]]


def want(folder: Path, values: numpy.ndarray, missing: list[dict[str, str]], policy: str = "majority") -> list[dict]:
    found = expected(folder, values, [set(gone) for gone in missing], policy)
    return [{**e, "missing": gone} for e, gone in zip(found, missing, strict=True)]


def test_a_member_that_raises_is_missing_from_that_request_only(faults: Ensemble, folder: Path) -> None:
    poisoned, clean = marked(1, 2, {1: BROKEN_MARK}), marked(2, 2, {})
    first, second = faults.answer_batch([ask(faults, poisoned), ask(faults, clean)]).replies
    assert answered(first) == want(folder, poisoned, [{"broken": BROKEN}] * 2)
    assert answered(second) == want(folder, clean, [{}, {}])


def test_non_finite_scores_leave_the_member_out_of_that_image_only(faults: Ensemble, folder: Path) -> None:
    values = marked(3, 3, {1: NAN})
    [reply] = faults.answer_batch([ask(faults, values)]).replies
    assert answered(reply) == want(folder, values, [{}, {"nan": "non_finite"}, {}])


@pytest.mark.parametrize(
    ("params", "missing"),
    [
        pytest.param({}, {}, id="no-deadline-waits-for-every-member"),
        pytest.param({"deadline_ms": 150}, {"slow": "deadline"}, id="deadline-leaves-the-slow-member-out"),
        pytest.param({"deadline_ms": 3000}, {}, id="a-deadline-the-member-makes"),
    ],
)
def test_a_deadline_leaves_out_the_members_still_running(
    faults: Ensemble, folder: Path, params: dict, missing: dict
) -> None:
    values = marked(4, 2, {0: SLOW})
    [reply] = faults.answer_batch([ask(faults, values, **params)]).replies
    assert answered(reply) == want(folder, values, [missing] * 2)


def test_a_soft_member_still_busy_is_left_out_at_once(faults: Ensemble, folder: Path) -> None:
    faults.answer_batch([ask(faults, marked(5, 1, {0: SLOW}), deadline_ms=50)])
    values = marked(6, 1, {})
    [reply] = faults.answer_batch([ask(faults, values, deadline_ms=50)]).replies
    assert answered(reply) == want(folder, values, [{"slow": "busy"}])


@pytest.mark.parametrize(
    ("deadline_ms", "status", "missing"),
    [
        pytest.param(50, 503, {"stiff": "busy"}, id="not-started-by-the-deadline"),
        pytest.param(3000, 200, {}, id="queued-behind-its-call-then-answers"),
    ],
)
def test_a_required_member_still_busy_is_waited_for_until_the_deadline(
    faults: Ensemble, folder: Path, deadline_ms: int, status: int, missing: dict
) -> None:
    [stalled] = faults.answer_batch([ask(faults, marked(7, 1, {0: STIFF}), deadline_ms=50)]).replies
    assert (stalled.status, stalled.body["missing"]) == (503, {"stiff": "deadline"})
    values = marked(8, 1, {})
    [reply] = faults.answer_batch([ask(faults, values, deadline_ms=deadline_ms)]).replies
    if status == 200:
        assert answered(reply) == want(folder, values, [missing])
    else:
        assert (reply.status, reply.body["type"], reply.body["missing"]) == (503, "QuorumNotMet", missing)


def test_without_its_quorum_a_request_gets_503_and_the_rest_of_its_batch_answers(
    faults: Ensemble, folder: Path
) -> None:
    short, fine = marked(9, 2, {0: BROKEN_MARK}), marked(10, 1, {})
    refused, reply = faults.answer_batch([ask(faults, short, min_members=7), ask(faults, fine, min_members=7)]).replies
    assert (refused.status, refused.error, refused.body) == (
        503,
        "QuorumNotMet",
        {
            "code": 503,
            "type": "QuorumNotMet",
            "message": f"6 of 7 member(s) answered, min_members=7 for images 0, 1 (broken: {BROKEN}); retry, give it a "
            "longer deadline_ms, or lower min_members",
            "missing": {"broken": BROKEN},
            "images": [0, 1],
        },
    )
    assert refused.missing == ({"broken": BROKEN}, {"broken": BROKEN})
    assert answered(reply) == want(folder, fine, [{}])


def test_a_required_member_missing_fails_the_request_whatever_min_members(faults: Ensemble) -> None:
    [reply] = faults.answer_batch([ask(faults, marked(11, 1, {0: STIFF}), deadline_ms=100, min_members=1)]).replies
    assert (reply.status, reply.body["message"], reply.body["missing"]) == (
        503,
        "required member(s) stiff did not answer for image 0 (stiff: deadline); retry, give it a longer deadline_ms, "
        "or lower min_members",
        {"stiff": "deadline"},
    )


@pytest.mark.parametrize("policy", ["any", "all", "majority", "mean", "max"])
def test_partial_is_whether_a_missing_member_could_have_changed_the_answer(
    faults: Ensemble, folder: Path, policy: str
) -> None:
    values = marked(12, 12, dict.fromkeys(range(12), BROKEN_MARK))
    [reply] = faults.answer_batch([ask(faults, values, policy=policy)]).replies
    served = answered(reply)
    if policy in ("mean", "max"):
        assert [p["partial"] for p in served] == [True] * 12
        labels = [e["label"] for e in want(folder, values, [{"broken": BROKEN}] * 12, policy)]
        assert [p["label"] for p in served] == labels
        return
    assert served == want(folder, values, [{"broken": BROKEN}] * 12, policy)


def test_a_v2_answer_carries_missing_and_partial(faults: Ensemble, folder: Path) -> None:
    values = marked(13, 2, {0: BROKEN_MARK})
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3, 4], "data": values.flatten().tolist()}]}
    )
    prepared = faults.prepare({"body": body.encode()}, {"content-type": "application/json"})
    [reply] = faults.answer_batch([prepared]).replies
    outputs = {o["name"]: o for o in reply.body["outputs"]}
    partial = [e["partial"] for e in want(folder, values, [{"broken": BROKEN}] * 2)]
    assert (outputs["missing"]["data"], outputs["partial"]["data"]) == ([json.dumps({"broken": BROKEN})] * 2, partial)
    assert (outputs["missing"]["datatype"], outputs["partial"]["datatype"]) == ("BYTES", "BOOL")


@pytest.mark.parametrize(
    ("row", "headers", "deadline_ms", "min_members"),
    [
        pytest.param({"deadline_ms": b"250"}, {}, 250, 1, id="query-or-field"),
        pytest.param({}, {"x-ensemble-deadline-ms": "250", "x-ensemble-min-members": "3"}, 250, 3, id="headers"),
        pytest.param({"members": b"steady,calm"}, {}, None, 1, id="defaults"),
    ],
)
def test_every_channel_carries_the_deadline_and_the_quorum(
    faults: Ensemble, row: dict, headers: dict, deadline_ms: int | None, min_members: int
) -> None:
    prepared = faults.prepare(
        {"body": npy_bytes(marked(14, 1, {})), **row}, {"content-type": NPY["Content-Type"], **headers}
    )
    assert (prepared.deadline_ms, prepared.min_members) == (deadline_ms, min_members)


def test_a_json_body_carries_them_as_numbers(faults: Ensemble) -> None:
    body = {"instances": marked(15, 1, {}).tolist(), "parameters": {"deadline_ms": 75, "min_members": 2}}
    prepared = faults.prepare({"body": json.dumps(body).encode()}, {"content-type": "application/json"})
    assert (prepared.deadline_ms, prepared.min_members) == (75, 2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        *(
            pytest.param(
                {"deadline_ms": value},
                "deadline_ms must be a whole number of milliseconds from 1 to 10000 (the response timeout), "
                f"got {shown}",
                id=f"deadline-{name}",
            )
            for name, value, shown in [
                ("zero", "0", '"0"'),
                ("negative", "-5", '"-5"'),
                ("text", "soon", '"soon"'),
                ("fraction", "2.5", '"2.5"'),
                ("above-the-timeout", "10001", '"10001"'),
            ]
        ),
        pytest.param({"min_members": "0"}, "min_members must be an integer from 1 to 7, got '0'", id="quorum-zero"),
        pytest.param({"min_members": "8"}, "min_members must be an integer from 1 to 7, got '8'", id="quorum-above-n"),
        pytest.param(
            {"members": "steady,calm", "min_members": "3"},
            "min_members must be an integer from 1 to 2, got '3'",
            id="quorum-above-the-requested-members",
        ),
    ],
)
def test_bad_deadlines_and_quorums_are_refused_with_what_is_allowed(
    faults: Ensemble, params: dict, message: str
) -> None:
    with pytest.raises(RequestError) as caught:
        ask(faults, marked(16, 1, {}), **params)
    assert (caught.value.status, str(caught.value)) == (400, message)


def test_the_yaml_deadline_is_every_requests_default_and_describe_shows_it(tmp_path: Path) -> None:
    path = write_fault_ensemble(tmp_path, deadline={"ms": 120, "min_members": 2, "stuck_after_s": 3})
    ensemble = Ensemble.from_spec(load_ensembles(path)["faults"], torch.device("cpu"))
    prepared = ask(ensemble, marked(17, 1, {}))
    described = ensemble.describe()
    assert (prepared.deadline_ms, prepared.min_members) == (120, 2)
    assert described["deadline"] == {"ms": 120, "min_members": 2, "stuck_after_s": 3}
    assert (described["parameters"]["deadline_ms"], described["parameters"]["min_members"]) == (
        {"range": [1, 10000], "default": 120},
        {"range": [1, 7], "default": 2},
    )
    assert [m["required"] for m in described["members"]] == [required for _, required in FAULTY_MEMBERS.values()]


@pytest.mark.parametrize(
    ("deadline", "message"),
    [
        pytest.param(
            {"ms": 10001},
            "ensembles.faults.deadline.ms: 10001 ms is above batching.response_timeout_s (10 s): TorchServe would time "
            "the worker out first; lower it or raise the timeout",
            id="above-the-response-timeout",
        ),
        pytest.param(
            {"min_members": 8},
            "ensembles.faults.deadline.min_members: expected at most the 7 member(s), got 8",
            id="quorum-above-the-members",
        ),
        pytest.param(
            {"ms": 2500, "stuck_after_s": 2},
            "ensembles.faults.deadline.stuck_after_s: 2 s must be longer than the deadline (2500 ms)",
            id="stuck-before-the-deadline",
        ),
    ],
)
def test_a_deadline_ensembles_yaml_cannot_keep_is_refused_at_build(
    tmp_path: Path, deadline: dict, message: str
) -> None:
    path = write_fault_ensemble(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["ensembles"]["faults"]["deadline"] = deadline
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as caught:
        load_ensembles(path)
    assert str(caught.value) == f"ensembles.yaml: {message}"


NAN_ROW = [float("nan")] * 2


@pytest.mark.parametrize(
    ("policy", "probs", "absent", "partial"),
    [
        pytest.param(PolicySpec("any", threshold=0.5), [[0.2, 0.8], [0.9, 0.1], NAN_ROW], 2, False, id="any-one-yes"),
        pytest.param(PolicySpec("any", threshold=0.5), [[0.8, 0.2], [0.9, 0.1], NAN_ROW], 2, True, id="any-all-no"),
        pytest.param(PolicySpec("all", threshold=0.5), [[0.8, 0.2], [0.2, 0.8], NAN_ROW], 2, False, id="all-one-no"),
        pytest.param(PolicySpec("all", threshold=0.5), [[0.2, 0.8], [0.1, 0.9], NAN_ROW], 2, True, id="all-all-yes"),
        pytest.param(
            PolicySpec("majority", threshold=0.5), [[0.2, 0.8], [0.1, 0.9], NAN_ROW], 2, False, id="majority-two-yes"
        ),
        pytest.param(
            PolicySpec("majority", threshold=0.5), [[0.2, 0.8], [0.9, 0.1], NAN_ROW], 2, True, id="majority-split"
        ),
        pytest.param(PolicySpec("mean", threshold=0.5), [[0.0, 1.0], [0.0, 1.0], NAN_ROW], 2, True, id="mean"),
        pytest.param(
            PolicySpec("cascade", threshold=0.5, confidence=0.6),
            [[0.3, 0.7], [0.9, 0.1], NAN_ROW],
            2,
            False,
            id="cascade-stopped-before-the-missing-stage",
        ),
        pytest.param(
            PolicySpec("cascade", threshold=0.5, confidence=0.6),
            [[0.5, 0.5], NAN_ROW, [0.1, 0.9]],
            1,
            True,
            id="cascade-reached-the-missing-stage",
        ),
    ],
)
def test_partial_by_hand(policy: PolicySpec, probs: list, absent: int, partial: bool) -> None:
    """Binary, three members in stages of one, declared order, `absent` missing: worked out from docs/policies.md."""
    scoring = torch.tensor([3, 3])  # Every member scores both labels.
    votes = Votes("binary", torch.ones(3, dtype=torch.float64), 1, policy, scoring=scoring, stages=((0,), (1,), (2,)))
    gone = torch.tensor([[m == absent] for m in range(3)])
    counted = replace(votes, absent=gone.sum(dim=0, keepdim=True).expand(1, 2))
    tensor = torch.tensor(probs, dtype=torch.float64)[:, None, :]
    assert partial_images(tensor, counted, gone).tolist() == [partial]


def test_uncertainty_and_top_k_count_the_members_that_answered(faults: Ensemble, folder: Path) -> None:
    values = marked(18, 2, {0: BROKEN_MARK})
    [reply] = faults.answer_batch([ask(faults, values, uncertainty="true", top_k=2)]).replies
    probs = clean_probabilities(folder, values)
    answering = {m: probs[m][0] for m in MEMBERS if m != "broken"}
    want_one = ref.predict(
        TASK, answering, dict.fromkeys(answering, 1.0), ref.Policy("majority", top_k=2, uncertainty=True)
    )
    served = reply.body["predictions"][0]
    assert list(served["members"]) == list(answering)
    assert served["uncertainty"] == pytest.approx(want_one["uncertainty"], abs=1e-6)
    assert [entry["label"] for entry in served["top"]] == [entry["label"] for entry in want_one["top"]]


def test_early_exit_under_a_deadline_skips_what_is_settled_and_misses_what_is_late(
    faults: Ensemble, folder: Path
) -> None:
    values = marked(19, 4, dict.fromkeys(range(4), SLOW))
    [reply] = faults.answer_batch([ask(faults, values, early_exit="true", deadline_ms=200)]).replies
    full = expected(folder, values, [set()] * 4)
    for served, whole in zip(reply.body["predictions"], full, strict=True):
        assert served["missing"] in ({}, {"slow": "deadline"})
        assert set(served["skipped"]).isdisjoint(served["missing"])
        if not served["partial"]:
            assert served["label"] == whole["label"]


@pytest.mark.parametrize(
    ("stamp", "waited"),
    [
        pytest.param(lambda now: f"t={now - 2.5:.6f}", 2.5, id="seconds"),
        pytest.param(lambda now: f"t={round((now - 2.5) * 1000)}", 2.5, id="milliseconds"),
        pytest.param(lambda now: f"t={round((now - 2.5) * 1e6)}", 2.5, id="microseconds"),
        pytest.param(lambda now: f"{now - 2.5:.3f}", 2.5, id="without-t"),
        pytest.param(lambda now: f"t={now + 30:.3f}", 0.0, id="from-the-future-is-now"),
    ],
)
def test_a_proxys_stamp_says_how_long_a_request_has_waited(stamp: Any, waited: float) -> None:
    arrived = arrival(stamp(time.time()), 10)
    assert arrived is not None
    assert time.monotonic() - arrived == pytest.approx(waited, abs=0.05)


@pytest.mark.parametrize("stamp", [None, "", "t=soon", "t=nan", f"t={time.time() - 60:.3f}"], ids=repr)
def test_a_stamp_that_is_no_recent_time_is_ignored(stamp: str | None) -> None:
    assert arrival(stamp, 10) is None


def test_a_deadline_counts_from_the_proxys_stamp(faults: Ensemble) -> None:
    """Stamped 3 s ago with 1 s to answer: the deadline has passed before any member runs."""
    row = {"body": npy_bytes(marked(20, 1, {})), "deadline_ms": b"1000"}
    headers = {**NPY, "X-Request-Start": f"t={time.time() - 3:.6f}"}  # TorchServe keeps the client's case.
    [reply] = faults.answer_batch([faults.prepare(row, headers)]).replies
    assert (reply.status, reply.body["missing"]) == (503, dict.fromkeys(MEMBERS, "deadline"))


def test_a_stuck_member_gets_a_new_thread_and_answers_again(tmp_path: Path, folder: Path) -> None:
    path = write_fault_ensemble(tmp_path, seconds={"slow": 1.6}, deadline={"stuck_after_s": 1})
    ensemble = Ensemble.from_spec(load_ensembles(path)["faults"], torch.device("cpu"))
    first = ensemble.answer_batch([ask(ensemble, marked(22, 1, {0: SLOW}), deadline_ms=100)])
    assert (answered(first.replies[0])[0]["missing"], first.stuck) == ({"slow": "deadline"}, ())
    time.sleep(1.1)  # The slow call has now run past stuck_after_s.
    values = marked(23, 1, {})
    second = ensemble.answer_batch([ask(ensemble, values, deadline_ms=100)])
    assert (answered(second.replies[0])[0]["missing"], second.stuck) == ({"slow": "busy"}, ("slow",))
    third = ensemble.answer_batch([ask(ensemble, values, deadline_ms=1000)])
    assert answered(third.replies[0]) == want(folder, values, [{}])
    assert ensemble.runner.wait_idle(5)
