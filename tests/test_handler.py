"""The handler driven through TorchServe's real Context, on a real archive, with mixed good and bad requests."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from ts.context import Context, RequestProcessor

from handlers.ensemble_handler import EnsembleHandler
from handlers.errors import IntegrityError
from handlers.weights.loading import sha256_of
from tests.conftest import (
    NPY,
    extract,
    image_bytes,
    instances,
    load_handler,
    make_context,
    npy_bytes,
    serve,
    source_spec,
)
from tests.fixture_reference import assert_answers, expected_answers

PNG = "image/png"


@pytest.fixture(scope="module")
def trio(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "trio", tmp_path_factory.mktemp("trio"))


def raw(data: bytes, **headers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"body": data}, {"Content-Type": PNG, **headers}


def test_mixed_batch_isolates_bad_requests(trio: tuple[EnsembleHandler, Context], test_store: Path) -> None:
    handler, context = trio
    one, two, three = image_bytes(1), image_bytes(2, fmt="JPEG"), image_bytes(3, size=(20, 50))
    json_body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in (three, one)]})
    replies = serve(
        handler,
        context,
        [
            raw(one),
            raw(b"this is not an image"),
            ({"first": two, "second": three}, {"Content-Type": "multipart/form-data; boundary=x"}),
            raw(one, **{"X-Ensemble-Policy": "vote"}),
            ({"body": json_body.encode()}, {"Content-Type": "application/json"}),
            raw(b""),
        ],
    )
    assert [status for status, _, _ in replies] == [200, 400, 200, 400, 200, 400]
    assert replies[1][1] == {
        "code": 400,
        "type": "InvalidImage",
        "message": "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)",
    }
    assert replies[3][1] == {
        "code": 400,
        "type": "InvalidPolicy",
        "message": "unknown policy 'vote'; valid policies: all, any, cascade, k_of_n, majority, max, mean",
    }
    assert replies[5][1]["type"] == "RequestError"
    assert [len(body["predictions"]) for status, body, _ in replies if status == 200] == [1, 2, 2]
    assert {tuple(sorted(h.items())) for _, _, h in replies} == {
        (("X-Ensemble-Batch-Images", "5"), ("X-Ensemble-Batch-Requests", "6"), ("content-type", "application/json"))
    }
    assert_answers(replies[0][1]["predictions"], expected_answers(test_store, "trio", [one]))
    assert_answers(replies[2][1]["predictions"], expected_answers(test_store, "trio", [two, three]))
    assert_answers(replies[4][1]["predictions"], expected_answers(test_store, "trio", [three, one]))


def test_response_shape_and_provenance(trio: tuple[EnsembleHandler, Context], test_store: Path) -> None:
    handler, context = trio
    [(status, body, _)] = serve(
        handler, context, [raw(image_bytes(4), **{"X-Ensemble-Policy": "k_of_n", "X-Ensemble-K": "2"})]
    )
    spec = source_spec(test_store, "trio")
    digests = {m.name: sha256_of(spec.base_dir / m.weights) for m in spec.members}
    archived = {m.name: sha256_of(handler.ensemble.spec.base_dir / m.weights) for m in handler.ensemble.spec.members}
    assert status == 200
    assert (body["ensemble"], body["version"], body["policy"]) == (
        "trio",
        "2.1",
        {"name": "k_of_n", "params": {"k": 2}},
    )
    assert body["provenance"]["member_sha256"] == archived
    assert body["provenance"]["member_source_sha256"] == digests
    assert body["provenance"]["ensemble_version"] == "2.1"
    prediction = body["predictions"][0]
    assert set(prediction) == {"label", "score", "top", "members", "missing", "partial"}
    assert (prediction["missing"], prediction["partial"]) == ({}, False)
    assert prediction["top"] == [{"label": prediction["label"], "score": prediction["score"]}]
    assert body["answered_by"] == ["mobile", "pool_rgb", "pool_gray"]
    assert list(prediction["members"]) == ["mobile", "pool_rgb", "pool_gray"]
    assert body["members"] == {name: [view["label"]] for name, view in prediction["members"].items()}


def test_describe_lists_members_digests_and_policies(trio: tuple[EnsembleHandler, Context], test_store: Path) -> None:
    handler, context = trio
    context.request_processor = [RequestProcessor({"describe": "True"})]
    described = json.loads(handler.handle([{"body": b""}], context)[0])
    spec = source_spec(test_store, "trio")
    assert described["policies"] == ["all", "any", "cascade", "k_of_n", "majority", "max", "mean"]
    assert described["default_policy"] == {"name": "mean", "params": {}}
    assert described["labels"] == ["cat", "dog", "fox"]
    model_dir = handler.ensemble.spec.base_dir
    assert [(m["name"], m["arch"], m["sha256"], m["source"]) for m in described["members"]] == [
        (
            name,
            arch,
            sha256_of(model_dir / "members" / f"{name}.safetensors"),
            {"file": f"{name}.pt", "sha256": sha256_of(spec.base_dir / f"{name}.pt"), "state_dict": {}},
        )
        for name, arch in [
            ("mobile", "torchvision:mobilenet_v3_small"),
            ("pool_rgb", "code/fixture_models.py:PoolNet"),
            ("pool_gray", "code/fixture_models.py:PoolNet"),
        ]
    ]
    assert described["members"][2]["input"]["color_mode"] == "L"
    assert described["device"] == "cpu"
    stages = described["early_exit_stages"]
    assert sorted(name for stage in stages for name in stage["members"]) == ["mobile", "pool_gray", "pool_rgb"]
    assert [stage["ms_per_input"] for stage in stages] == sorted(stage["ms_per_input"] for stage in stages)
    assert described["parameters"] == {
        "policy": {"values": ["all", "any", "cascade", "k_of_n", "majority", "max", "mean"], "default": "mean"},
        "k": {"range": [1, 3], "default": None, "for": "k_of_n"},
        "top_k": {"range": [1, 3], "default": 1},
        "members": {
            "values": ["mobile", "pool_rgb", "pool_gray"],
            "default": ["mobile", "pool_rgb", "pool_gray"],
            "format": "comma-separated names",
        },
        "confidence": {"range": [0.0, 1.0], "default": 0.9, "for": "cascade"},
        "early_exit": {"values": [True, False], "default": False, "for": "any, all, majority, k_of_n"},
        "uncertainty": {"values": [True, False], "default": False},
        "sequence": {"values": [True, False], "default": False},
        "min_run": {"range": [1, 64], "default": 1, "for": "sequence=true"},
        "deadline_ms": {"range": [1, 60000], "default": None},
        "min_members": {"range": [1, 3], "default": 1},
    }


def test_explanations_are_answered_as_predictions(trio: tuple[EnsembleHandler, Context]) -> None:
    handler, context = trio
    replies = serve(handler, context, [raw(image_bytes(5), explain="True"), raw(b"junk")])
    assert [status for status, _, _ in replies] == [200, 400]
    assert len(replies[0][1]["predictions"]) == 1


def test_tampered_weights_are_refused_before_loading(test_store: Path, tmp_path: Path) -> None:
    model_dir = extract(test_store, "trio", tmp_path)
    weights = model_dir / "members" / "pool_rgb.safetensors"
    pinned = sha256_of(weights)
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(IntegrityError) as caught:
        EnsembleHandler().initialize(make_context(model_dir, "trio"))
    assert str(caught.value) == (
        f"member 'pool_rgb': members/pool_rgb.safetensors: sha256 mismatch: manifest pins {pinned}, file has "
        f"{sha256_of(weights)}"
    )


def test_weights_missing_from_the_manifest_digests_are_refused(test_store: Path, tmp_path: Path) -> None:
    model_dir = extract(test_store, "trio", tmp_path)
    manifest = json.loads((model_dir / "ensemble.json").read_text())
    del manifest["digests"]["members/pool_gray.safetensors"]
    (model_dir / "ensemble.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError) as caught:
        EnsembleHandler().initialize(make_context(model_dir, "trio"))
    assert str(caught.value) == "member 'pool_gray': the manifest pins no digest for ['members/pool_gray.safetensors']"


def test_one_bad_image_fails_its_whole_request_only(trio: tuple[EnsembleHandler, Context], test_store: Path) -> None:
    handler, context = trio
    good = image_bytes(8)
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    replies = serve(handler, context, [({"a": good, "b": good[:100]}, multipart), raw(good)])
    assert [(status, body.get("type")) for status, body, _ in replies] == [(400, "InvalidImage"), (200, None)]
    assert replies[0][1]["message"] == "PNG image is truncated or corrupt: image file is truncated"
    assert_answers(replies[1][1]["predictions"], expected_answers(test_store, "trio", [good]))
    assert replies[1][2]["X-Ensemble-Batch-Images"] == "1"


def test_tensor_ensemble_answers_npy_and_json_in_one_batch(test_store: Path, tmp_path: Path) -> None:
    handler, context = load_handler(test_store, "vectors", tmp_path)
    three, two = instances(21, 3), instances(22, 2)
    replies = serve(
        handler,
        context,
        [
            ({"body": npy_bytes(three)}, NPY),
            ({"body": image_bytes(1)}, {"Content-Type": PNG}),
            (
                {"body": json.dumps({"instances": two.tolist()}).encode()},
                {"Content-Type": "application/json", "X-Ensemble-Policy": "max"},
            ),
            ({"body": npy_bytes(three[:, :2])}, NPY),
        ],
    )
    assert [(status, body.get("type")) for status, body, _ in replies] == [
        (200, None),
        (415, "UnsupportedMediaType"),
        (200, None),
        (400, "RequestError"),
    ]
    assert replies[3][1]["message"] == "array of shape [3, 2, 4]; expected [N, 3, 4]"
    assert replies[0][2]["X-Ensemble-Batch-Images"] == "5"
    assert replies[2][1]["policy"] == {"name": "max", "params": {}}
    assert_answers(replies[0][1]["predictions"], expected_answers(test_store, "vectors", three))
    assert_answers(replies[2][1]["predictions"], expected_answers(test_store, "vectors", two, policy="max"))
    assert handler.ensemble.describe()["input"] == {"shape": [3, 4], "type": "tensor"}
