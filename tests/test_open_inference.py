"""Open Inference Protocol v2 bodies through the real handler and TorchServe's Context, mixed with other forms."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy
import pytest
from ts.context import Context

from handlers.answers.v2 import output_names, v2_metadata
from handlers.config.specs import TensorSpec
from handlers.ensemble_handler import EnsembleHandler
from tests.conftest import image_bytes, instances, load_handler, serve
from tests.fixture_reference import expected_answers, member_probabilities

JSON = {"Content-Type": "application/json"}
TRIO_OUTPUTS = [
    "label",
    "scores",
    "mobile.label",
    "mobile.scores",
    "pool_rgb.label",
    "pool_rgb.scores",
    "pool_gray.label",
    "pool_gray.scores",
]
# What a v2 answer carries besides the labels and scores when a request names no outputs.
DEFAULT_EXTRAS = ["missing", "partial"]
ANSWER_OUTPUTS = [
    "missing",
    "partial",
    "skipped",
    "deferred",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "vote_margin",
]
TRIO_OUTPUT_NAMES = [*TRIO_OUTPUTS[:2], "top_labels", "top_scores", *TRIO_OUTPUTS[2:], *ANSWER_OUTPUTS]


@pytest.fixture(scope="module")
def trio(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "trio", tmp_path_factory.mktemp("trio"))


@pytest.fixture(scope="module")
def vectors(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "vectors", tmp_path_factory.mktemp("vectors"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2_images(images: list[bytes], **fields: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "images", "shape": [len(images)], "datatype": "BYTES", "data": [b64(d) for d in images]}],
        **fields,
    }


def as_row(doc: dict[str, Any], key: str = "body") -> dict[str, Any]:
    return {key: json.dumps(doc).encode()}


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in body["outputs"]}


def test_v2_images_answer_with_the_same_labels_and_scores_as_json(
    trio: tuple[EnsembleHandler, Context], test_store: Path
) -> None:
    images = [image_bytes(1), image_bytes(2, fmt="JPEG"), image_bytes(3, size=(20, 50))]
    [(status, body, _)] = serve(*trio, [(as_row(v2_images(images, id="req-7")), JSON)])
    assert status == 200
    assert (body["model_name"], body["model_version"], body["id"]) == ("trio", "2.1", "req-7")
    assert body["parameters"]["policy"] == "mean"
    assert body["parameters"]["ensemble_version"] == "2.1"
    assert body["parameters"]["members"] == "mobile,pool_rgb,pool_gray"
    assert set(body["parameters"]) == {
        "policy",
        "members",
        "format",
        "ensemble_version",
        "mobile.sha256",
        "pool_rgb.sha256",
        "pool_gray.sha256",
    }
    outputs = outputs_by_name(body)
    assert list(outputs) == [*TRIO_OUTPUTS, *DEFAULT_EXTRAS]
    assert [(o["datatype"], o["shape"]) for o in body["outputs"]] == [("BYTES", [3]), ("FP64", [3, 3])] * 4 + [
        ("BYTES", [3]),
        ("BOOL", [3]),
    ]
    assert (outputs["missing"]["data"], outputs["partial"]["data"]) == (["{}"] * 3, [False] * 3)
    predictions = expected_answers(test_store, "trio", images)
    assert outputs["label"]["data"] == [p["label"] for p in predictions]
    for member in ("mobile", "pool_rgb", "pool_gray"):
        assert outputs[f"{member}.label"]["data"] == [p["members"][member]["label"] for p in predictions]
    probs = member_probabilities(test_store, "trio", images)
    for member in ("mobile", "pool_rgb", "pool_gray"):
        assert outputs[f"{member}.scores"]["data"] == pytest.approx(probs[member].flatten().tolist(), abs=1e-5)
    mean = (probs["mobile"] + 2.0 * probs["pool_rgb"] + probs["pool_gray"]) / 4.0  # pool_rgb has weight 2
    assert outputs["scores"]["data"] == pytest.approx(mean.flatten().tolist(), abs=1e-5)
    picked = [
        outputs["scores"]["data"][i * 3 + ["cat", "dog", "fox"].index(p["label"])] for i, p in enumerate(predictions)
    ]
    assert picked == pytest.approx([p["score"] for p in predictions], abs=1e-5)


@pytest.mark.parametrize(
    ("fields", "headers", "policy"),
    [
        pytest.param(
            {"parameters": {"policy": "k_of_n", "k": 2}}, {}, {"policy": "k_of_n", "k": 2}, id="body-parameters"
        ),
        pytest.param({}, {"X-Ensemble-Policy": "max"}, {"policy": "max"}, id="header"),
        pytest.param(
            {"parameters": {"policy": "all"}},
            {"X-Ensemble-Policy": "all"},
            {"policy": "all"},
            id="body-and-header-agree",
        ),
        pytest.param(
            {"parameters": {"policy": "any", "binary_data_output": True}},
            {},
            {"policy": "any"},
            id="triton-binary-flag-ignored",
        ),
    ],
)
def test_v2_policy_parameters(
    trio: tuple[EnsembleHandler, Context], test_store: Path, fields: dict, headers: dict, policy: dict
) -> None:
    images = [image_bytes(4), image_bytes(5)]
    [(status, body, _)] = serve(*trio, [(as_row(v2_images(images, **fields)), {**JSON, **headers})])
    assert status == 200
    assert {k: v for k, v in body["parameters"].items() if k in ("policy", "k")} == policy
    expected = expected_answers(test_store, "trio", images, **{k: str(v) for k, v in policy.items()})
    assert outputs_by_name(body)["label"]["data"] == [p["label"] or "" for p in expected]


def test_requested_outputs_come_in_the_order_asked(trio: tuple[EnsembleHandler, Context]) -> None:
    wanted = [{"name": "pool_gray.label"}, {"name": "label", "parameters": {"binary_data": True}}]
    [(status, body, _)] = serve(*trio, [(as_row(v2_images([image_bytes(6)], outputs=wanted)), JSON)])
    assert status == 200
    assert [output["name"] for output in body["outputs"]] == ["pool_gray.label", "label"]


BAD_V2 = [
    pytest.param({"inputs": []}, {}, 400, "inputs must be a list of exactly one tensor object, got 0", id="no-input"),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]},
        {},
        400,
        "inputs[0]: missing ['data'] / unknown []; an input has name, shape, datatype, data, parameters",
        id="input-without-data",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
        {},
        415,
        "inputs[0].datatype 'FP32': this ensemble takes images as BYTES (base64 strings)",
        id="tensor-to-image-ensemble",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["AAAA"]}]},
        {},
        400,
        "inputs[0].data must be a list of 2 base64 strings, as shape [2] says",
        id="shape-disagrees-with-data",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]},
        {},
        400,
        "inputs[0].data[0]: invalid base64 (Only base64 data is allowed)",
        id="bad-base64",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(b"GIF89a-not-really")]}]},
        {},
        400,
        "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)",
        id="undecodable-image",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [65], "datatype": "BYTES", "data": [b64(image_bytes(1))] * 65}]},
        {},
        413,
        "65 images in one request; this ensemble accepts at most 64",
        id="too-many-images",
    ),
    pytest.param(
        {**v2_images([image_bytes(1)]), "inputz": 1},
        {},
        400,
        "unknown v2 request field(s) ['inputz']; valid: id, parameters, inputs, outputs",
        id="unknown-field",
    ),
    pytest.param(
        v2_images([image_bytes(1)], parameters={"colour": "red"}),
        {},
        400,
        "unknown parameter(s) ['colour']; valid: policy, k, threshold, confidence, early_exit, members, top_k, "
        "sequence, min_run, uncertainty, deadline_ms, min_members",
        id="unknown-parameter",
    ),
    pytest.param(
        v2_images([image_bytes(1)], parameters={"policy": "vote"}),
        {},
        400,
        "unknown policy 'vote'; valid policies: all, any, cascade, k_of_n, majority, max, mean",
        id="unknown-policy",
    ),
    pytest.param(
        v2_images([image_bytes(1)], parameters={"policy": "any"}),
        {"X-Ensemble-Policy": "all"},
        400,
        "policy given twice with different values: 'all' and 'any'",
        id="body-and-header-disagree",
    ),
    pytest.param(
        v2_images([image_bytes(1)], outputs=[{"name": "probabilities"}]),
        {},
        400,
        "outputs[0]: unknown output 'probabilities'; valid: " + ", ".join(TRIO_OUTPUT_NAMES),
        id="unknown-output",
    ),
    pytest.param(
        v2_images([image_bytes(1)]),
        {"Inference-Header-Content-Length": "120"},
        415,
        "the binary tensor data extension (Inference-Header-Content-Length) is not supported; send the input's data "
        "as JSON (tritonclient: set_data_from_numpy(..., binary_data=False))",
        id="binary-extension",
    ),
    pytest.param(v2_images([image_bytes(1)], id=7), {}, 400, "id must be a string, got int", id="numeric-id"),
]


@pytest.mark.parametrize(("doc", "headers", "status", "message"), BAD_V2)
def test_bad_v2_requests_get_v2_errors_alone_in_their_batch(
    trio: tuple[EnsembleHandler, Context], test_store: Path, doc: dict, headers: dict, status: int, message: str
) -> None:
    good = v2_images([image_bytes(8)], id="neighbour")
    replies = serve(
        *trio,
        [
            (as_row(good), JSON),
            (as_row(doc), {**JSON, **headers}),
            ({"body": image_bytes(8)}, {"Content-Type": "image/png"}),
        ],
    )
    assert [reply[0] for reply in replies] == [200, status, 200]
    assert replies[1][1] == {"error": message}
    assert outputs_by_name(replies[0][1])["label"]["data"] == [replies[2][1]["predictions"][0]["label"]]


def test_v2_composes_with_other_forms_in_one_batch(trio: tuple[EnsembleHandler, Context], test_store: Path) -> None:
    a, b, c = image_bytes(11), image_bytes(12), image_bytes(13)
    replies = serve(
        *trio,
        [
            (as_row(v2_images([a, b])), JSON),
            ({"body": json.dumps({"instances": [{"b64": b64(c)}]}).encode()}, JSON),
            (as_row(v2_images([c, a], parameters={"policy": "max"})), JSON),
        ],
    )
    assert [reply[0] for reply in replies] == [200, 200, 200]
    assert replies[0][2]["X-Ensemble-Batch-Images"] == "5"
    assert outputs_by_name(replies[0][1])["label"]["data"] == [
        p["label"] for p in expected_answers(test_store, "trio", [a, b])
    ]
    assert replies[1][1]["predictions"][0]["label"] == expected_answers(test_store, "trio", [c])[0]["label"]
    assert outputs_by_name(replies[2][1])["label"]["data"] == [
        p["label"] for p in expected_answers(test_store, "trio", [c, a], policy="max")
    ]


@pytest.mark.parametrize(
    ("row", "headers"),
    [
        pytest.param({"data": image_bytes(21)}, {"data": {"content-type": ""}}, id="grpc-raw-image"),
        pytest.param(as_row(v2_images([image_bytes(21)]), "data"), {"data": {"content-type": ""}}, id="grpc-v2-json"),
        pytest.param(
            {"data": json.dumps({"instances": [{"b64": b64(image_bytes(21))}]}).encode()}, {}, id="grpc-json-instances"
        ),
    ],
)
def test_grpc_style_inputs_are_read_by_their_bytes(
    trio: tuple[EnsembleHandler, Context], test_store: Path, row: dict, headers: dict
) -> None:
    [(status, body, _)] = serve(*trio, [(row, headers)])
    assert status == 200
    expected = expected_answers(test_store, "trio", [image_bytes(21)])[0]["label"]
    got = outputs_by_name(body)["label"]["data"][0] if "outputs" in body else body["predictions"][0]["label"]
    assert got == expected


def test_body_and_data_together_are_refused(trio: tuple[EnsembleHandler, Context]) -> None:
    [(status, body, _)] = serve(*trio, [({"body": image_bytes(1), "data": image_bytes(2)}, {})])
    assert (status, body["message"]) == (400, "both body and data given; send the body once")


def test_multilabel_v2_outputs_are_boolean_masks(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    images = [image_bytes(31), image_bytes(32)]
    [(status, body, _)] = serve(
        *load_handler(test_store, "tags", tmp_path_factory.mktemp("tags")), [(as_row(v2_images(images)), JSON)]
    )
    assert status == 200
    outputs = outputs_by_name(body)
    assert list(outputs)[:2] == ["labels", "scores"]
    assert (outputs["labels"]["datatype"], outputs["labels"]["shape"]) == ("BOOL", [2, 2])
    predictions = expected_answers(test_store, "tags", images)
    assert outputs["labels"]["data"] == [label in p["labels"] for p in predictions for label in ("red", "round")]
    assert outputs["scores"]["data"] == pytest.approx(
        [p["scores"][label] for p in predictions for label in ("red", "round")], abs=1e-5
    )


@pytest.mark.parametrize(
    ("datatype", "layout"),
    [
        pytest.param("FP32", "flat", id="fp32-flat"),
        pytest.param("FP32", "nested", id="fp32-nested"),
        pytest.param("FP64", "flat", id="fp64-flat"),
        pytest.param("FP16", "nested", id="fp16-nested"),
    ],
)
def test_tensor_ensembles_take_v2_number_tensors(
    vectors: tuple[EnsembleHandler, Context], test_store: Path, datatype: str, layout: str
) -> None:
    values = instances(41, 3)
    if datatype == "FP16":
        values = values.astype(numpy.float16).astype(numpy.float32)
    data = values.flatten().tolist() if layout == "flat" else values.tolist()
    doc = {
        "inputs": [{"name": "x", "shape": [3, 3, 4], "datatype": datatype, "data": data}],
        "parameters": {"policy": "max"},
    }
    [(status, body, _)] = serve(*vectors, [(as_row(doc), JSON)])
    assert status == 200
    expected = expected_answers(test_store, "vectors", values, policy="max")
    assert outputs_by_name(body)["label"]["data"] == [p["label"] for p in expected]


@pytest.mark.parametrize(
    ("tensor", "status", "message"),
    [
        pytest.param(
            {"shape": [2, 3, 4], "datatype": "FP32", "data": [0.5] * 23},
            400,
            "inputs[0].data holds 23 numbers; shape [2, 3, 4] needs 24",
            id="count",
        ),
        pytest.param(
            {"shape": [2, 12], "datatype": "FP32", "data": [0.5] * 24},
            400,
            "array of shape [2, 12]; expected [N, 3, 4]",
            id="shape",
        ),
        pytest.param(
            {"shape": [1, 3, 4], "datatype": "INT64", "data": [1] * 12},
            415,
            "inputs[0].datatype 'INT64': this ensemble takes tensors as FP32, FP64, FP16",
            id="datatype",
        ),
        pytest.param(
            {"shape": [1, 3, 4], "datatype": "FP32", "data": ["1"] * 12},
            400,
            "tensor data must be numbers",
            id="strings",
        ),
        pytest.param(
            {"shape": [1, 3, 4], "datatype": "FP16", "data": [1e6] * 12},
            400,
            "instances contain NaN or infinite values",
            id="fp16-overflow",
        ),
    ],
)
def test_bad_v2_tensors(vectors: tuple[EnsembleHandler, Context], tensor: dict, status: int, message: str) -> None:
    doc = {"inputs": [{"name": "x", **tensor}]}
    [(got_status, body, _)] = serve(*vectors, [(as_row(doc), JSON)])
    assert (got_status, body) == (status, {"error": message})


def test_describe_lists_the_v2_outputs(trio: tuple[EnsembleHandler, Context]) -> None:
    assert trio[0].ensemble.describe()["v2_outputs"] == TRIO_OUTPUT_NAMES


@pytest.mark.parametrize(
    ("names", "labels", "tensor", "expected"),
    [
        pytest.param(
            output_names("label", ["a"], ranked=True),
            3,
            None,
            {
                "inputs": [{"name": "data", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "scores", "datatype": "FP64", "shape": [-1, 3]},
                    {"name": "top_labels", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "top_scores", "datatype": "FP64", "shape": [-1, -1]},
                    {"name": "a.label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "a.scores", "datatype": "FP64", "shape": [-1, 3]},
                    {"name": "missing", "datatype": "BYTES", "shape": [-1]},
                    {"name": "partial", "datatype": "BOOL", "shape": [-1]},
                    {"name": "skipped", "datatype": "BYTES", "shape": [-1]},
                    {"name": "deferred", "datatype": "BOOL", "shape": [-1]},
                    *({"name": measure, "datatype": "FP64", "shape": [-1]} for measure in ANSWER_OUTPUTS[4:]),
                ],
            },
            id="multiclass-images",
        ),
        pytest.param(
            output_names("labels", ["m"], ranked=False),
            2,
            TensorSpec(shape=(1, 28, 28)),
            {
                "inputs": [{"name": "data", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                "outputs": [
                    {"name": "labels", "datatype": "BOOL", "shape": [-1, 2]},
                    {"name": "scores", "datatype": "FP64", "shape": [-1, 2]},
                    {"name": "m.labels", "datatype": "BOOL", "shape": [-1, 2]},
                    {"name": "m.scores", "datatype": "FP64", "shape": [-1, 2]},
                    {"name": "missing", "datatype": "BYTES", "shape": [-1]},
                    {"name": "partial", "datatype": "BOOL", "shape": [-1]},
                    {"name": "skipped", "datatype": "BYTES", "shape": [-1]},
                    {"name": "deferred", "datatype": "BOOL", "shape": [-1]},
                    *({"name": measure, "datatype": "FP64", "shape": [-1, 2]} for measure in ANSWER_OUTPUTS[4:]),
                ],
            },
            id="multilabel-tensors",
        ),
    ],
)
def test_v2_metadata_lists_the_input_and_every_output(
    names: list[str], labels: int, tensor: TensorSpec | None, expected: dict
) -> None:
    assert v2_metadata(names, labels, tensor, multilabel=names[0] == "labels") == expected
