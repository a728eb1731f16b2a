"""Paying for only the members you need: exact early exit for the votes, the cascade policy, uncertainty and defer.

The property tests drive the policies with random member probabilities; the others run a real in-process
ensemble (three members, eager, so forward hooks see every row) through `answer_batch`, as the handler does.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from archive_scripts.faces_demo import corrupted
from archive_scripts.faces_demo import crops as face_crops
from handlers.answers.policies import Votes, combine, settled, simulate_stages
from handlers.config.files import load_ensembles
from handlers.config.policy import VOTE_POLICIES, PolicySpec, resolve_policy
from handlers.ensemble import Ensemble
from handlers.ensemble_metrics import batch_counts
from handlers.errors import ConfigError, EnsembleError, InvalidPolicy
from handlers.inputs.prepare import PreparedRequest
from tests.conftest import NPY, image_bytes, instances, npy_bytes, write_ensemble, write_tensor_ensemble

PNG = {"Content-Type": "image/png"}
IMAGES = [image_bytes(seed) for seed in range(60, 66)]
EXAMPLES = settings(max_examples=400, deadline=None)


def _probabilities(draw: st.DrawFn, task: str, members: int, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random probs [member, image, label] from a few values (so votes tie often) and which labels each member
    scores."""
    labels = {"binary": 2, "multiclass": draw(st.integers(2, 4)), "multilabel": draw(st.integers(1, 3))}[task]
    values = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])
    probs = torch.tensor(
        draw(st.lists(values, min_size=members * images * labels, max_size=members * images * labels)),
        dtype=torch.float64,
    )
    probs = probs.view(members, images, labels)
    scoring = torch.ones(members, labels, dtype=torch.bool)
    if task == "binary":
        probs = torch.stack([1 - probs[..., 1], probs[..., 1]], dim=-1)
    if task == "multilabel":
        scoring = torch.tensor(
            draw(st.lists(st.booleans(), min_size=members * labels, max_size=members * labels))
        ).view(members, labels)
        scoring[0] |= ~scoring.any(dim=0)
        scoring[:, 0] |= ~scoring.any(dim=1)
        probs = probs.masked_fill(~scoring[:, None, :], math.nan)
    return probs, scoring


@st.composite
def staged_votes(draw: st.DrawFn) -> tuple[torch.Tensor, Votes]:
    task = draw(st.sampled_from(["binary", "multiclass", "multilabel"]))
    members = draw(st.integers(1, 5))
    probs, scoring = _probabilities(draw, task, members, draw(st.integers(1, 4)))
    name = draw(st.sampled_from([*VOTE_POLICIES, "cascade"]))
    requested: dict[str, Any] = {"policy": name}
    if name == "k_of_n":
        requested["k"] = draw(st.integers(1, members))
    if name == "cascade":
        requested["confidence"] = draw(st.sampled_from([0.5, 0.7, 0.9, 1.0]))
    else:
        requested["early_exit"] = True
    if task != "multiclass":
        requested["threshold"] = draw(st.sampled_from([0.25, 0.5, 0.75]))
    policy = resolve_policy(requested, default=None, task=task, n_members=members)
    order = draw(st.permutations(range(members)))
    cut = draw(st.integers(1, members))
    stages = (tuple(order[:cut]), *((m,) for m in order[cut:])) if draw(st.booleans()) else tuple((m,) for m in order)
    weights = torch.tensor(
        draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=members, max_size=members)), dtype=torch.float64
    )
    votes = Votes(task, weights, 1 if task == "binary" else None, policy, scoring=scoring.sum(dim=0), stages=stages)
    return probs, votes


@EXAMPLES
@given(staged_votes())
def test_an_answer_settled_early_is_the_answer_of_every_member(case: tuple[torch.Tensor, Votes]) -> None:
    probs, votes = case
    ran = simulate_stages(probs, votes)
    assert settled(ran, votes).all()
    assert torch.equal(combine(ran, votes).chosen, combine(probs, votes).chosen)


@pytest.mark.parametrize(
    ("task", "policy", "threshold", "skipped"),
    [
        pytest.param("binary", "any", 0.0, 2, id="binary-any-first-yes-settles"),
        pytest.param("binary", "all", 1.0, 2, id="binary-all-first-no-settles"),
        pytest.param("multilabel", "any", 0.0, 2, id="multilabel-every-label-yes"),
        pytest.param("binary", "majority", 0.0, 1, id="binary-majority-two-of-three"),
        pytest.param("binary", "k_of_n", 0.0, 0, id="binary-k3-needs-all-three-yes-votes"),
        pytest.param("binary", "k_of_n", 1.0, 2, id="binary-k3-first-no-settles"),
    ],
)
def test_a_settled_vote_stops_after_exactly_the_members_it_needs(
    task: str, policy: str, threshold: float, skipped: int
) -> None:
    probs = torch.tensor([[[0.4, 0.6]], [[0.3, 0.7]], [[0.2, 0.8]]], dtype=torch.float64)
    requested = {
        "policy": policy,
        "threshold": threshold,
        "early_exit": True,
        **({"k": 3} if policy == "k_of_n" else {}),
    }
    votes = Votes(
        task,
        torch.ones(3, dtype=torch.float64),
        1 if task == "binary" else None,
        resolve_policy(requested, default=None, task=task, n_members=3),
        scoring=torch.tensor([3, 3]),
    )
    ran = simulate_stages(probs, votes)
    assert int(ran[:, 0].isnan().all(dim=-1).sum()) == skipped


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    """A binary ensemble of three members on eager, in-process."""
    path = write_ensemble(tmp_path_factory.mktemp("pair"), "pair", task="binary", policy={"name": "any"})
    return Ensemble.from_spec(load_ensembles(path)["pair"].with_plan("eager"), torch.device("cpu"))


@pytest.fixture(scope="module")
def tags(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    """A multilabel ensemble of three members on eager, in-process."""
    path = write_ensemble(tmp_path_factory.mktemp("tags"), "tags", task="multilabel", policy={"name": "any"})
    return Ensemble.from_spec(load_ensembles(path)["tags"].with_plan("eager"), torch.device("cpu"))


def ask(ensemble: Ensemble, requests: list[dict[str, str]], images: list[bytes] = IMAGES) -> list[dict[str, Any]]:
    """One batch: request i carries every image in `images` and the parameters requests[i]; the JSON bodies."""
    prepared = [prepare(ensemble, params, images) for params in requests]
    replies = ensemble.answer_batch(prepared).replies
    assert [reply.status for reply in replies] == [200] * len(requests), [reply.body for reply in replies]
    return [reply.body for reply in replies]


def prepare(ensemble: Ensemble, params: dict[str, str], images: list[bytes]) -> PreparedRequest:
    prepared = ensemble.prepare({"body": images[0], **{k: v.encode() for k, v in params.items()}}, PNG)
    first = first_image(prepared)
    return dataclasses.replace(
        prepared, inputs=(first, *(first_image(ensemble.prepare({"body": image}, PNG)) for image in images[1:]))
    )


def first_image(prepared: PreparedRequest) -> Image.Image:
    """The first decoded image of an image request (a tensor request's inputs are one tensor)."""
    assert isinstance(prepared.inputs, tuple)
    return prepared.inputs[0]


def count_rows(ensemble: Ensemble) -> tuple[dict[str, int], list[Any]]:
    """Rows each member's module is called on, counted by forward hooks; and the hooks to remove.

    The stages are timed first: timing runs the members on a probe.
    """
    ensemble.stages()
    rows: dict[str, int] = {}
    hooks = []
    for group in ensemble.runner.groups:
        [member] = group.indices
        name = ensemble.spec.members[member].name
        rows[name] = 0

        def seen(_module: Any, args: tuple[torch.Tensor, ...], _out: Any, name: str = name) -> None:
            rows[name] += len(args[0])

        assert group.choice is not None and isinstance(group.choice.forward, torch.nn.Module)
        hooks.append(group.choice.forward.register_forward_hook(seen))
    return rows, hooks


@pytest.mark.parametrize(
    ("params", "only_first"),
    [
        pytest.param({"policy": "any", "threshold": "0.5", "early_exit": "true"}, False, id="any"),
        pytest.param({"policy": "all", "threshold": "0.5", "early_exit": "true"}, False, id="all"),
        pytest.param({"policy": "majority", "threshold": "0.45", "early_exit": "true"}, False, id="majority"),
        pytest.param({"policy": "any", "threshold": "0", "early_exit": "true"}, True, id="any-everyone-says-yes"),
        pytest.param({"policy": "all", "threshold": "1", "early_exit": "true"}, True, id="all-everyone-says-no"),
        pytest.param({"policy": "cascade", "confidence": "0"}, True, id="cascade-sure-of-anything"),
        pytest.param({"policy": "cascade", "confidence": "0.5"}, False, id="cascade"),
    ],
)
def test_skipped_rows_never_reach_the_member(pair: Ensemble, params: dict[str, str], only_first: bool) -> None:
    rows, hooks = count_rows(pair)
    try:
        [body] = ask(pair, [params])
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {name: sum(name in p["members"] for p in body["predictions"]) for name in rows}
    order = [name for stage in pair.runner.stage_order() for name in stage["members"]]
    for prediction in body["predictions"]:
        assert prediction["early_exit"] is True
        assert list(prediction["members"]) == [name for name in rows if name in prediction["members"]]
        assert [name for name in order if name in prediction["members"]] == order[: len(prediction["members"])]
        assert prediction["skipped"] == [name for name in rows if name not in prediction["members"]]
    if only_first:
        assert rows == {name: len(IMAGES) if name == order[0] else 0 for name in rows}


@pytest.mark.parametrize("ensemble_name", ["pair", "tags"])
@pytest.mark.parametrize("policy", ["any", "all", "majority"])
def test_mixed_batch_gives_every_request_the_exhaustive_labels(
    request: pytest.FixtureRequest, ensemble_name: str, policy: str
) -> None:
    ensemble: Ensemble = request.getfixturevalue(ensemble_name)
    key = "labels" if ensemble_name == "tags" else "label"
    params = {"policy": policy, "threshold": "0.5"}
    early, exhaustive, subset_early, subset = ask(
        ensemble,
        [
            {**params, "early_exit": "true"},
            params,
            {**params, "early_exit": "true", "members": "pool_gray,mobile"},
            {**params, "members": "pool_gray,mobile"},
        ],
    )
    assert [p[key] for p in early["predictions"]] == [p[key] for p in exhaustive["predictions"]]
    assert [p[key] for p in subset_early["predictions"]] == [p[key] for p in subset["predictions"]]
    for prediction in exhaustive["predictions"]:
        assert list(prediction["members"]) == ["mobile", "pool_rgb", "pool_gray"] and "skipped" not in prediction
    for prediction in subset_early["predictions"]:
        assert sorted([*prediction["members"], *prediction["skipped"]]) == ["mobile", "pool_gray"]
    assert early["policy"] == {"name": policy, "params": {"threshold": 0.5, "early_exit": True}}


def test_member_metrics_count_what_ran_and_what_was_skipped(pair: Ensemble) -> None:
    prepared = [
        prepare(pair, {"policy": "any", "threshold": "0", "early_exit": "true"}, IMAGES),
        prepare(pair, {}, IMAGES[:2]),
    ]
    answer = pair.answer_batch(prepared)
    counts = batch_counts(
        answer, members=[m.name for m in pair.spec.members], labels=pair.spec.labels, single_label=True
    )
    [first] = pair.runner.stage_order()[0]["members"]
    for member in pair.spec.members:
        ran = len(IMAGES) + 2 if member.name == first else 2
        assert counts["ensemble_member_images_total", (member.name,)] == ran
        assert counts["ensemble_member_skipped_total", (member.name,)] == (0 if member.name == first else len(IMAGES))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param(
            {"policy": "mean", "early_exit": "true"}, "early_exit cannot be exact for policy 'mean'", id="mean"
        ),
        pytest.param({"policy": "max", "early_exit": "1"}, "early_exit cannot be exact for policy 'max'", id="max"),
        pytest.param(
            {"policy": "cascade", "early_exit": "yes"}, "cascade always runs members cheapest first", id="cascade"
        ),
        pytest.param({"policy": "any", "early_exit": "maybe"}, "early_exit must be true or false", id="not-a-boolean"),
        pytest.param(
            {"policy": "any", "confidence": "0.9"},
            "policy 'any' takes no parameter confidence; only cascade",
            id="confidence",
        ),
        pytest.param(
            {"policy": "cascade", "confidence": "1.5"},
            "confidence must be a number in [0, 1], got '1.5'",
            id="confidence-range",
        ),
        pytest.param({"uncertainty": "sure"}, "uncertainty must be true or false", id="uncertainty"),
    ],
)
def test_requests_early_exit_cannot_serve_are_400(pair: Ensemble, params: dict[str, str], message: str) -> None:
    bad = {"body": IMAGES[0], **{k: v.encode() for k, v in params.items()}}
    with pytest.raises(EnsembleError) as caught:
        pair.prepare(bad, PNG)
    assert caught.value.status == 400
    assert str(caught.value).startswith(message)


def test_mean_refuses_early_exit_and_says_why_in_full() -> None:
    with pytest.raises(InvalidPolicy) as caught:
        resolve_policy({"policy": "mean", "early_exit": "true"}, default=None, task="binary", n_members=3)
    assert str(caught.value) == (
        "early_exit cannot be exact for policy 'mean': the weighted mean moves with every member's probability, "
        "so no subset of members settles it; use a vote policy (any, all, majority, k_of_n) with early_exit, or "
        "policy=cascade to stop at a confidence you choose"
    )


def test_early_exit_in_ensembles_yaml_is_the_default_and_a_request_may_turn_it_off(tmp_path: Path) -> None:
    path = write_ensemble(tmp_path / "e", "pair", task="binary", policy={"name": "any", "early_exit": True})
    spec = load_ensembles(path)["pair"]
    assert spec.policy == PolicySpec("any", threshold=0.5, early_exit=True)
    ensemble = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    assert ensemble.prepare({"body": IMAGES[0]}, PNG).policy.early_exit is True
    assert ensemble.prepare({"body": IMAGES[0], "early_exit": b"false"}, PNG).policy.early_exit is False
    bad = write_ensemble(tmp_path / "bad", "pair", task="binary", policy={"name": "mean", "early_exit": True})
    with pytest.raises(ConfigError, match=r"policy: early_exit cannot be exact for policy 'mean'"):
        load_ensembles(bad)


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


@pytest.mark.parametrize("ensemble_name", ["pair", "tags"])
def test_uncertainty_is_the_deep_ensemble_decomposition(request: pytest.FixtureRequest, ensemble_name: str) -> None:
    ensemble: Ensemble = request.getfixturevalue(ensemble_name)
    [body] = ask(ensemble, [{"policy": "mean", "uncertainty": "true"}])
    probs = ensemble.probabilities([first_image(prepare(ensemble, {}, [image])) for image in IMAGES]).tolist()
    weights = [member.weight for member in ensemble.spec.members]
    share = [w / sum(weights) for w in weights]
    for i, prediction in enumerate(body["predictions"]):
        rows = [probs[m][i] for m in range(3)]
        if ensemble_name == "pair":
            mean = [sum(s * row[j] for s, row in zip(share, rows, strict=True)) for j in range(2)]
            total, expected = entropy(mean), sum(s * entropy(row) for s, row in zip(share, rows, strict=True))
            yes = sum(row[1] >= 0.5 for row in rows) / 3
            want = {
                "entropy": total,
                "expected_entropy": expected,
                "mutual_information": total - expected,
                "vote_margin": abs(2 * yes - 1),
            }
            assert prediction["uncertainty"] == pytest.approx(want, abs=2e-6)
            continue
        for j, label in enumerate(ensemble.spec.labels):
            mean = sum(s * row[j] for s, row in zip(share, rows, strict=True))
            total = entropy([mean, 1 - mean])
            expected = sum(s * entropy([row[j], 1 - row[j]]) for s, row in zip(share, rows, strict=True))
            yes = sum(row[j] >= 0.5 for row in rows) / 3
            got = {name: values[label] for name, values in prediction["uncertainty"].items()}
            assert got == pytest.approx(
                {
                    "entropy": total,
                    "expected_entropy": expected,
                    "mutual_information": total - expected,
                    "vote_margin": abs(2 * yes - 1),
                },
                abs=2e-6,
            )


def test_defer_in_json_v2_and_metrics(pair: Ensemble) -> None:
    [measured] = ask(pair, [{"policy": "mean", "uncertainty": "true"}])
    information = sorted(p["uncertainty"]["mutual_information"] for p in measured["predictions"])
    limit = round((information[2] + information[3]) / 2, 7)
    deferring = Ensemble.from_spec(
        dataclasses.replace(pair.spec, defer={"mutual_information": limit}), torch.device("cpu")
    )
    [body] = ask(deferring, [{"policy": "mean", "uncertainty": "true"}])
    for prediction, before in zip(body["predictions"], measured["predictions"], strict=True):
        value = before["uncertainty"]["mutual_information"]
        assert prediction["deferred"] is (value > limit)
        if value > limit:
            assert prediction["label"] is None and prediction["score"] is None
            assert prediction["reason"] == f"mutual_information {value:.4f} > {limit} (defer: in ensembles.yaml)"
        else:
            assert prediction["label"] == before["label"] and "reason" not in prediction
    encoded = [base64.b64encode(image).decode() for image in IMAGES]
    document = {
        "inputs": [{"name": "data", "datatype": "BYTES", "shape": [len(IMAGES)], "data": encoded}],
        "parameters": {"policy": "mean"},
    }
    v2 = deferring.prepare({"body": json.dumps(document).encode()}, {"Content-Type": "application/json"})
    answer = deferring.answer_batch([v2])
    outputs = {output["name"]: output["data"] for output in answer.replies[0].body["outputs"]}
    deferred = [p["deferred"] for p in body["predictions"]]
    assert sum(deferred) == 3
    assert outputs["deferred"] == deferred
    assert outputs["label"] == [p["label"] or "" for p in body["predictions"]]
    assert "mutual_information" not in outputs
    counts = batch_counts(
        answer, members=[m.name for m in pair.spec.members], labels=pair.spec.labels, single_label=True
    )
    assert counts["ensemble_deferrals_total", ()] == 3


@pytest.mark.parametrize("policy", ["any", "all"])
def test_tensor_instances_stop_early_with_the_exhaustive_labels(tmp_path: Path, policy: str) -> None:
    spec = load_ensembles(write_tensor_ensemble(tmp_path / "v"))["vectors"]
    ensemble = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    body = npy_bytes(instances(5, 12))
    early, exhaustive = (
        ensemble.answer_batch([ensemble.prepare({"body": body, "policy": policy.encode(), **extra}, NPY)])
        .replies[0]
        .body
        for extra in ({"early_exit": b"true"}, {})
    )
    assert [p["label"] for p in early["predictions"]] == [p["label"] for p in exhaustive["predictions"]]
    assert all(len(p["members"]) + len(p["skipped"]) == 2 for p in early["predictions"])


@pytest.mark.slow
@pytest.mark.parametrize("corruption", [None, ("blur", 2.0), ("downscale", 8)], ids=["clean", "blur-2", "downscale-8"])
def test_published_mtcnn_weights_on_real_faces_stop_early_with_the_exhaustive_labels(
    corruption: tuple[str, float] | None,
) -> None:
    """facenet-pytorch's shipped MTCNN weights (`make demo` copies them, digests pinned) on lfw_subset's 200
    photographs: under `any` and `all`, early exit answers every crop as running every member does, and skips
    members on real data."""
    spec = load_ensembles(Path(__file__).resolve().parent.parent / "ensembles.yaml")["faces"]
    ensemble = Ensemble.from_spec(spec, torch.device("cpu"))
    samples = face_crops() if corruption is None else corrupted(*corruption)
    encoded = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    for policy in ("any", "all"):
        early, exhaustive = ask(ensemble, [{"policy": policy, "early_exit": "true"}, {"policy": policy}], encoded)
        assert [p["label"] for p in early["predictions"]] == [p["label"] for p in exhaustive["predictions"]]
        assert sum(len(p["skipped"]) for p in early["predictions"]) > 0
