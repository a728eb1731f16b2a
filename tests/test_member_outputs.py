"""Members whose forward returns a structure (`output:`) and members with their own label lists (`labels:`).

Each task kind is archived and served by the real handler; every member's served scores are compared with
its original module's outputs, mapped onto the ensemble's labels here by hand. The refusals are checked
word for word.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from archive_scripts.build_archives import build_archive
from archive_scripts.inspect_checkpoint import inspect
from handlers.config.files import load_ensembles, read_archive_manifest
from handlers.ensemble import Ensemble
from handlers.errors import MemberLoadError
from handlers.execution.engines import archived_exports
from handlers.inputs.images import batch_tensors, decode_image
from handlers.weights.loading import load_archived_members
from tests.conftest import image_bytes, image_input, load_handler, serve
from tests.fixture_models import FixedNet, StructuredNet

HERE = Path(__file__).parent
CPU = torch.device("cpu")

# name: (StructuredNet kwargs, the member's own labels or None, its output: block or None)
Members = dict[str, tuple[dict[str, Any], list[str] | None, dict[str, Any] | None]]
MULTICLASS: Members = {
    "tuple_probs": ({"form": "tuple", "activation": "softmax"}, None, {"select": 1, "kind": "probabilities"}),
    "dict_logits": ({"form": "dict"}, None, {"select": "logits"}),
    "reordered": ({"form": "dataclass"}, ["fox", "cat", "dog"], {"select": "logits"}),
    "extra_logits": ({"form": "nested"}, ["dog", "wolf", "cat", "fox"], {"select": [0, "logits"]}),
    "extra_probs": (
        {"form": "tuple", "activation": "softmax"},
        ["cat", "dog", "fox", "wolf"],
        {"select": 1, "kind": "probabilities"},
    ),
    "conv_map": ({"form": "map"}, None, None),
}
MULTILABEL: Members = {
    "red_round": ({"form": "tuple", "activation": "sigmoid"}, ["round", "red"], {"select": 1, "kind": "probabilities"}),
    "large_red_extra": ({"form": "dict"}, ["large", "red"], {"select": "logits"}),
    "all_three": ({"form": "map"}, None, None),
}
BINARY: Members = {
    "flipped": ({"form": "dict"}, ["present", "absent"], {"select": "logits"}),
    "third_output": (
        {"form": "tuple", "activation": "softmax"},
        ["absent", "other", "present"],
        {"select": 1, "kind": "probabilities"},
    ),
}
# task: (the ensemble's labels, its members, its policy)
TASKS: dict[str, tuple[list[str], Members, dict[str, Any]]] = {
    "multiclass": (["cat", "dog", "fox"], MULTICLASS, {"name": "mean"}),
    "multilabel": (["red", "round", "large"], MULTILABEL, {"name": "majority", "threshold": 0.5}),
    "binary": (["absent", "present"], BINARY, {"name": "mean", "threshold": 0.5}),
}


def write_members(
    folder: Path,
    task: str,
    members: Members,
    labels: list[str],
    policy: dict[str, Any],
) -> tuple[Path, dict[str, torch.nn.Module]]:
    """StructuredNet members saved as state_dicts, and an ensembles.yaml declaring their outputs and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "fixture_models.py", folder / "fixture_models.py")
    torch.manual_seed(5)
    modules: dict[str, torch.nn.Module] = {}
    declared: list[dict[str, Any]] = []
    for name, (kwargs, own, output) in members.items():
        module = StructuredNet(num_classes=len(own or labels), **kwargs).eval()
        with torch.no_grad():
            module.head.weight.mul_(4.0)  # Confident members: the votes differ between them.
        torch.save(module.state_dict(), folder / f"{name}.pt")
        modules[name] = module
        entry = {
            "name": name,
            "arch": "fixture_models.py:StructuredNet",
            "kwargs": {"num_classes": len(own or labels), **kwargs},
            "weights": f"{name}.pt",
        }
        entry.update({key: value for key, value in (("labels", own), ("output", output)) if value is not None})
        declared.append(entry)
    ensemble = {
        "version": "1.0",
        "task": task,
        "labels": labels,
        "input": {"size": [20, 20]},
        "policy": policy,
        "execution": {"plan": "auto"},
        "members": declared,
    }
    if task == "binary":
        ensemble["positive_label"] = "present"
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {task: ensemble}}, sort_keys=False))
    return path, modules


def expected_scores(
    module: torch.nn.Module, rows: torch.Tensor, task: str, own: list[str], labels: list[str], output: dict | None
) -> list[dict[str, float]]:
    """A member's probabilities for the ensemble's labels, from its module's own forward, by the documented rules."""
    returned = module(rows)
    select = (output or {}).get("select", [])
    for step in select if isinstance(select, list) else [select]:
        returned = getattr(returned, step) if hasattr(returned, "__dataclass_fields__") else returned[step]
    scores = returned.reshape(len(rows), -1).double()
    kind = (output or {}).get("kind", "logits")
    if task == "multilabel":
        probs = torch.sigmoid(scores) if kind == "logits" else scores
        return [{label: float(row[own.index(label)]) for label in labels if label in own} for row in probs]
    kept = scores[:, [own.index(label) for label in labels]]
    probs = torch.softmax(kept, dim=1) if kind == "logits" else kept / kept.sum(dim=1, keepdim=True)
    return [dict(zip(labels, row.tolist(), strict=True)) for row in probs]


@pytest.fixture(scope="module")
def serve_task(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """Build, load and ask the ensemble of one task kind's members, once per task for the module."""
    done: dict[str, dict[str, Any]] = {}

    def served(task: str) -> dict[str, Any]:
        if task not in done:
            done[task] = _serve(task, tmp_path_factory.mktemp(f"outputs-{task}"))
        return done[task]

    return served


@pytest.fixture(params=list(TASKS))
def served(request: pytest.FixtureRequest, serve_task: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return serve_task(request.param)


def _serve(task: str, root: Path) -> dict[str, Any]:
    labels, members, policy = TASKS[task]
    path, modules = write_members(root / "src", task, members, labels, policy)
    spec = load_ensembles(path)[task]
    build_archive(spec, root / "store")
    handler, context = load_handler(root / "store", task, root / "model")
    images = [image_bytes(seed, size=(31, 26)) for seed in range(4)]
    replies = serve(handler, context, [({"body": data}, {"Content-Type": "image/png"}) for data in images])
    v2 = {
        "inputs": [
            {
                "name": "images",
                "shape": [len(images)],
                "datatype": "BYTES",
                "data": [base64.b64encode(d).decode() for d in images],
            }
        ]
    }
    [v2_reply] = serve(handler, context, [({"body": json.dumps(v2).encode()}, {"Content-Type": "application/json"})])
    shared = image_input(spec.input)
    rows = batch_tensors([decode_image(data, spec.limits) for data in images], [shared])[shared]
    return {
        "task": task,
        "labels": labels,
        "members": members,
        "modules": modules,
        "replies": replies,
        "rows": rows,
        "describe": handler.ensemble.describe(),
        "v2": v2_reply,
        "model_dir": root / "model",
    }


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_each_engine_serves_structured_outputs_and_own_labels_as_eager(served: dict[str, Any], engine: str) -> None:
    """The ONNX export holds the member behind its head: selection, activation and label mapping run in the engine."""
    model_dir = served["model_dir"]
    manifest = read_archive_manifest(model_dir)
    assert set(manifest.engines) == set(served["members"])
    on = {
        plan: Ensemble(
            manifest.ensemble.with_plan(plan),
            load_archived_members(manifest, model_dir),
            CPU,
            manifest.build,
            manifest.sources,
            exported=archived_exports(manifest.engines, model_dir),
        )
        for plan in (engine, "eager")
    }
    assert {group["plan"] for group in on[engine].runner.describe()} == {engine}
    images = [decode_image(image_bytes(seed, size=(31, 26)), manifest.ensemble.limits) for seed in range(5)]
    got, expected = on[engine].probabilities(images), on["eager"].probabilities(images)
    assert torch.equal(got.isnan(), expected.isnan())  # A multilabel member's uncovered labels stay unknown.
    assert float((got - expected).nan_to_num().abs().max()) <= 1e-4


@pytest.mark.slow
def test_each_member_is_served_with_its_module_scores_in_the_ensemble_label_order(served: dict[str, Any]) -> None:
    task, labels = served["task"], served["labels"]
    assert [status for status, _, _ in served["replies"]] == [200] * 4
    for name, (_, own, output) in served["members"].items():
        with torch.inference_mode():
            expected = expected_scores(served["modules"][name], served["rows"], task, own or labels, labels, output)
        for (_, body, _), want in zip(served["replies"], expected, strict=True):
            member = body["predictions"][0]["members"][name]
            if task == "multilabel":
                assert sorted(member["scores"]) == sorted(want)
                assert member["scores"] == pytest.approx(want, abs=1e-4)
            else:
                assert member["label"] == max(want, key=want.__getitem__)
                assert member["score"] == pytest.approx(max(want.values()), abs=1e-4)


@pytest.mark.slow
def test_v2_gives_every_member_score_in_the_ensemble_label_order_with_null_where_a_member_scores_none(
    served: dict[str, Any],
) -> None:
    task, labels = served["task"], served["labels"]
    status, body, _ = served["v2"]
    assert status == 200
    outputs = {output["name"]: output for output in body["outputs"]}
    for name, (_, own, output) in served["members"].items():
        with torch.inference_mode():
            expected = expected_scores(served["modules"][name], served["rows"], task, own or labels, labels, output)
        scores = outputs[f"{name}.scores"]
        assert scores["shape"] == [4, len(labels)]
        rows = [scores["data"][i * len(labels) : (i + 1) * len(labels)] for i in range(4)]
        for row, want in zip(rows, expected, strict=True):
            assert [value is None for value in row] == [label not in want for label in labels]
            assert [v for v in row if v is not None] == pytest.approx(
                [want[label] for label in labels if label in want], abs=1e-4
            )


@pytest.mark.slow
def test_multilabel_votes_count_only_the_members_that_score_each_label(
    serve_task: Callable[[str], dict[str, Any]],
) -> None:
    served = serve_task("multilabel")
    labels, members = served["labels"], served["members"]
    for (_, body, _), i in zip(served["replies"], range(4), strict=True):
        with torch.inference_mode():
            own = {
                name: expected_scores(
                    served["modules"][name], served["rows"][i : i + 1], "multilabel", spec[1] or labels, labels, spec[2]
                )[0]
                for name, spec in members.items()
            }
        combined = body["predictions"][0]
        for label in labels:
            voters = [scores[label] for scores in own.values() if label in scores]
            votes = sum(score >= 0.5 for score in voters)
            assert combined["scores"][label] == pytest.approx(votes / len(voters), abs=1e-6)
            assert (label in combined["labels"]) == (votes >= len(voters) // 2 + 1)


@pytest.mark.slow
def test_describe_shows_each_member_mapping(serve_task: Callable[[str], dict[str, Any]]) -> None:
    mapping = {member["name"]: member["outputs"] for member in serve_task("multiclass")["describe"]["members"]}
    assert mapping["extra_logits"] == {
        "select": [0, "logits"],
        "kind": "logits",
        "columns": {"cat": 2, "dog": 0, "fox": 3},
        "dropped": ["wolf"],
        "not_scored": [],
    }
    assert mapping["conv_map"] == {
        "select": [],
        "kind": "logits",
        "columns": {"cat": 0, "dog": 1, "fox": 2},
        "dropped": [],
        "not_scored": [],
    }


def one_member(tmp_path: Path, module: torch.nn.Module, arch: str, kwargs: dict, **member: Any) -> Ensemble:
    """An ensemble of one member from fixture_models.py, loaded straight from its yaml as the build loads it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "fixture_models.py", tmp_path / "fixture_models.py")
    torch.save(module.state_dict(), tmp_path / "m.pt")
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": ["cat", "dog", "fox"],
        "input": {"size": [20, 20]},
        "execution": {"plan": "eager"},
        "members": [{"name": "m", "arch": f"fixture_models.py:{arch}", "kwargs": kwargs, "weights": "m.pt", **member}],
    }
    (tmp_path / "ensembles.yaml").write_text(yaml.safe_dump({"ensembles": {"one": ensemble}}, sort_keys=False))
    return Ensemble.from_spec(load_ensembles(tmp_path / "ensembles.yaml")["one"], CPU)


TUPLE = "tuple(Tensor[2, 4], Tensor[2, 3])"
REFUSALS = [
    pytest.param(
        {"form": "tuple", "activation": "softmax"},
        {},
        f"member 'm': its forward returns {TUPLE}, not a tensor; say which part holds its 3 scores with an "
        "output: block; each of these fits its 3 labels:\n"
        "  output: {select: 1, kind: probabilities}",
        id="tuple-without-output",
    ),
    pytest.param(
        {"form": "tuple"},
        {"output": {"select": 2}},
        f"member 'm': output.select 2: the forward returns {TUPLE}, which has no item 2; each of these fits its "
        "3 labels:\n"
        "  output: {select: 1, kind: logits}",
        id="select-beyond-the-tuple",
    ),
    pytest.param(
        {"form": "nested"},
        {"output": {"select": [0, "logit"]}},
        "member 'm': output.select [0, logit]: the forward returns tuple(dict(logits=Tensor[2, 3], "
        "boxes=Tensor[2, 4]), Tensor[2]), and at 0 it is dict(logits=Tensor[2, 3], boxes=Tensor[2, 4]), which "
        "has no key 'logit'; each of these fits its 3 labels:\n"
        "  output: {select: [0, logits], kind: logits}",
        id="select-a-missing-key",
    ),
    pytest.param(
        {"form": "dataclass"},
        {"output": {"select": "embedding"}},
        "member 'm': the scores (output.select embedding) are Tensor[2, 4] for a probe of 2 rows; its 3 labels "
        "need [N, 3] after trailing dimensions of size 1 are dropped; each of these fits its 3 labels:\n"
        "  output: {select: logits, kind: logits}",
        id="select-the-wrong-tensor",
    ),
]


@pytest.mark.parametrize(("kwargs", "member", "message"), REFUSALS)
def test_an_output_that_does_not_fit_is_refused_with_the_structure_and_the_blocks_that_fit(
    tmp_path: Path, kwargs: dict, member: dict, message: str
) -> None:
    torch.manual_seed(0)
    module = StructuredNet(num_classes=3, **kwargs)
    with pytest.raises(MemberLoadError) as caught:
        one_member(tmp_path, module, "StructuredNet", {"num_classes": 3, **kwargs}, **member)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            [2.0, -1.0, 0.5],
            "member 'm': output kind probabilities, but the probe batch gave values from -1 to 2, outside [0, 1]; "
            "if the model returns raw scores, declare output: {kind: logits}",
            id="outside-0-1",
        ),
        pytest.param(
            [0.25, 0.25, 0.25],
            "member 'm': output kind probabilities, but the probe batch's rows sum to 0.75 to 0.75, not 1 "
            "(within 0.001); if the model returns raw scores, declare output: {kind: logits}",
            id="not-summing-to-1",
        ),
    ],
)
def test_scores_that_are_not_probabilities_are_refused_under_kind_probabilities(
    tmp_path: Path, values: list[float], message: str
) -> None:
    with pytest.raises(MemberLoadError) as caught:
        one_member(tmp_path, FixedNet(values=values), "FixedNet", {"values": values}, output={"kind": "probabilities"})
    assert str(caught.value) == message


def test_probabilities_declared_as_logits_are_served_but_the_build_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = [0.2, 0.5, 0.3]
    with caplog.at_level(logging.WARNING, logger="handlers.execution.outputs"):
        ensemble = one_member(tmp_path, FixedNet(values=values), "FixedNet", {"values": values})
    assert [record.getMessage() for record in caplog.records] == [
        "member 'm': its outputs already look like probabilities (every probe row in [0, 1] and summing to 1); if its "
        "forward applies softmax or sigmoid, declare output: {kind: probabilities}, or they are activated twice"
    ]
    scores = ensemble.probabilities(torch.zeros(1, 3, 20, 20))[0, 0]
    assert scores.tolist() == pytest.approx(
        torch.softmax(torch.tensor(values, dtype=torch.float64), 0).tolist(), abs=1e-6
    )


def test_probabilities_are_used_as_they_are_never_activated_twice(tmp_path: Path) -> None:
    values = [0.2, 0.5, 0.3]
    ensemble = one_member(
        tmp_path, FixedNet(values=values), "FixedNet", {"values": values}, output={"kind": "probabilities"}
    )
    assert ensemble.probabilities(torch.zeros(2, 3, 20, 20))[0].flatten().tolist() == pytest.approx(
        values * 2, abs=1e-7
    )


def test_the_inspector_shows_a_structured_output_and_the_blocks_that_select_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(StructuredNet(num_classes=2, form="tuple", activation="softmax").state_dict(), tmp_path / "pnet.pt")
    report, fits = inspect(
        tmp_path / "pnet.pt",
        "tests/fixture_models.py:StructuredNet",
        {"num_classes": 2, "form": "tuple", "activation": "softmax"},
        (3, 12, 12),
    )
    assert fits
    assert report.splitlines()[-3:] == [
        "its forward returns tuple(Tensor[2, 4], Tensor[2, 2]) for a probe of 2 rows of [3, 12, 12]",
        "  output: {select: 0, kind: logits}   # 4 labels",
        "  output: {select: 1, kind: probabilities}   # 2 labels",
    ]
