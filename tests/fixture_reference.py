"""Expected answers for the test ensembles, from a path that shares no code with the server.

The fixture ensembles' members are rebuilt from their source files (the original modules: torchvision's
builders and tests/fixture_models.py) and run eagerly on images decoded and preprocessed here with PIL and
torchvision transforms, following each member's `input:` settings in the ensemble's yaml. Their probabilities
go through tests/policy_reference.py, written from the docs. Nothing from handlers/ is imported.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import numpy
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn
from torchvision import transforms

from tests import fixture_models
from tests.policy_reference import Policy, Task, predict

DEFAULT_MEAN = {"RGB": [0.485, 0.456, 0.406], "L": [0.5]}
DEFAULT_STD = {"RGB": [0.229, 0.224, 0.225], "L": [0.5]}
COMPARED = ("label", "score", "labels", "scores", "top", "uncertainty", "skipped", "early_exit")


@functools.cache
def declared(store: Path, name: str) -> dict[str, Any]:
    """The ensemble as its source ensembles.yaml declares it."""
    path = store.parent / "src" / name / "ensembles.yaml"
    return yaml.safe_load(path.read_text())["ensembles"][name] | {"folder": path.parent}


@functools.cache
def module(store: Path, name: str, member: str) -> nn.Module:
    """A member rebuilt from its original module and its state_dict file, in eval mode."""
    ensemble = declared(store, name)
    entry = next(m for m in ensemble["members"] if m["name"] == member)
    source, cls = entry["arch"].split(":")
    assert source in ("torchvision", "fixture_models.py"), entry["arch"]
    builder = getattr(torchvision.models, cls) if source == "torchvision" else getattr(fixture_models, cls)
    model = builder(**entry.get("kwargs", {}))
    model.load_state_dict(torch.load(ensemble["folder"] / entry["weights"], weights_only=True))
    return model.eval()


def preprocess(data: bytes, settings: dict[str, Any]) -> torch.Tensor:
    """One encoded image as a member's input row: colour mode, a bilinear stretch to `size`, [0, 1], normalised."""
    assert settings.get("resize", "stretch") == "stretch" and settings.get("tta", "none") == "none", settings
    mode = settings.get("color_mode", "RGB")
    pipeline = transforms.Compose(
        [
            transforms.Resize(tuple(settings["size"]), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(settings.get("mean", DEFAULT_MEAN[mode]), settings.get("std", DEFAULT_STD[mode])),
        ]
    )
    return pipeline(Image.open(io.BytesIO(data)).convert(mode))


def probabilities(store: Path, name: str, member: str, rows: torch.Tensor) -> numpy.ndarray:
    """The member's probabilities per row: softmax (multiclass; binary: the positive label's) or sigmoid (multilabel).

    Activated in the member's own float32, as it would output them: the fixture's untrained mobilenet gives logits
    of about 1e-11, whose sigmoid is exactly 0.5 in float32 (a yes at threshold 0.5) but just below it in float64.
    """
    ensemble = declared(store, name)
    with torch.no_grad():
        logits = module(store, name, member)(rows)
    if ensemble["task"] == "multilabel":
        return torch.sigmoid(logits).double().numpy()
    probs = torch.softmax(logits, dim=1).double().numpy()
    return probs[:, ensemble["labels"].index(ensemble["positive_label"])] if ensemble["task"] == "binary" else probs


def member_rows(store: Path, name: str, member: str, images: list[bytes]) -> torch.Tensor:
    """The member's input batch: the ensemble's input settings with the member's own `input:` over them."""
    ensemble = declared(store, name)
    entry = next(m for m in ensemble["members"] if m["name"] == member)
    settings = {**ensemble["input"], **entry.get("input", {})}
    return torch.stack([preprocess(data, settings) for data in images])


def member_probabilities(
    store: Path, name: str, images: list[bytes] | numpy.ndarray, members: list[str] | None = None
) -> dict[str, numpy.ndarray]:
    """{member: probabilities [N, labels] (binary: [N])} of the members (default: all) on images or tensor instances."""
    names = members or [m["name"] for m in declared(store, name)["members"]]
    if isinstance(images, numpy.ndarray):
        return {m: probabilities(store, name, m, torch.from_numpy(images)) for m in names}
    return {m: probabilities(store, name, m, member_rows(store, name, m, images)) for m in names}


def resolve(ensemble: dict[str, Any], params: dict[str, str]) -> tuple[Policy, list[str]]:
    """A request's policy and members, as docs/http/parameters.md reads them: parameters given for the default policy
    override its own; naming another policy starts from no parameters."""
    default: dict[str, Any] = dict(ensemble.get("policy", {"name": "mean"}))
    name = str(params.get("policy", default["name"]))
    base = default if name == default["name"] else {"name": name}
    merged = {**base, **{k: v for k, v in params.items() if k in ("k", "threshold", "confidence")}}
    policy = Policy(
        name=name,
        k=int(merged["k"]) if "k" in merged else None,
        threshold=float(merged.get("threshold", 0.5)),
        confidence=float(merged.get("confidence", 0.9)),
        top_k=int(params.get("top_k", ensemble.get("top_k", 1))),
        uncertainty=params.get("uncertainty") == "true",
    )
    declared_names = [m["name"] for m in ensemble["members"]]
    asked = params["members"].split(",") if "members" in params else declared_names
    return policy, [m for m in declared_names if m in asked]


def expected_answers(
    store: Path, name: str, images: list[bytes] | numpy.ndarray, **params: str
) -> list[dict[str, Any]]:
    """The predictions the docs say `name` answers for `images` (encoded images, or tensor instances [N, *shape])
    under the request parameters `params` (as a request sends them: strings)."""
    ensemble = declared(store, name)
    policy, members = resolve(ensemble, params)
    task = Task(ensemble["task"], tuple(ensemble["labels"]), ensemble.get("positive_label"))
    weights = {m["name"]: float(m.get("weight", 1.0)) for m in ensemble["members"]}
    probs = member_probabilities(store, name, images, members)
    return [predict(task, {m: probs[m][i] for m in members}, weights, policy) for i in range(len(images))]


def close(got: Any, want: Any) -> bool:
    """Equal structure, labels and names; numbers within 1e-5 (answers round to 6 decimals)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want))
    if isinstance(want, float) and not isinstance(got, bool):
        return isinstance(got, int | float) and abs(got - want) <= 1e-5
    return got == want


def assert_fields_match(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The compared fields are the same ones, and each is close to the expected value."""
    assert [key for key in COMPARED if key in got] == [key for key in COMPARED if key in want], (got, want)
    for key in COMPARED:
        if key in want:
            assert close(got[key], want[key]), f"{key}: served {got[key]!r}, expected {want[key]!r}"


def assert_answers(served: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Each served prediction, and each member's view in it, has the expected fields."""
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert_fields_match(got, want)
        assert list(got["members"]) == list(want["members"])
        for member, view in want["members"].items():
            assert_fields_match(got["members"][member], view)


def labels_and_scores(expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Expected predictions cut to what a v2 answer carries in our JSON form (`v2_as_predictions`)."""

    def cut(view: dict[str, Any]) -> dict[str, Any]:
        return {"label": view["label"], "score": view["score"]}

    return [{**cut(p), "members": {m: cut(v) for m, v in p["members"].items()}} for p in expected]
