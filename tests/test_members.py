"""`members=a,b`: a request runs and combines only the members it names, through the real handler."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from ts.context import Context

from handlers.ensemble import Ensemble
from handlers.ensemble_handler import EnsembleHandler
from handlers.ensemble_metrics import batch_counts
from handlers.inputs.prepare import PreparedRequest
from handlers.weights.loading import load_member, sha256_of
from tests.conftest import image_bytes, load_handler, serve, source_spec
from tests.fixture_reference import assert_answers, expected_answers, member_probabilities

MEMBERS = ("mobile", "pool_rgb", "pool_gray")
WEIGHTS = {"mobile": 1.0, "pool_rgb": 2.0, "pool_gray": 1.0}
IMAGES = [image_bytes(seed) for seed in (41, 42, 43)]
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def trio(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "trio", tmp_path_factory.mktemp("trio"))


@pytest.mark.parametrize(
    "subset",
    [("mobile",), ("mobile", "pool_gray"), ("pool_rgb", "pool_gray"), MEMBERS],
    ids=["one", "two-light", "two-heavy", "all"],
)
def test_mean_of_the_named_members_only(
    trio: tuple[EnsembleHandler, Context], test_store: Path, subset: tuple[str, ...]
) -> None:
    handler, context = trio
    rows = [({"body": image, "members": ",".join(reversed(subset)).encode()}, PNG) for image in IMAGES]
    replies = serve(handler, context, rows)
    probs = member_probabilities(test_store, "trio", IMAGES)
    mean = sum(probs[m] * WEIGHTS[m] for m in subset) / sum(WEIGHTS[m] for m in subset)
    assert isinstance(mean, numpy.ndarray)
    labels = handler.ensemble.spec.labels
    archived = {m.name: sha256_of(handler.ensemble.spec.base_dir / m.weights) for m in handler.ensemble.spec.members}
    for i, (status, body, _) in enumerate(replies):
        assert status == 200
        assert body["answered_by"] == list(subset)
        assert list(body["members"]) == list(subset)
        assert body["provenance"]["member_sha256"] == {m: archived[m] for m in subset}
        [prediction] = body["predictions"]
        assert list(prediction["members"]) == list(subset)
        assert prediction["label"] == labels[int(mean[i].argmax())]
        assert prediction["score"] == pytest.approx(float(mean[i].max()), abs=1e-5)
        for member in subset:
            assert prediction["members"][member]["score"] == pytest.approx(float(probs[member][i].max()), abs=1e-5)


def counted_ensemble(test_store: Path) -> tuple[Ensemble, dict[str, int]]:
    """The trio on eager with a hook on every member that counts the rows it computes."""
    spec = source_spec(test_store, "trio").with_plan("eager")
    modules = [load_member(member, spec.base_dir)[0] for member in spec.members]
    rows = dict.fromkeys(MEMBERS, 0)
    for name, module in zip(MEMBERS, modules, strict=True):
        module.register_forward_hook(
            lambda _, args, __, name=name: rows.__setitem__(name, rows[name] + args[0].shape[0])
        )
    sources = {m.name: {"file": m.weights, "sha256": "0" * 64} for m in spec.members}
    ensemble = Ensemble(spec, modules, torch.device("cpu"), {}, sources)
    for name in rows:
        rows[name] = 0
    return ensemble, rows


def test_members_left_out_are_not_computed(test_store: Path) -> None:
    ensemble, rows = counted_ensemble(test_store)
    requests = [
        ensemble.prepare({"body": IMAGES[0], "members": b"mobile"}, PNG),
        ensemble.prepare({"body": image_bytes(44), "members": b"pool_gray,mobile"}, {}),
        ensemble.prepare({"body": IMAGES[1]}, {}),
        ensemble.prepare({"body": IMAGES[2], "members": b"pool_gray"}, {}),
    ]
    assert all(isinstance(r, PreparedRequest) for r in requests)
    answer = ensemble.answer_batch(requests)
    assert rows == {"mobile": 3, "pool_rgb": 1, "pool_gray": 3}
    assert [reply.members for reply in answer.replies] == [
        ("mobile",),
        ("mobile", "pool_gray"),
        MEMBERS,
        ("pool_gray",),
    ]
    expected = [
        expected_answers(test_store, "trio", [image], **({"members": m} if m else {}))
        for image, m in (
            (IMAGES[0], "mobile"),
            (image_bytes(44), "mobile,pool_gray"),
            (IMAGES[1], None),
            (IMAGES[2], "pool_gray"),
        )
    ]
    for reply, want in zip(answer.replies, expected, strict=True):
        assert_answers(reply.body["predictions"], want)
    counts = batch_counts(answer, members=MEMBERS, labels=ensemble.spec.labels, single_label=True)
    assert {m: counts["ensemble_member_images_total", (m,)] for m in MEMBERS} == {
        "mobile": 3,
        "pool_rgb": 1,
        "pool_gray": 3,
    }


def test_no_member_runs_when_no_request_needs_it(test_store: Path) -> None:
    ensemble, rows = counted_ensemble(test_store)
    answer = ensemble.answer_batch([ensemble.prepare({"body": image, "members": b"pool_rgb"}, {}) for image in IMAGES])
    assert rows == {"mobile": 0, "pool_rgb": 3, "pool_gray": 0}
    assert answer.forward_seconds["mobile"] == answer.forward_seconds["pool_gray"] == 0.0
    assert answer.forward_seconds["pool_rgb"] > 0.0


@pytest.mark.parametrize(
    ("row", "headers"),
    [
        pytest.param({"members": b"pool_gray,mobile"}, PNG, id="query-or-form-field"),
        pytest.param({}, {**PNG, "X-Ensemble-Members": "mobile, pool_gray"}, id="header"),
        pytest.param({"json": ["mobile", "pool_gray"]}, {}, id="json-list"),
        pytest.param({"json": "mobile,pool_gray"}, {}, id="json-string"),
    ],
)
def test_members_on_every_channel(
    trio: tuple[EnsembleHandler, Context], test_store: Path, row: dict[str, Any], headers: dict[str, str]
) -> None:
    if "json" in row:
        body = {"instances": [{"b64": base64.b64encode(IMAGES[0]).decode()}], "parameters": {"members": row["json"]}}
        request = ({"body": json.dumps(body).encode()}, {"Content-Type": "application/json"})
    else:
        request = ({"body": IMAGES[0], **row}, headers)
    [(status, body, _)] = serve(*trio, [request])
    assert status == 200
    assert body["answered_by"] == ["mobile", "pool_gray"]
    assert_answers(body["predictions"], expected_answers(test_store, "trio", IMAGES[:1], members="mobile,pool_gray"))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param(
            {"members": "mobile,resnet"},
            "unknown member(s) ['resnet']; valid members: mobile, pool_rgb, pool_gray",
            id="unknown",
        ),
        pytest.param(
            {"members": "mobile,,pool_rgb"},
            "members must be member names separated by commas, like members=mobile; valid: mobile, pool_rgb, pool_gray",
            id="empty-name",
        ),
        pytest.param(
            {"members": "mobile,mobile"}, "member(s) ['mobile'] named twice in members; name each once", id="twice"
        ),
        pytest.param(
            {"members": "mobile,pool_gray", "policy": "k_of_n", "k": "3"},
            "k must be an integer from 1 to 2, got '3' (k counts the 2 member(s) this request asked for: "
            "members=mobile,pool_gray)",
            id="k-beyond-the-subset",
        ),
    ],
)
def test_bad_members_are_400_alone_in_their_batch(
    trio: tuple[EnsembleHandler, Context], test_store: Path, params: dict[str, str], message: str
) -> None:
    bad = ({"body": IMAGES[0], **{k: v.encode() for k, v in params.items()}}, PNG)
    (status, body, _), (good_status, good, _) = serve(*trio, [bad, ({"body": IMAGES[1]}, PNG)])
    assert (status, body["message"]) == (400, message)
    assert good_status == 200
    assert_answers(good["predictions"], expected_answers(test_store, "trio", IMAGES[1:2]))


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        pytest.param(["mobile", "pool_gray"], (200, ["mobile", "pool_gray"]), id="a-list-of-names"),
        pytest.param(
            [],
            (
                400,
                "members must be member names separated by commas, like members=mobile; "
                "valid: mobile, pool_rgb, pool_gray",
            ),
            id="an-empty-list",
        ),
    ],
)
def test_a_json_body_names_members_as_a_list(
    trio: tuple[EnsembleHandler, Context], members: list[str], expected: tuple[int, object]
) -> None:
    """In a JSON body's `parameters`, `members` may be a list; an empty one names no member, as `members=` does."""
    body = {"instances": [{"b64": base64.b64encode(IMAGES[0]).decode()}], "parameters": {"members": members}}
    [(status, answer, _)] = serve(*trio, [({"body": json.dumps(body).encode()}, {"Content-Type": "application/json"})])
    assert (status, answer["answered_by"] if status == 200 else answer["message"]) == expected


def test_k_of_n_counts_the_subset(trio: tuple[EnsembleHandler, Context], test_store: Path) -> None:
    row = {"body": IMAGES[2], "members": b"mobile,pool_rgb", "policy": b"k_of_n", "k": b"2"}
    [(status, body, _)] = serve(*trio, [(row, PNG)])
    probs = member_probabilities(test_store, "trio", IMAGES[2:])
    votes = [int(probs[m][0].argmax()) for m in ("mobile", "pool_rgb")]
    labels = trio[0].ensemble.spec.labels
    assert status == 200
    assert body["policy"] == {"name": "k_of_n", "params": {"k": 2}}
    assert body["predictions"][0]["label"] == (labels[votes[0]] if votes[0] == votes[1] else None)


def test_v2_answers_with_the_named_members_outputs(trio: tuple[EnsembleHandler, Context]) -> None:
    request = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(IMAGES[0]).decode()]}
        ],
        "parameters": {"members": "pool_gray"},
    }
    asking_left_out = {**request, "outputs": [{"name": "label"}, {"name": "mobile.scores"}]}
    (status, body, _), (bad_status, bad, _) = serve(
        *trio,
        [({"body": json.dumps(r).encode()}, {"Content-Type": "application/json"}) for r in (request, asking_left_out)],
    )
    assert status == 200
    assert [o["name"] for o in body["outputs"]] == [
        "label",
        "scores",
        "pool_gray.label",
        "pool_gray.scores",
        "missing",
        "partial",
    ]
    assert body["parameters"]["members"] == "pool_gray"
    assert body["outputs"][0]["data"] == body["outputs"][2]["data"]
    assert (bad_status, bad) == (
        400,
        {"error": "outputs ['mobile.scores'] belong to members this request leaves out (members=pool_gray)"},
    )
