"""`sequence=true`: a request's images as frames in time order, summarised per label, with `min_run` debouncing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from ts.context import Context

from handlers.answers.sequences import summarize
from handlers.ensemble_handler import EnsembleHandler
from handlers.errors import RequestError
from handlers.inputs.parameters import read_sequence
from tests.conftest import image_bytes, load_handler, serve

LABELS = ("red", "round")


def frames(*on: int, count: int = 8, label: int = 0, labels: int = 2) -> torch.Tensor:
    chosen = torch.zeros(count, labels, dtype=torch.bool)
    chosen[list(on), label] = True
    return chosen


@pytest.mark.parametrize(
    ("chosen", "min_run", "expected"),
    [
        pytest.param(
            frames(),
            1,
            {"frames_on": [], "first": None, "longest_run": {"start": None, "length": 0}, "detected": False},
            id="never-on",
        ),
        pytest.param(
            frames(4),
            1,
            {"frames_on": [4], "first": 4, "longest_run": {"start": 4, "length": 1}, "detected": True},
            id="one-frame",
        ),
        pytest.param(
            frames(4),
            2,
            {"frames_on": [4], "first": 4, "longest_run": {"start": 4, "length": 1}, "detected": False},
            id="one-frame-debounced",
        ),
        pytest.param(
            frames(1, 2, 3, 5, 6),
            3,
            {"frames_on": [1, 2, 3, 5, 6], "first": 1, "longest_run": {"start": 1, "length": 3}, "detected": True},
            id="longest-run-first",
        ),
        pytest.param(
            frames(0, 2, 3, 5, 6),
            2,
            {"frames_on": [0, 2, 3, 5, 6], "first": 0, "longest_run": {"start": 2, "length": 2}, "detected": True},
            id="tie-keeps-the-earlier-run",
        ),
        pytest.param(
            frames(0, 2, 4, 6),
            2,
            {"frames_on": [0, 2, 4, 6], "first": 0, "longest_run": {"start": 0, "length": 1}, "detected": False},
            id="flicker-is-not-detected",
        ),
    ],
)
def test_summary_of_one_label(chosen: torch.Tensor, min_run: int, expected: dict) -> None:
    summary = summarize(chosen, LABELS, only=0, min_run=min_run)
    assert summary == {"frames": 8, "min_run": min_run, "labels": {"red": expected}}


def test_every_label_is_summarised_unless_one_is_named() -> None:
    chosen = frames(1, 2) | frames(5, label=1)
    assert set(summarize(chosen, LABELS, only=None, min_run=1)["labels"]) == {"red", "round"}
    assert summarize(chosen, LABELS, only=None, min_run=1)["labels"]["round"]["frames_on"] == [5]


@pytest.mark.parametrize(
    ("sequence", "min_run", "expected"),
    [
        pytest.param(None, None, None, id="not-a-sequence"),
        pytest.param("false", None, None, id="false"),
        pytest.param("true", None, 1, id="default-min-run"),
        pytest.param("TRUE", "3", 3, id="min-run"),
    ],
)
def test_read_sequence(sequence: str | None, min_run: str | None, expected: int | None) -> None:
    assert read_sequence(sequence, min_run, 64) == expected


@pytest.mark.parametrize(
    ("sequence", "min_run", "message"),
    [
        pytest.param(None, "2", "min_run needs sequence=true: it debounces a sequence of frames", id="min-run-alone"),
        pytest.param(
            "maybe", None, "sequence must be true or false (true/1/yes or false/0/no), got 'maybe'", id="not-a-boolean"
        ),
        pytest.param("true", "0", "min_run must be an integer from 1 to 64, got '0'", id="zero"),
        pytest.param("true", "65", "min_run must be an integer from 1 to 64, got '65'", id="more-than-frames-allowed"),
        pytest.param("true", "two", "min_run must be an integer from 1 to 64, got 'two'", id="not-a-number"),
    ],
)
def test_read_sequence_rejects(sequence: str | None, min_run: str | None, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        read_sequence(sequence, min_run, 64)
    assert str(caught.value) == message


@pytest.fixture(scope="module")
def pair(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "pair", tmp_path_factory.mktemp("pair"))


def test_a_sequence_request_summarises_its_own_predictions(pair: tuple[EnsembleHandler, Context]) -> None:
    parts = {f"frame{i:02d}": image_bytes(50 + i) for i in range(10)}
    headers = {"Content-Type": "multipart/form-data; boundary=x", "X-Ensemble-Sequence": "true"}
    [(status, body, _)] = serve(*pair, [({**parts, "min_run": b"2"}, headers)])
    assert status == 200
    on = [i for i, p in enumerate(body["predictions"]) if p["label"] == "present"]
    summary = summarize(frames(*on, count=10, label=1), ("absent", "present"), only=1, min_run=2)
    assert body["sequence"] == summary
    assert list(body["sequence"]["labels"]) == ["present"]


def test_sequence_in_a_v2_request_is_refused_with_the_reason(pair: tuple[EnsembleHandler, Context]) -> None:
    data = [base64.b64encode(image_bytes(60)).decode()]
    doc = {
        "inputs": [{"name": "frames", "shape": [1], "datatype": "BYTES", "data": data}],
        "parameters": {"sequence": "true"},
    }
    [(status, body, _)] = serve(*pair, [({"body": json.dumps(doc).encode()}, {"Content-Type": "application/json"})])
    assert (status, body) == (
        400,
        {"error": "sequence is for our JSON answer; read a v2 answer's label outputs frame by frame"},
    )


FRAMES = [image_bytes(70 + i) for i in range(3)]
B64 = [base64.b64encode(data).decode() for data in FRAMES]
JSON = {"Content-Type": "application/json"}


def json_body(doc: dict) -> dict:
    return {"body": json.dumps(doc).encode()}


@pytest.mark.parametrize(
    ("row", "headers"),
    [
        pytest.param(
            {"body": FRAMES[0], "sequence": b"true", "min_run": b"2"}, {"Content-Type": "image/png"}, id="invoke-query"
        ),
        pytest.param(
            {"body": FRAMES[0]},
            {"Content-Type": "image/png", "X-Ensemble-Sequence": "true", "X-Ensemble-Min-Run": "2"},
            id="headers",
        ),
        pytest.param(
            {"a": FRAMES[0], "sequence": b"true", "min_run": b"2"},
            {"Content-Type": "multipart/form-data; boundary=x"},
            id="multipart-fields",
        ),
        pytest.param({"data": FRAMES[0], "sequence": b"true", "min_run": b"2"}, {}, id="grpc-inputs"),
        pytest.param(
            json_body({"instances": [{"b64": B64[0]}], "parameters": {"sequence": True, "min_run": 2}}),
            JSON,
            id="json-boolean",
        ),
        pytest.param(
            json_body({"instances": [{"b64": B64[0]}], "parameters": {"sequence": "true", "min_run": "2"}}),
            JSON,
            id="json-string",
        ),
    ],
)
def test_sequence_true_on_every_channel(pair: tuple[EnsembleHandler, Context], row: dict, headers: dict) -> None:
    [(status, body, _)] = serve(*pair, [(row, headers)])
    assert status == 200, body
    assert (body["sequence"]["frames"], body["sequence"]["min_run"]) == (1, 2)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        pytest.param({"sequence": False}, (200, None), id="json-false"),
        pytest.param(
            {"sequence": True, "min_run": True},
            (400, "parameters.min_run must be a string or a number, got true"),
            id="boolean-for-a-number",
        ),
        pytest.param(
            {"sequence": None},
            (400, "parameters.sequence must be true or false (a JSON boolean or a string), got null"),
            id="null",
        ),
    ],
)
def test_json_booleans_are_typed(
    pair: tuple[EnsembleHandler, Context], parameters: dict, expected: tuple[int, str | None]
) -> None:
    [(status, body, _)] = serve(*pair, [(json_body({"instances": [{"b64": B64[0]}], "parameters": parameters}), JSON)])
    assert (status, body.get("message") if status != 200 else body.get("sequence")) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            True,
            (400, {"error": "sequence is for our JSON answer; read a v2 answer's label outputs frame by frame"}),
            id="true",
        ),
        pytest.param(False, (200, None), id="false"),
    ],
)
def test_v2_parameters_take_json_booleans(
    pair: tuple[EnsembleHandler, Context], value: bool, expected: tuple[int, dict | None]
) -> None:
    doc = {
        "inputs": [{"name": "frames", "shape": [1], "datatype": "BYTES", "data": B64[:1]}],
        "parameters": {"sequence": value},
    }
    [(status, body, _)] = serve(*pair, [(json_body(doc), JSON)])
    assert (status, body if status != 200 else None) == expected
    if status == 200:
        assert [output["name"] for output in body["outputs"]][:2] == ["label", "scores"]
