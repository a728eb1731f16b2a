"""The ensemble's counters, emitted through TorchServe's metrics API by the real handler, once per batch."""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import ts
import yaml
from ts.context import Context

from handlers.ensemble import BatchAnswer, Reply
from handlers.ensemble_handler import EnsembleHandler
from handlers.ensemble_metrics import COUNTERS, MISSING_REASONS, EnsembleMetrics, batch_counts, label_value, zero_series
from tests.conftest import image_bytes, load_handler, serve
from tests.fixture_reference import member_probabilities

ROOT = Path(__file__).resolve().parent.parent
METRICS_CONFIG = ROOT / "monitoring" / "metrics.yaml"
LINE = re.compile(r"\[METRICS\](\w+)\.(\w+):([0-9.e-]+)\|#([^|]*)\|#type:COUNTER\|#hostname:[^,]+,\d+")
TRIO_MEMBERS = ("mobile", "pool_rgb", "pool_gray")
TRIO_LABELS = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def trio(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleHandler, Context]:
    return load_handler(test_store, "trio", tmp_path_factory.mktemp("trio"), METRICS_CONFIG)


def emitted(
    caplog: pytest.LogCaptureFixture, handler: EnsembleHandler | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The [METRICS] lines the worker printed (after flushing `handler`'s counts), summed as
    {(name, ((label, value), ...)): value}; ModelName and Level checked. The background flush may have
    sent part of them already, so lines of one key add up."""
    if handler is not None:
        handler.metrics.flush()
    lines: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for record in caplog.records:
        match = LINE.fullmatch(record.getMessage())
        if match is None:
            continue
        name, _, value, dims = match.groups()
        labels = dict(pair.split(":", 1) for pair in dims.split(","))
        assert (labels.pop("ModelName"), labels.pop("Level")) == ("trio", "Model")
        key = (name, tuple(sorted(labels.items())))
        lines[key] = lines.get(key, 0) + float(value)
    return lines


POLICIES = ("all", "any", "cascade", "k_of_n", "majority", "max", "mean")
ERROR_TYPES = (
    "RequestError",
    "InvalidImage",
    "UnsupportedMediaType",
    "PayloadTooLarge",
    "InvalidPolicy",
    "QuorumNotMet",
    "EnsembleError",
)


def first_batch_zeros(*members: str, labels: tuple[str, ...]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every labelled series at zero: what a worker's first batch declares besides its own counts."""
    zeros: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    zeros |= {("ensemble_partial_answers_total", ()): 0, ("ensemble_quorum_failures_total", ()): 0}
    zeros |= {("ensemble_requests_total", (("Policy", p),)): 0 for p in POLICIES}
    zeros |= {("ensemble_errors_total", (("ErrorType", e),)): 0 for e in ERROR_TYPES}
    for member in members:
        zeros |= {
            (name, (("Member", member),)): 0
            for name in (
                "ensemble_member_images_total",
                "ensemble_member_skipped_total",
                "ensemble_member_forward_seconds_total",
            )
        }
        zeros |= {("ensemble_member_positive_total", (("Label", label), ("Member", member))): 0 for label in labels}
        zeros |= {
            ("ensemble_member_missing_total", (("Member", member), ("Reason", reason))): 0
            for reason in ("deadline", "busy", "error", "non_finite")
        }
    return zeros


def png(seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"body": image_bytes(seed)}, {"Content-Type": "image/png"}


def test_first_batch_emits_each_counter_once_with_exact_counts(
    test_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh worker's first batch: its own counts, and every other labelled series at zero."""
    trio = load_handler(test_store, "trio", tmp_path, METRICS_CONFIG)
    mean_images = [image_bytes(s) for s in (1, 2, 3)]
    unanimous_images = [image_bytes(s) for s in (4, 5)]
    requests = [
        (
            {"body": json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in mean_images]}).encode()},
            {"Content-Type": "application/json"},
        ),
        ({"body": b"not an image"}, {"Content-Type": "image/png"}),
        *[({"body": d, "policy": b"k_of_n", "k": b"3"}, {"Content-Type": "image/png"}) for d in unanimous_images],
        ({"body": image_bytes(6), "policy": b"vote"}, {"Content-Type": "image/png"}),
    ]
    caplog.set_level(logging.INFO)
    replies = serve(*trio, requests)
    assert [status for status, _, _ in replies] == [200, 400, 200, 200, 400]

    images = mean_images + unanimous_images
    probs = torch.from_numpy(numpy.stack(list(member_probabilities(test_store, "trio", images).values())))
    votes = probs.argmax(dim=-1)  # [member, image]
    disagreements = int((votes != votes[:1]).any(dim=0).sum())
    abstentions = int((votes[:, 3:] != votes[:1, 3:]).any(dim=0).sum())
    expected = first_batch_zeros("mobile", "pool_rgb", "pool_gray", labels=TRIO_LABELS)
    expected |= {
        ("ensemble_requests_total", (("Policy", "mean"),)): 1,
        ("ensemble_requests_total", (("Policy", "k_of_n"),)): 2,
        ("ensemble_errors_total", (("ErrorType", "InvalidImage"),)): 1,
        ("ensemble_errors_total", (("ErrorType", "InvalidPolicy"),)): 1,
        ("ensemble_images_total", ()): 5,
        ("ensemble_batch_images_total", ()): 5,
        ("ensemble_batches_total", ()): 1,
        ("ensemble_disagreements_total", ()): disagreements,
        ("ensemble_abstentions_total", ()): abstentions,
    }
    for m, member in enumerate(TRIO_MEMBERS):
        expected["ensemble_member_images_total", (("Member", member),)] = 5
        for label_index, label in enumerate(TRIO_LABELS):
            count = int((votes[m] == label_index).sum())
            if count:
                expected["ensemble_member_positive_total", (("Label", label), ("Member", member))] = count
    got = emitted(caplog, trio[0])
    seconds = {key: got.pop(key) for key in list(got) if key[0] == "ensemble_member_forward_seconds_total"}
    assert got == {key: value for key, value in expected.items() if key[0] != "ensemble_member_forward_seconds_total"}
    assert sorted(seconds) == [
        ("ensemble_member_forward_seconds_total", (("Member", m),)) for m in sorted(TRIO_MEMBERS)
    ]
    assert all(0 < value < 60 for value in seconds.values())


def test_a_batch_of_errors_only_counts_errors_and_the_batch(
    trio: tuple[EnsembleHandler, Context], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    serve(*trio, [png(11)])  # The worker's first batch, which also declares every series at zero.
    trio[0].metrics.flush()
    caplog.clear()
    serve(*trio, [({"body": b""}, {"Content-Type": "image/png"}), ({"body": b"x"}, {"Content-Type": "text/plain"})])
    assert emitted(caplog, trio[0]) == {
        ("ensemble_errors_total", (("ErrorType", "RequestError"),)): 1,
        ("ensemble_errors_total", (("ErrorType", "UnsupportedMediaType"),)): 1,
        ("ensemble_images_total", ()): 0,
        ("ensemble_batch_images_total", ()): 0,
        ("ensemble_batches_total", ()): 1,
    }


def test_undeclared_counters_are_not_emitted_and_the_worker_says_so(
    test_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With TorchServe's default metrics config the frontend would drop them: the worker does not send them."""
    caplog.set_level(logging.INFO)
    handler, context = load_handler(test_store, "trio", tmp_path, Path(ts.__file__).parent / "configs" / "metrics.yaml")
    assert handler.metrics.emitted == []
    warning = "metrics not declared in TorchServe's metrics config, so not emitted: " + ", ".join(COUNTERS)
    assert warning in [record.getMessage() for record in caplog.records]
    caplog.clear()
    assert [status for status, _, _ in serve(handler, context, [png(7)])] == [200]
    assert emitted(caplog, handler) == {}


def test_shipped_config_declares_every_counter_with_its_labels() -> None:
    counters = {
        c["name"]: c["dimensions"] for c in yaml.safe_load(METRICS_CONFIG.read_text())["model_metrics"]["counter"]
    }
    assert counters == {name: ["ModelName", "Level", *labels] for name, labels in COUNTERS.items()}


def test_multilabel_batches_count_labels_and_never_abstentions(
    test_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler, context = load_handler(test_store, "tags", tmp_path, METRICS_CONFIG)
    caplog.set_level(logging.INFO)
    images = [image_bytes(s) for s in (8, 9, 10)]
    serve(handler, context, [({"body": d}, {"Content-Type": "image/png"}) for d in images])
    handler.metrics.flush()
    probs = torch.from_numpy(numpy.stack(list(member_probabilities(test_store, "tags", images).values())))
    on = probs >= 0.5  # [member, image, label], the tags ensemble's threshold
    lines: dict[tuple[str, str], float] = {}
    for record in caplog.records:
        match = LINE.fullmatch(record.getMessage())
        if match:
            key = (match.group(1), match.group(4).replace("ModelName:tags,Level:Model", "").lstrip(","))
            lines[key] = lines.get(key, 0) + float(match.group(3))
    assert "ensemble_abstentions_total" not in {name for name, _ in lines}
    assert lines["ensemble_disagreements_total", ""] == int((on != on[:1]).any(dim=2).any(dim=0).sum())
    for m, member in enumerate(("mobile", "pool_rgb", "pool_gray")):
        for j, label in enumerate(("red", "round")):
            count = int(on[m, :, j].sum())
            assert lines.get(("ensemble_member_positive_total", f"Member:{member},Label:{label}"), 0) == count


def test_batches_are_summed_and_each_series_sent_once_per_flush(
    trio: tuple[EnsembleHandler, Context], caplog: pytest.LogCaptureFixture
) -> None:
    """Three batches counted, then one flush: one line per series, carrying the three batches' sums."""
    handler, context = trio
    metrics = EnsembleMetrics(context.metrics, "trio", handler.ensemble.spec, interval_s=3600)
    metrics.flush()  # The first flush: every labelled series at zero.
    caplog.set_level(logging.INFO)
    caplog.clear()
    for seeds in ((13,), (14, 15), (16,)):
        prepared = [
            handler.ensemble.prepare({"body": image_bytes(seed)}, {"Content-Type": "image/png"}) for seed in seeds
        ]
        metrics.record(handler.ensemble.answer_batch(prepared))
    metrics.flush()
    series = [(match.group(1), match.group(4)) for r in caplog.records if (match := LINE.fullmatch(r.getMessage()))]
    assert len(series) == len(set(series))
    got = emitted(caplog)
    assert (got[("ensemble_batches_total", ())], got[("ensemble_images_total", ())]) == (3, 4)
    assert got[("ensemble_requests_total", (("Policy", "mean"),))] == 4


@pytest.mark.parametrize(
    ("label", "sent"),
    [
        pytest.param("pleural effusion", "pleural effusion", id="space-kept"),
        pytest.param("a,b", "a_b", id="comma"),
        pytest.param("ratio:1", "ratio_1", id="colon"),
        pytest.param("x|y", "x_y", id="bar"),
    ],
)
def test_label_values_that_would_break_torchserves_metric_line_are_replaced(label: str, sent: str) -> None:
    assert label_value(label) == sent


# --- batch_counts on hand-made replies: members missing, partial answers, quorum failures --------------------

HAND_MEMBERS = ("a", "b", "c")
HAND_LABELS = ("cat", "dog")
HAND_SECONDS = {"a": 0.5, "b": 0.25, "c": 0.125}


def one_hot(*labels: str | None) -> list[list[bool]]:
    """[image, label] rows: each image's one label of HAND_LABELS, or none."""
    return [[label == name for name in HAND_LABELS] for label in labels]


def answered_partially() -> Reply:
    """Three images; c past its deadline on the second (not run) and failing on the third (run, its vote dropped:
    it says cat where a and b say dog, so counting it would add a disagreement). The second image abstains."""
    return Reply(
        status=200,
        body={},
        images=3,
        policy="majority",
        members=HAND_MEMBERS,
        votes=torch.tensor([one_hot("cat", "cat", "dog"), one_hot("cat", "dog", "dog"), one_hot("cat", None, "cat")]),
        chosen=torch.tensor(one_hot("cat", None, "dog")),
        ran=torch.tensor([[True, True, True], [True, True, True], [True, False, True]]),
        missing=({}, {"c": "deadline"}, {"c": "error: RuntimeError: boom"}),
        partial=2,
    )


def quorum_not_met() -> Reply:
    """Two images refused: b busy on both, c non-finite on the first and past its deadline on the second."""
    return Reply(
        status=503,
        body={"code": 503, "type": "QuorumNotMet"},
        error="QuorumNotMet",
        missing=({"b": "busy", "c": "non_finite"}, {"b": "busy", "c": "deadline"}),
    )


def batch_totals(images: int) -> dict[tuple[str, tuple[str, ...]], float]:
    """What every batch counts: itself, its images, and each member's forward seconds."""
    return {
        ("ensemble_batches_total", ()): 1,
        ("ensemble_batch_images_total", ()): images,
        ("ensemble_images_total", ()): images,
        **{("ensemble_member_forward_seconds_total", (member,)): s for member, s in HAND_SECONDS.items()},
    }


ANSWERED_PARTIALLY = {
    ("ensemble_requests_total", ("majority",)): 1,
    ("ensemble_member_images_total", ("a",)): 3,
    ("ensemble_member_images_total", ("b",)): 3,
    ("ensemble_member_images_total", ("c",)): 1,  # Neither run nor skipped where missing: 1 + 2 missing = 3.
    ("ensemble_member_positive_total", ("a", "cat")): 2,
    ("ensemble_member_positive_total", ("a", "dog")): 1,
    ("ensemble_member_positive_total", ("b", "cat")): 1,
    ("ensemble_member_positive_total", ("b", "dog")): 2,
    ("ensemble_member_positive_total", ("c", "cat")): 1,  # Not 2: its vote on the image it failed is dropped.
    ("ensemble_member_missing_total", ("c", "deadline")): 1,
    ("ensemble_member_missing_total", ("c", "error")): 1,  # The error's type and message are not a label.
    ("ensemble_partial_answers_total", ()): 2,
    ("ensemble_disagreements_total", ()): 1,
    ("ensemble_abstentions_total", ()): 1,
}
ANSWERED_IN_FULL = {  # The same votes with every member answering every image: c's votes all count.
    **ANSWERED_PARTIALLY,
    ("ensemble_member_images_total", ("c",)): 3,
    ("ensemble_member_positive_total", ("c", "cat")): 2,
    ("ensemble_disagreements_total", ()): 2,
}
del ANSWERED_IN_FULL["ensemble_member_missing_total", ("c", "deadline")]
del ANSWERED_IN_FULL["ensemble_member_missing_total", ("c", "error")]
del ANSWERED_IN_FULL["ensemble_partial_answers_total", ()]
QUORUM_NOT_MET = {
    ("ensemble_errors_total", ("QuorumNotMet",)): 1,
    ("ensemble_quorum_failures_total", ()): 1,
    ("ensemble_member_missing_total", ("b", "busy")): 2,
    ("ensemble_member_missing_total", ("c", "non_finite")): 1,
    ("ensemble_member_missing_total", ("c", "deadline")): 1,
}


@pytest.mark.parametrize(
    ("replies", "images", "expected"),
    [
        pytest.param([answered_partially()], 3, ANSWERED_PARTIALLY, id="answered-partially"),
        pytest.param([quorum_not_met()], 0, QUORUM_NOT_MET, id="quorum-not-met"),
        pytest.param(
            [answered_partially(), quorum_not_met(), Reply(status=400, body={}, error="InvalidImage")],
            3,
            {
                **ANSWERED_PARTIALLY,
                **QUORUM_NOT_MET,
                ("ensemble_member_missing_total", ("c", "deadline")): 2,
                ("ensemble_errors_total", ("InvalidImage",)): 1,  # Another refusal: no quorum failure.
            },
            id="one-batch-of-both-and-another-refusal",
        ),
        pytest.param(
            [replace(answered_partially(), ran=torch.ones(3, 3, dtype=torch.bool), missing=(), partial=0)],
            3,
            ANSWERED_IN_FULL,
            id="answered-in-full",
        ),
    ],
)
def test_batch_counts_members_missing_partial_answers_and_quorum_failures(
    replies: list[Reply], images: int, expected: dict[tuple[str, tuple[str, ...]], int]
) -> None:
    """Exact counts, every key: a member missing from an image counts under the reason's kind, neither run nor
    skipped, its vote left out; a QuorumNotMet refusal counts its missing members, a quorum failure and an error."""
    counts = batch_counts(
        BatchAnswer(replies, dict(HAND_SECONDS)), members=HAND_MEMBERS, labels=HAND_LABELS, single_label=True
    )
    assert dict(counts) == batch_totals(images) | expected


def test_first_series_include_every_member_missing_for_every_reason_and_the_rare_events() -> None:
    zeros = zero_series(members=HAND_MEMBERS, labels=HAND_LABELS, policies=("majority",), error_types=("QuorumNotMet",))
    assert MISSING_REASONS == ("deadline", "busy", "error", "non_finite")
    assert {key for key in zeros if key[0] == "ensemble_member_missing_total"} == {
        ("ensemble_member_missing_total", (member, reason)) for member in HAND_MEMBERS for reason in MISSING_REASONS
    }
    assert zeros["ensemble_partial_answers_total", ()] == zeros["ensemble_quorum_failures_total", ()] == 0
    assert set(zeros.values()) == {0}
