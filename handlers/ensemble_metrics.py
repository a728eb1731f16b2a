"""What an operator of an ensemble wants to count, emitted through TorchServe's metrics API.

Each emission is a `[METRICS]` line on the worker's stdout that TorchServe's frontend parses, and
the frontend keeps only metrics declared in its metrics config (`metrics_config`, here
`monitoring/metrics.yaml`; pytorch/serve issue 2450). So counts are summed, per batch and then
over a second, and each (counter, labels) pair is emitted once per second at most; a counter the
config does not declare is not emitted at all, and the worker says once, at start, which ones it
skips. TorchServe adds the `ModelName`, `Level` and `Hostname` labels; the others are ours
(docs/monitoring.md).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from handlers.config.policy import policy_names
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import BatchAnswer
from handlers.errors import ERROR_TYPES, QuorumNotMet
from handlers.execution.missing import REASONS, reason_kind

COUNTERS: dict[str, tuple[str, ...]] = {
    "ensemble_requests_total": ("Policy",),
    "ensemble_images_total": (),
    "ensemble_errors_total": ("ErrorType",),
    "ensemble_member_images_total": ("Member",),
    "ensemble_member_skipped_total": ("Member",),
    "ensemble_member_forward_seconds_total": ("Member",),
    "ensemble_member_positive_total": ("Member", "Label"),
    "ensemble_disagreements_total": (),
    "ensemble_abstentions_total": (),
    "ensemble_deferrals_total": (),
    "ensemble_member_missing_total": ("Member", "Reason"),
    "ensemble_partial_answers_total": (),
    "ensemble_quorum_failures_total": (),
    "ensemble_batch_images_total": (),
    "ensemble_batches_total": (),
}
TORCHSERVE_DIMENSIONS = ("ModelName", "Level")
# Why a member is missing from an answer, as a label: the reason's kind (an error's type and message stay in the
# answer, out of the labels, so the series stay few).
MISSING_REASONS = REASONS
QUORUM_NOT_MET = QuorumNotMet.__name__
FLUSH_INTERVAL_S = 1.0
logger = logging.getLogger(__name__)

Counts = Counter[tuple[str, tuple[str, ...]]]


def batch_counts(answer: BatchAnswer, *, members: Sequence[str], labels: Sequence[str], single_label: bool) -> Counts:
    """Every counter's increment for one batch, keyed by (name, our label values in COUNTERS order).

    A member's images and votes count the images it ran on and answered for the requests it answered (a
    request may name `members`); the images an early exit spared it count as skipped. `members` lists all of
    them, for their forward seconds.

    A member missing from an image's answer (past the deadline, busy, its error, a non-finite output) counts
    once for that image under the reason's kind (`error`, never its message), in answered requests and in
    requests refused because too few members answered (`QuorumNotMet`, also counted as a quorum failure).
    On that image it counts neither as run nor as skipped and its vote is left out, so for the requests it
    answered a member's images, skipped and missing add up to the images of the requests that named it.
    Partial answers: the images a reply says have a partial answer.

    Disagreement: the own votes of the members that answered an image are not all the same. Abstention
    (binary and multiclass only; an empty multilabel answer is an answer): the combined choice has no
    label. Deferral: the answer crossed a `defer:` threshold.
    """
    counts: Counts = Counter()
    images = 0
    for reply in answer.replies:
        for missing in reply.missing:
            for member, reason in missing.items():
                counts["ensemble_member_missing_total", (member, reason_kind(reason))] += 1
        if reply.error is not None:
            counts["ensemble_errors_total", (reply.error,)] += 1
            if reply.error == QUORUM_NOT_MET:
                counts["ensemble_quorum_failures_total", ()] += 1
            continue
        policy, votes, chosen, ran = reply.policy, reply.votes, reply.chosen, reply.ran
        assert policy is not None and votes is not None and chosen is not None and ran is not None, (
            "an answered reply carries its votes"
        )
        images += reply.images
        counts["ensemble_requests_total", (policy,)] += 1
        if reply.partial:
            counts["ensemble_partial_answers_total", ()] += reply.partial
        answered, absent = ran, torch.zeros_like(ran)
        if reply.missing:  # [member, image]: missing from that image's answer (not run, or run without an answer)
            absent = torch.tensor(
                [[member in missing for missing in reply.missing] for member in reply.members],
                dtype=torch.bool,
                device=ran.device,
            ).reshape(ran.shape)
            answered, votes = ran & ~absent, votes & ~absent[..., None]
        for m, (member, ran_on, absent_on) in enumerate(
            zip(reply.members, answered.sum(dim=1).tolist(), absent.sum(dim=1).tolist(), strict=True)
        ):
            counts["ensemble_member_images_total", (member,)] += ran_on
            if ran_on + absent_on < reply.images:
                counts["ensemble_member_skipped_total", (member,)] += reply.images - ran_on - absent_on
            for label, count in zip(labels, votes[m].sum(dim=0).tolist(), strict=True):
                if count:
                    counts["ensemble_member_positive_total", (member, label)] += count
        someone = (votes & answered[..., None]).any(dim=0)
        everyone = (votes | ~answered[..., None]).all(dim=0)
        counts["ensemble_disagreements_total", ()] += int((someone & ~everyone).any(dim=-1).sum())
        if reply.deferred:
            counts["ensemble_deferrals_total", ()] += reply.deferred
        if single_label:
            counts["ensemble_abstentions_total", ()] += int((~chosen.any(dim=-1)).sum())
    counts["ensemble_batches_total", ()] += 1
    counts["ensemble_batch_images_total", ()] += images
    counts["ensemble_images_total", ()] += images
    for member in members:
        seconds = answer.forward_seconds.get(member, 0.0)
        # A Counter sums any number (its documentation says so); typeshed types its values int.
        counts["ensemble_member_forward_seconds_total", (member,)] += seconds  # type: ignore[assignment]
    return counts


def zero_series(
    *, members: Sequence[str], labels: Sequence[str], policies: Sequence[str], error_types: Sequence[str]
) -> Counts:
    """Every labelled series this ensemble can have, and the counters of rare events (partial answers, quorum
    failures), at zero: sent with the first batch so that each exists from the start, a ratio or an alert can
    compare a member that never voted for a label (or was never missing) with its peers, and a rate sees the
    first event as an increase rather than as the series' first sample."""
    zeros: Counts = Counter()
    zeros["ensemble_partial_answers_total", ()] = 0
    zeros["ensemble_quorum_failures_total", ()] = 0
    for policy in policies:
        zeros["ensemble_requests_total", (policy,)] = 0
    for error in error_types:
        zeros["ensemble_errors_total", (error,)] = 0
    for member in members:
        zeros["ensemble_member_images_total", (member,)] = 0
        zeros["ensemble_member_skipped_total", (member,)] = 0
        zeros["ensemble_member_forward_seconds_total", (member,)] = 0
        for reason in MISSING_REASONS:
            zeros["ensemble_member_missing_total", (member, reason)] = 0
        for label in labels:
            zeros["ensemble_member_positive_total", (member, label)] = 0
    return zeros


class EnsembleMetrics:
    """The declared counters of one worker: batches are counted as they are answered, and the sums emitted
    every `interval_s` from a background thread.

    Each emission is a line TorchServe's Java frontend parses; emitted per batch, about 15 lines a batch
    cost the demo 4% of its throughput at concurrency 8 (`make bench-metrics`). Summed over an interval,
    a busy worker sends about 15 lines a second and the counts stay exact, at most `interval_s` late.
    """

    def __init__(
        self, cache: Any, model_name: str, spec: EnsembleSpec, *, interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        """`cache` is TorchServe's `context.metrics`; counters it does not declare, or declares with other labels, are
        skipped."""
        self._model_name = model_name
        self._members = [member.name for member in spec.members]
        self._labels = spec.labels
        self._single_label = spec.task != "multilabel"
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: Counts = zero_series(
            members=self._members, labels=spec.labels, policies=policy_names(), error_types=ERROR_TYPES
        )
        self._first = True
        self._flusher: threading.Thread | None = None
        self._metrics: dict[str, Any] = {}
        skipped = []
        for name, ours in COUNTERS.items():
            try:
                metric = cache.get_metric(name, MetricTypes.COUNTER)
            except MetricsCacheKeyError:
                skipped.append(name)
                continue
            if sorted(metric.dimension_names) != sorted(TORCHSERVE_DIMENSIONS + ours):
                skipped.append(
                    f"{name} (declared with {metric.dimension_names}, expected {list(TORCHSERVE_DIMENSIONS + ours)})"
                )
                continue
            self._metrics[name] = metric
        if skipped:
            logger.warning(
                "metrics not declared in TorchServe's metrics config, so not emitted: %s", ", ".join(skipped)
            )

    @property
    def emitted(self) -> list[str]:
        """The counters this worker emits."""
        return list(self._metrics)

    def record(self, answer: BatchAnswer) -> None:
        """Count one batch; the background thread emits it within `interval_s`."""
        counts = batch_counts(answer, members=self._members, labels=self._labels, single_label=self._single_label)
        with self._lock:
            self._pending.update(counts)
            if self._flusher is None and self._metrics:
                self._flusher = threading.Thread(target=self._flush_forever, name="ensemble-metrics", daemon=True)
                self._flusher.start()

    def flush(self) -> None:
        """Emit everything counted so far: one line per (counter, labels) with a count, the unlabelled
        counters even at zero, and in the first flush every labelled series at zero too."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            first, self._first = self._first, False
        for (name, values), amount in pending.items():
            metric = self._metrics.get(name)
            if metric is None or (amount == 0 and COUNTERS[name] and not first):
                continue
            labelled = {
                "ModelName": self._model_name,
                "Level": "Model",
                **dict(zip(COUNTERS[name], values, strict=True)),
            }
            metric.add_or_update(amount, [label_value(labelled[dimension]) for dimension in metric.dimension_names])

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                self.flush()
            except Exception:  # Counting must never stop because one emission failed.
                logger.exception("could not emit the ensemble's metrics")


def label_value(text: str) -> str:
    """TorchServe's metric line splits labels on `,` `:` `|`: a label name holding one becomes `_` there."""
    return _UNSAFE.sub("_", text)


_UNSAFE = re.compile(r"[,:|\n]")
