"""Deadlines, quorum and soft members (issue 33) on a real TorchServe on 127.0.0.1, with the real token.

The `faults` ensemble (tests/conftest.py `write_fault_ensemble`): seven members over [3, 4] instances, policy majority,
two that always answer (`steady` required, `calm` soft) and five that sleep, raise, answer NaN or hang on instances
whose first value is their mark. Expected answers come from the members' own modules (their fault-free forward,
tests/fixture_models.py) and tests/policy_reference.py over the members that answered; `partial` from a brute force
written here: no expected value comes from handlers/ (which only builds the archive). Every request loop is bounded,
every request has a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy
import pytest
import requests
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from archive_scripts.waiting import wait_for
from handlers.config.files import load_ensembles
from tests.conftest import FAULTY_MEMBERS, LABELS, NPY, instances, marked, npy_bytes, write_fault_ensemble
from tests.fixture_models import TinyMLP
from tests.fixture_reference import assert_answers, module
from tests.policy_reference import Policy, Task, predict
from tests.protocol_clients import generate, grpc_predict

# How long a worker with a stuck member must have been idle before it exits (handlers/worker_exit.py).
QUIET_S = 1.0

pytestmark = pytest.mark.integration
TIMEOUT = 60
PORT_OFFSET = 12300
NAME = "faults"
MEMBERS = tuple(FAULTY_MEMBERS)
TASK = Task("multiclass", tuple(LABELS["multiclass"]))
SLOW, BROKEN, NAN, STIFF, HANG = 1.0, 2.0, 3.0, 4.0, 5.0
STUCK_AFTER_S = 2
TIMEOUT_MS = 10_000  # the faults ensemble's response_timeout_s
RAISED = "error: RuntimeError: injected fault on a marked instance"  # tests/fixture_models.py FaultyMLP
RETRY = "retry, give it a longer deadline_ms, or lower min_members"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """faults.mar, built from tests/conftest.py's fault ensemble (sources under ../src/faults, as fixture_reference
    expects them)."""
    root = tmp_path_factory.mktemp("faults")
    build_archive(load_ensembles(write_fault_ensemble(root / "src" / NAME))[NAME], root / "model_store")
    return root / "model_store"


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = private_server(tmp_path_factory.mktemp("torchserve"), store, port_offset=PORT_OFFSET)
    try:
        start(instance, store)
        register(instance, NAME, workers=1)
        for extra in ({}, deadline(2000)):  # Warm up: the members' threads and their lanes exist before timing.
            assert send(instance, instances(1, 2), extra)[0].status_code == 200
        yield instance
    finally:
        stop(instance)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return generate(tmp_path_factory.mktemp("grpc_stubs"))


# ----- requests


def deadline(ms: int | str | None = None, min_members: int | str | None = None, **more: str) -> dict[str, str]:
    """X-Ensemble-* headers for the parameters given."""
    sent = {"deadline_ms": ms, "min_members": min_members, **more}
    return {f"X-Ensemble-{k.replace('_', '-').title()}": str(v) for k, v in sent.items() if v is not None}


def send(
    server: Server, values: Any, headers: dict[str, str] | None = None, *, invoke: dict[str, str] | None = None
) -> tuple[requests.Response, float]:
    """POST instances as .npy (to /models/faults/invoke with `invoke` as its query); the response and seconds taken."""
    path = f"models/{NAME}/invoke" if invoke is not None else f"predictions/{NAME}"
    began = time.perf_counter()
    response = requests.post(
        f"{server.inference}/{path}",
        data=npy_bytes(values),
        params=invoke,
        headers={**server.headers("inference"), **NPY, **(headers or {})},
        timeout=TIMEOUT,
    )
    return response, time.perf_counter() - began


def post_json(server: Server, path: str, body: dict[str, Any]) -> requests.Response:
    headers = {**server.headers("inference"), "Content-Type": "application/json"}
    return requests.post(f"{server.inference}/{path}", data=json.dumps(body), headers=headers, timeout=TIMEOUT)


def v2_tensor(values: numpy.ndarray, **parameters: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(values.shape), "datatype": "FP32", "data": values.flatten().tolist()}
    return {"inputs": [tensor], "parameters": parameters}


def drain(server: Server) -> None:
    """A request without a deadline: it waits for every lane still running an earlier call, so the next test starts
    with idle members; every member answers it."""
    response, _ = send(server, instances(999, 1))
    assert response.status_code == 200, response.text
    assert [p["missing"] for p in response.json()["predictions"]] == [{}]


# ----- the independent expectation


def member_probs(store: Path, values: numpy.ndarray) -> dict[str, numpy.ndarray]:
    """Each member's softmax over the labels, from its own module and weights, by its fault-free forward."""
    rows = torch.from_numpy(values)
    probs = {}
    for member in MEMBERS:
        built = module(store, NAME, member)
        assert isinstance(built, TinyMLP), built  # FaultyMLP is a TinyMLP with faults added to its forward
        with torch.no_grad():
            probs[member] = torch.softmax(TinyMLP.forward(built, rows), dim=1).double().numpy()
    return probs


def could_change(answered: dict[str, numpy.ndarray], absent: int, policy: str, label: str | None) -> bool:
    """`partial` by brute force: each absent member could have voted for any label; the answer is partial when some
    assignment of their votes, counted with the others' under `policy` over every member, gives another winner (or
    another abstention) or a tie at the top. `mean` and `max` need every member's probabilities: always partial."""
    if not absent:
        return False
    if policy in ("mean", "max"):
        return True
    assert policy == "majority", policy
    k = (len(answered) + absent) // 2 + 1
    base = Counter(TASK.labels[int(numpy.argmax(p))] for p in answered.values())
    for votes in itertools.product(TASK.labels, repeat=absent):
        counts = base + Counter(votes)
        top = max(counts.values())
        leaders = [label for label in TASK.labels if counts[label] == top]
        outcome = None if top < k else leaders[0] if len(leaders) == 1 else "tie"
        if outcome != label:
            return True
    return False


def expected(
    store: Path, values: numpy.ndarray, missing: list[dict[str, str]], policy: str = "majority"
) -> list[dict[str, Any]]:
    """Per instance: the prediction of the members that answered (policy_reference), its `missing` and `partial`."""
    probs = member_probs(store, values)
    out = []
    for i, gone in enumerate(missing):
        answered = {m: probs[m][i] for m in MEMBERS if m not in gone}
        prediction = predict(TASK, answered, dict.fromkeys(MEMBERS, 1.0), Policy(policy))
        prediction.update(missing=gone, partial=could_change(answered, len(gone), policy, prediction["label"]))
        out.append(prediction)
    return out


def assert_served(body: dict[str, Any], want: list[dict[str, Any]]) -> None:
    """Labels, scores and members' views as the reference says; `missing` and `partial` exactly."""
    assert body["format"] == "2.2"
    assert_answers(body["predictions"], want)
    assert [(p["missing"], p["partial"]) for p in body["predictions"]] == [(w["missing"], w["partial"]) for w in want]


def refusal(missing: dict[str, str], images: list[int], problem: str) -> dict[str, Any]:
    """The 503 QuorumNotMet body of our JSON form."""
    where = f"image {images[0]}" if len(images) == 1 else f"images {', '.join(map(str, images))}"
    reasons = "; ".join(f"{m}: {why}" for m, why in missing.items())
    message = f"{problem} for {where} ({reasons}); {RETRY}"
    return {"code": 503, "type": "QuorumNotMet", "message": message, "missing": missing, "images": images}


# ----- 1. within the deadline


@pytest.mark.parametrize("policy", ["majority", "mean"])
def test_answer_comes_within_the_deadline_without_the_slow_member(server: Server, store: Path, policy: str) -> None:
    values = marked(2, 4, {0: SLOW})
    response, elapsed = send(server, values, deadline(150, policy=policy))
    drain(server)
    assert response.status_code == 200, response.text
    assert elapsed < 0.2, f"answered in {elapsed:.3f} s, deadline 150 ms"
    want = expected(store, values, [{"slow": "deadline"}] * 4, policy)
    assert_served(response.json(), want)
    assert {w["partial"] for w in want} == ({True, False} if policy == "majority" else {True})


# ----- 2. soft and required members, quorum


@pytest.mark.parametrize(
    ("mark", "headers", "status", "missing", "problem"),
    [
        pytest.param(BROKEN, {}, 200, [{"broken": RAISED}] * 2, None, id="raises-soft"),
        pytest.param(NAN, {}, 200, [{"nan": "non_finite"}, {}], None, id="nan-soft"),
        pytest.param(
            STIFF,
            deadline(150),
            503,
            [{"stiff": "deadline"}] * 2,
            "required member(s) stiff did not answer",
            id="overruns-required",
        ),
        pytest.param(
            NAN,
            deadline(min_members=7),
            503,
            [{"nan": "non_finite"}, {}],
            "6 of 7 member(s) answered, min_members=7",
            id="below-min-members",
        ),
        pytest.param(
            BROKEN,
            deadline(min_members=7),
            503,
            [{"broken": RAISED}] * 2,
            "6 of 7 member(s) answered, min_members=7",
            id="raises-below-min-members",
        ),
    ],
)
def test_soft_members_leave_required_ones_refuse(
    server: Server,
    store: Path,
    mark: float,
    headers: dict[str, str],
    status: int,
    missing: list[dict[str, str]],
    problem: str | None,
) -> None:
    values = marked(3, 2, {0: mark})
    response, _ = send(server, values, headers)
    drain(server)
    assert response.status_code == status, response.text
    if problem is None:
        assert_served(response.json(), expected(store, values, missing))
    else:
        images = [i for i, gone in enumerate(missing) if gone]
        assert response.json() == refusal(missing[0], images, problem)


def test_the_other_requests_of_a_refused_requests_batch_are_answered(server: Server, store: Path) -> None:
    """One batch (X-Ensemble-Batch-Requests says so) of four: two refused, two answered."""
    cases = [
        (marked(4, 2, {0: NAN}), deadline(min_members=7)),  # 503: nan missing, 6 of 7
        (marked(5, 2, {1: NAN}), {}),  # 200, nan missing on instance 1
        (instances(6, 2), {}),  # 200, every member
        (marked(7, 1, {0: STIFF}), deadline(150)),  # 503: stiff past its deadline (the batch waits for the others)
    ]
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        blocker = pool.submit(send, server, marked(8, 1, {0: SLOW}))  # 0.6 s on the worker, no deadline
        time.sleep(0.2)  # The blocker is taken up alone; the four queue behind it and are batched together.
        futures = [pool.submit(send, server, values, headers) for values, headers in cases]
        replies = [future.result()[0] for future in futures]
        assert blocker.result()[0].status_code == 200
    drain(server)
    assert [r.headers["X-Ensemble-Batch-Requests"] for r in replies] == ["4"] * 4
    assert [r.status_code for r in replies] == [503, 200, 200, 503]
    nan_seven = "6 of 7 member(s) answered, min_members=7"
    assert replies[0].json() == refusal({"nan": "non_finite"}, [0], nan_seven)
    assert_served(replies[1].json(), expected(store, cases[1][0], [{}, {"nan": "non_finite"}]))
    assert_served(replies[2].json(), expected(store, cases[2][0], [{}, {}]))
    assert replies[3].json() == refusal({"stiff": "deadline"}, [0], "required member(s) stiff did not answer")


# ----- 3. every channel carries deadline_ms; bad values


@pytest.mark.parametrize("channel", ["header", "invoke-query", "json-parameters", "v2-parameters", "grpc"])
def test_every_channel_carries_the_deadline(
    server: Server, store: Path, stubs: tuple[ModuleType, ModuleType], channel: str
) -> None:
    values = marked(9, 2, {1: SLOW})
    if channel == "header":
        body = send(server, values, deadline(150))[0].json()
    elif channel == "invoke-query":
        body = send(server, values, invoke={"deadline_ms": "150"})[0].json()
    elif channel == "json-parameters":
        sent = {"instances": values.tolist(), "parameters": {"deadline_ms": 150}}
        body = post_json(server, f"predictions/{NAME}", sent).json()
    elif channel == "v2-parameters":
        body = post_json(server, f"v2/models/{NAME}/infer", v2_tensor(values, deadline_ms=150)).json()
    else:
        address = f"127.0.0.1:{server.setting('grpc_inference_port')}"
        with grpc.insecure_channel(address) as opened:
            inputs = {"data": npy_bytes(values), "deadline_ms": b"150"}
            body = json.loads(grpc_predict(stubs, opened, NAME, inputs, token=server.key("inference")).prediction)
    drain(server)
    want = expected(store, values, [{"slow": "deadline"}] * 2)
    if channel == "v2-parameters":
        outputs = {o["name"]: o["data"] for o in body["outputs"]}
        assert outputs["missing"] == ['{"slow": "deadline"}'] * 2
        assert outputs["label"] == [w["label"] or "" for w in want]
    else:
        assert_served(body, want)


DEADLINE_RANGE = "deadline_ms must be a whole number of milliseconds from 1 to 10000 (the response timeout), got {}"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param(deadline(0), DEADLINE_RANGE.format('"0"'), id="deadline-0"),
        pytest.param(deadline(-5), DEADLINE_RANGE.format('"-5"'), id="deadline-negative"),
        pytest.param(deadline("abc"), DEADLINE_RANGE.format('"abc"'), id="deadline-text"),
        pytest.param(deadline(TIMEOUT_MS + 1), DEADLINE_RANGE.format('"10001"'), id="deadline-over-timeout"),
        pytest.param(deadline(min_members=0), "min_members must be an integer from 1 to 7, got '0'", id="min-0"),
        pytest.param(deadline(min_members=8), "min_members must be an integer from 1 to 7, got '8'", id="min-8"),
        pytest.param(
            deadline(min_members=3, members="steady,calm"),
            "min_members must be an integer from 1 to 2, got '3'",
            id="min-over-requested",
        ),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(server: Server, headers: dict[str, str], message: str) -> None:
    response, _ = send(server, instances(10, 1), headers)
    assert response.status_code == 400
    assert response.json() == {"code": 400, "type": "RequestError", "message": message}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        pytest.param({"deadline_ms": 0}, DEADLINE_RANGE.format("0"), id="deadline-0"),
        pytest.param({"deadline_ms": TIMEOUT_MS + 1}, DEADLINE_RANGE.format("10001"), id="deadline-over-timeout"),
        pytest.param({"min_members": 8}, "min_members must be an integer from 1 to 7, got 8", id="min-8"),
    ],
)
def test_bad_values_in_v2_parameters(server: Server, parameters: dict[str, int], message: str) -> None:
    response = post_json(server, f"v2/models/{NAME}/infer", v2_tensor(instances(11, 1), **parameters))
    assert response.status_code == 400
    assert response.json() == {"error": message}


# ----- 4. v2 answers


def test_v2_outputs_say_what_is_missing_and_whether_it_matters(server: Server, store: Path) -> None:
    values = marked(12, 3, {0: NAN, 1: SLOW})
    response = post_json(server, f"v2/models/{NAME}/infer", v2_tensor(values, deadline_ms=150))
    drain(server)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    missing = [{"nan": "non_finite", "slow": "deadline"}, {"slow": "deadline"}, {"slow": "deadline"}]
    want = expected(store, values, missing)
    assert outputs["missing"] == {
        "name": "missing",
        "datatype": "BYTES",
        "shape": [3],
        "data": ['{"nan": "non_finite", "slow": "deadline"}', '{"slow": "deadline"}', '{"slow": "deadline"}'],
    }
    assert outputs["partial"] == {
        "name": "partial",
        "datatype": "BOOL",
        "shape": [3],
        "data": [w["partial"] for w in want],
    }
    assert outputs["label"]["data"] == [w["label"] or "" for w in want]
    assert response.json()["parameters"]["format"] == "2.2"

    refused = post_json(server, f"v2/models/{NAME}/infer", v2_tensor(marked(13, 1, {0: STIFF}), deadline_ms=150))
    drain(server)
    assert refused.status_code == 503
    message = f"required member(s) stiff did not answer for image 0 (stiff: deadline); {RETRY}"
    assert refused.json() == {"error": message, "missing": {"stiff": "deadline"}}


# ----- 5. busy


def test_a_soft_member_still_running_an_earlier_call_is_busy(server: Server, store: Path) -> None:
    first_values, second_values = marked(14, 2, {0: SLOW}), instances(15, 2)
    first, _ = send(server, first_values, deadline(100))
    second, _ = send(server, second_values, deadline(100))
    drain(server)
    assert (first.status_code, second.status_code) == (200, 200)
    assert_served(first.json(), expected(store, first_values, [{"slow": "deadline"}] * 2))
    assert_served(second.json(), expected(store, second_values, [{"slow": "busy"}] * 2))


# ----- 7. metrics (before the hang: a worker that exits loses the counts of its last second)


MISSING_TOTAL = "ensemble_member_missing_total"
Counts = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: Server) -> Counts:
    """The faults ensemble's issue-33 counters on TorchServe's metrics endpoint, by (name, our labels)."""
    text = requests.get(f"{server.setting('metrics_address')}/metrics", timeout=TIMEOUT).text
    out: Counts = {}
    for name, labels, value in re.findall(r"(?m)^(ensemble_\w+)\{(.*)\} (\S+)$", text):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        wanted = (MISSING_TOTAL, "ensemble_partial_answers_total", "ensemble_quorum_failures_total")
        if name in wanted and pairs.pop("ModelName", None) == NAME:
            ours = tuple(sorted((k, v) for k, v in pairs.items() if k not in ("Level", "Hostname")))
            out[name, ours] = float(value)
    return out


def steady_counts(server: Server) -> Counts:
    """The counters once two scrapes 1.5 s apart (more than the worker's 1 s flush) agree."""

    def steady() -> Counts:
        first = scrape(server)
        time.sleep(1.5)
        second = scrape(server)
        return second if second == first else {}

    return wait_for(steady, "the ensemble's counters steady", 30, every_s=0)


def missing_series(member: str, reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return MISSING_TOTAL, (("Member", member), ("Reason", reason))


def missing_increments(before: Counts, after: Counts) -> Counter[tuple[str, tuple[tuple[str, str], ...]]]:
    """How much each ensemble_member_missing_total series grew."""
    return +Counter({key: int(value - before.get(key, 0.0)) for key, value in after.items() if key[0] == MISSING_TOTAL})


def test_metrics_count_missing_members_partial_answers_and_quorum_failures(server: Server, store: Path) -> None:
    before = steady_counts(server)
    raised, nan_refused, late = marked(16, 2, {0: BROKEN}), marked(17, 2, {0: NAN}), marked(18, 2, {0: SLOW})
    busy = instances(19, 2)
    sent = [
        (raised, {}, 200, [{"broken": RAISED}] * 2),
        (nan_refused, deadline(min_members=7), 503, [{"nan": "non_finite"}, {}]),
        (late, deadline(150), 200, [{"slow": "deadline"}] * 2),
        (busy, deadline(150), 200, [{"slow": "busy"}] * 2),
    ]
    partial = 0
    for values, headers, status, missing in sent:
        response, _ = send(server, values, headers)
        assert response.status_code == status, response.text
        if status == 200:
            want = expected(store, values, missing)
            assert_served(response.json(), want)
            partial += sum(w["partial"] for w in want)
    drain(server)
    increments = {
        missing_series("broken", "error"): 2.0,
        missing_series("nan", "non_finite"): 1.0,
        missing_series("slow", "deadline"): 2.0,
        missing_series("slow", "busy"): 2.0,
        ("ensemble_quorum_failures_total", ()): 1.0,
        ("ensemble_partial_answers_total", ()): float(partial),
    }
    counted = {key: before.get(key, 0.0) + increments.get(key, 0.0) for key in {*before, *increments}}
    with contextlib.suppress(TimeoutError):  # The assertion below shows what was counted instead.
        wait_for(lambda: scrape(server) == counted, "the counters", 30)
    assert steady_counts(server) == counted
    assert all(missing_series(m, r) in before for m in MEMBERS for r in ("deadline", "busy", "error", "non_finite"))


def test_a_deadline_counts_from_a_proxys_stamp(server: Server) -> None:
    """Stamped 3 s ago by a proxy in front, with 1 s to answer: no member may answer, so every one is `deadline`."""
    stamp = {"X-Request-Start": f"t={time.time() - 3:.6f}"}
    response, _ = send(server, instances(30, 1), {**deadline(1000), **stamp})
    assert (response.status_code, response.json()["missing"]) == (503, dict.fromkeys(MEMBERS, "deadline"))


# ----- 6. a hung member, the worker replaced, nothing lost


def worker_pids(server: Server) -> list[tuple[int, str]]:
    """(pid, status) of each of the ensemble's workers, from the management API."""
    response = requests.get(f"{server.management}/models/{NAME}", headers=server.headers("management"), timeout=10)
    return [(w["pid"], w["status"]) for w in response.json()[0]["workers"]]


def load_client(server: Server, c: int) -> list[tuple[int | str, dict[str, str] | None]]:
    """10 unmarked requests with deadline_ms 300, one every 0.4 s, so the load spans the stuck call and the restart:
    (status, the prediction's or the refusal's missing) each, or (the exception's name, None) when no response came
    within 30 s (more than the response timeout and a worker's restart)."""
    answers: list[tuple[int | str, dict[str, str] | None]] = []
    for r in range(10):
        try:
            response = requests.post(
                f"{server.inference}/predictions/{NAME}",
                data=npy_bytes(instances(1000 + 10 * c + r, 1)),
                headers={**server.headers("inference"), **NPY, **deadline(300)},
                timeout=30,
            )
        except requests.RequestException as e:
            answers.append((type(e).__name__, None))
        else:
            body = response.json()
            answers.append(
                (response.status_code, body["predictions"][0]["missing"] if "predictions" in body else body["missing"])
            )
        time.sleep(0.4)
    return answers


def test_a_hung_member_is_answered_then_its_worker_replaced_with_nothing_lost(server: Server, store: Path) -> None:
    """The hung call is left behind: the member gets a new thread and answers the load again, and once the load is
    over (the worker idle) the worker exits and TorchServe starts another."""
    [(old_pid, _)] = worker_pids(server)
    before = steady_counts(server)
    with ThreadPoolExecutor(4) as pool:
        load = [pool.submit(load_client, server, c) for c in range(4)]
        time.sleep(0.5)
        hung, _ = send(server, marked(20, 1, {0: HANG}), deadline(300))
        assert hung.status_code == 200, hung.text
        assert [p["missing"] for p in hung.json()["predictions"]] == [{"hang": "deadline"}]
        answers = [answer for future in load for answer in future.result()]
    load_over = time.monotonic()
    [(new_pid, _)] = wait_for(
        lambda: [w for w in worker_pids(server) if w[0] not in (old_pid, -1)], "a new worker", STUCK_AFTER_S + 20
    )
    started_after = time.monotonic() - load_over
    wait_for(lambda: worker_pids(server) == [(new_pid, "READY")], "the new worker ready", 60)
    ready_after = time.monotonic() - load_over
    outcomes = Counter((status, json.dumps(missing)) for status, missing in answers)
    print(
        f"worker {old_pid} -> {new_pid}: started {started_after:.1f} s, ready {ready_after:.1f} s after the load; "
        f"the load's outcomes: {dict(outcomes)}"
    )
    # The dying worker's counts are not lost either: each member missing from an answer is counted once.
    counted = Counter(
        missing_series(member, why.split(":")[0])
        for _, missing in [*answers, (200, {"hang": "deadline"})]
        for member, why in (missing or {}).items()
    )
    with contextlib.suppress(TimeoutError):  # The assertion below shows what was counted instead.
        wait_for(lambda: missing_increments(before, scrape(server)) == counted, "the missing members counted", 30)
    assert missing_increments(before, scrape(server)) == counted
    assert len(answers) == 40
    assert {status for status, _ in answers} <= {200, 503}, outcomes
    assert all(set(missing or {}) <= {"hang"} for status, missing in answers if status == 200), outcomes
    assert started_after < QUIET_S + 8, f"new worker after {started_after:.1f} s"
    drain(server)
    after = instances(21, 2)
    response, _ = send(server, after, deadline(300))
    assert response.status_code == 200, response.text
    assert_served(response.json(), expected(store, after, [{}, {}]))
