"""`top_k`: a multiclass answer's best labels, ranked by the policy's own score, through the real handler."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from ts.context import Context

from handlers.ensemble_handler import EnsembleHandler
from tests.conftest import image_bytes, load_handler, serve
from tests.fixture_reference import member_probabilities

LABELS = ("cat", "dog", "fox")
MEMBERS = ("mobile", "pool_rgb", "pool_gray")
WEIGHTS = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64).view(-1, 1, 1)


@pytest.fixture(scope="module")
def trio(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "trio", tmp_path_factory.mktemp("trio"))


def probabilities(store: Path, images: list[bytes]) -> torch.Tensor:
    """probs[member, image, label], from the members' own modules (tests/fixture_reference.py), not the server's
    code."""
    return torch.from_numpy(numpy.stack(list(member_probabilities(store, "trio", images).values())))


def ranked(key: torch.Tensor, shown: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
    """Per image, the k labels with the highest `key` (lower index first on ties), showing `shown`."""
    out = []
    for row_key, row_shown in zip(key.tolist(), shown.tolist(), strict=True):
        order = sorted(range(len(LABELS)), key=lambda i: (-row_key[i], i))[:k]
        out.append([{"label": LABELS[i], "score": round(row_shown[i], 6)} for i in order])
    return out


def expected_top(probs: torch.Tensor, policy: str, k: int) -> list[list[dict[str, Any]]]:
    """The semantics docs/http/answer.md states for `top`, computed here from the members' probabilities."""
    if policy == "mean":
        mean = (probs * WEIGHTS).sum(dim=0) / WEIGHTS.sum()
        return ranked(mean, mean, k)
    if policy == "max":
        best = probs.max(dim=-1).values.argmax(dim=0)
        deciding = probs[best, torch.arange(probs.shape[1])]
        return ranked(deciding, deciding, k)
    votes = torch.nn.functional.one_hot(probs.argmax(dim=-1), len(LABELS)).sum(dim=0).to(torch.float64)
    share = votes / probs.shape[0]
    return ranked(votes + probs.mean(dim=0) / 2, share, k)


IMAGES = [image_bytes(seed) for seed in (31, 32, 33, 34, 35)]


@pytest.mark.parametrize("policy", ["mean", "majority", "any", "max"], ids=str)
@pytest.mark.parametrize("k", [1, 2, 3], ids=lambda k: f"k{k}")
def test_top_follows_the_policys_ranking(
    trio: tuple[EnsembleHandler, Context], test_store: Path, policy: str, k: int
) -> None:
    rows = [
        ({"body": image, "policy": policy.encode(), "top_k": str(k).encode()}, {"Content-Type": "image/png"})
        for image in IMAGES
    ]
    replies = serve(*trio, rows)
    probs = probabilities(test_store, IMAGES)
    want = expected_top(probs, policy, k)
    for i, (status, body, _) in enumerate(replies):
        assert status == 200
        [prediction] = body["predictions"]
        assert [t["label"] for t in prediction["top"]] == [t["label"] for t in want[i]]
        assert [t["score"] for t in prediction["top"]] == pytest.approx([t["score"] for t in want[i]], abs=1e-4)
        if prediction["label"] is not None:
            assert prediction["top"][0] == {"label": prediction["label"], "score": prediction["score"]}
        for m, member in enumerate(MEMBERS):
            member_top = ranked(probs[m, i : i + 1], probs[m, i : i + 1], k)[0]
            assert [t["label"] for t in prediction["members"][member]["top"]] == [t["label"] for t in member_top]


@pytest.mark.parametrize(
    ("row", "headers"),
    [
        pytest.param({"top_k": b"2"}, {}, id="query-or-form-field"),
        pytest.param({}, {"X-Ensemble-Top-K": "2"}, id="header"),
        pytest.param({"json": True}, {}, id="json-parameters"),
    ],
)
def test_top_k_on_every_channel(trio: tuple[EnsembleHandler, Context], row: dict, headers: dict) -> None:
    image = IMAGES[0]
    if row.pop("json", False):
        body = json.dumps(
            {"instances": [{"b64": base64.b64encode(image).decode()}], "parameters": {"top_k": 2}}
        ).encode()
        request = ({"body": body}, {"Content-Type": "application/json", **headers})
    else:
        request = ({"body": image, **row}, {"Content-Type": "image/png", **headers})
    [(status, body, _)] = serve(*trio, [request])
    [(_, plain, _)] = serve(*trio, [({"body": image}, {"Content-Type": "image/png"})])
    assert status == 200
    assert len(body["predictions"][0]["top"]) == 2
    assert plain["predictions"][0]["top"] == [
        {"label": plain["predictions"][0]["label"], "score": plain["predictions"][0]["score"]}
    ]
    assert body["predictions"][0]["top"][0]["label"] == plain["predictions"][0]["label"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(b"0", "top_k must be an integer from 1 to 3, got '0'", id="zero"),
        pytest.param(b"4", "top_k must be an integer from 1 to 3, got '4'", id="more-than-labels"),
        pytest.param(b"two", "top_k must be an integer from 1 to 3, got 'two'", id="not-a-number"),
    ],
)
def test_bad_top_k(trio: tuple[EnsembleHandler, Context], value: bytes, message: str) -> None:
    [(status, body, _)] = serve(*trio, [({"body": IMAGES[0], "top_k": value}, {"Content-Type": "image/png"})])
    assert (status, body) == (400, {"code": 400, "type": "RequestError", "message": message})


def test_top_k_is_for_multiclass_ensembles(test_store: Path, tmp_path: Path) -> None:
    pair = load_handler(test_store, "pair", tmp_path)
    [(status, body, _)] = serve(*pair, [({"body": IMAGES[0], "top_k": b"1"}, {"Content-Type": "image/png"})])
    assert (status, body["message"]) == (400, "top_k applies to multiclass ensembles; this one is binary")


def v2_request(parameters: dict[str, Any], outputs: list[str] | None = None) -> tuple[dict[str, bytes], dict[str, str]]:
    data = [base64.b64encode(image).decode() for image in IMAGES[:3]]
    doc: dict[str, Any] = {
        "inputs": [{"name": "images", "shape": [3], "datatype": "BYTES", "data": data}],
        "parameters": parameters,
    }
    if outputs is not None:
        doc["outputs"] = [{"name": name} for name in outputs]
    return {"body": json.dumps(doc).encode()}, {"Content-Type": "application/json"}


@pytest.mark.parametrize("policy", ["mean", "majority"], ids=str)
def test_v2_top_k_adds_the_ranked_outputs(trio: tuple[EnsembleHandler, Context], test_store: Path, policy: str) -> None:
    [(status, body, _)] = serve(*trio, [v2_request({"top_k": 2, "policy": policy})])
    probs = probabilities(test_store, IMAGES[:3])
    want = expected_top(probs, policy, 2)
    outputs = {o["name"]: o for o in body["outputs"]}
    assert status == 200
    assert [o["name"] for o in body["outputs"]][:4] == ["label", "scores", "top_labels", "top_scores"]
    assert (outputs["top_labels"]["datatype"], outputs["top_labels"]["shape"]) == ("BYTES", [3, 2])
    assert (outputs["top_scores"]["datatype"], outputs["top_scores"]["shape"]) == ("FP64", [3, 2])
    assert outputs["top_labels"]["data"] == [t["label"] for image in want for t in image]
    assert outputs["top_scores"]["data"] == pytest.approx([t["score"] for image in want for t in image], abs=1e-4)


@pytest.mark.parametrize(
    ("parameters", "outputs", "names"),
    [
        pytest.param({}, None, None, id="not-asked"),
        pytest.param({}, ["top_labels"], ["top_labels"], id="asked-by-output-default-k"),
    ],
)
def test_v2_ranking_only_when_asked(
    trio: tuple[EnsembleHandler, Context], parameters: dict, outputs: list[str] | None, names: list[str] | None
) -> None:
    [(status, body, _)] = serve(*trio, [v2_request(parameters, outputs)])
    assert status == 200
    if names is None:
        assert not {"top_labels", "top_scores"} & {o["name"] for o in body["outputs"]}
    else:
        assert [(o["name"], o["shape"]) for o in body["outputs"]] == [("top_labels", [3, 1])]
        assert body["outputs"][0]["data"] == [
            serve(*trio, [({"body": image}, {"Content-Type": "image/png"})])[0][1]["predictions"][0]["label"]
            for image in IMAGES[:3]
        ]
