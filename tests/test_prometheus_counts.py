"""A known mix of requests to a real TorchServe, scraped by a real Prometheus, counted exactly through its query API.

TorchServe runs the shipped config.properties (so the shipped metrics config) on shifted loopback
ports with the real token; Prometheus runs from `.tools/` on a free loopback port, scraping it every
second. Every wait is bounded.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import requests

from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from archive_scripts.waiting import wait_for
from monitoring import prometheus_ctl
from monitoring.prometheus_ctl import Prometheus, query, write_test_config
from tests.conftest import image_bytes
from tests.fixture_reference import member_probabilities
from tests.protocol_clients import v2_body

pytestmark = pytest.mark.integration
TIMEOUT = 60
WAIT_S = 45
MEMBERS = ("mobile", "pool_rgb", "pool_gray")
LABELS = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def server(test_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = private_server(tmp_path_factory.mktemp("torchserve"), test_store, port_offset=10700)
    try:
        start(instance, test_store)
        register(instance, "trio", workers=1)
        yield instance
    finally:
        stop(instance)


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{probe.getsockname()[1]}"
    target = server.setting("metrics_address").removeprefix("http://")
    instance = prometheus_ctl.start(
        write_test_config(folder / "prometheus.yml", target=target), folder / "data", listen
    )
    try:
        yield instance
    finally:
        prometheus_ctl.stop(instance)


def values(prometheus: Prometheus, promql: str) -> dict[str, float]:
    """An instant query's result as {the one label's value (or ""): number}."""
    out = {}
    for series in query(prometheus.url, promql):
        labels = [v for k, v in series["metric"].items() if k != "__name__"]
        out[labels[0] if labels else ""] = float(series["value"][1])
    return out


def test_prometheus_counts_a_known_mix_exactly(server: Server, prometheus: Prometheus, test_store: Path) -> None:
    url = f"{server.inference}/predictions/trio"
    auth = server.headers("inference")
    singles = [image_bytes(s) for s in (21, 22, 23)]
    multipart = [image_bytes(s) for s in (24, 25, 26, 27)]
    v2_images = [image_bytes(s) for s in (28, 29)]
    sent: list[tuple[int, dict[str, Any]]] = [
        *[(200, {"data": d, "headers": {"Content-Type": "image/png"}}) for d in singles],
        (200, {"files": [(f"p{i}", d) for i, d in enumerate(multipart)], "headers": {"X-Ensemble-Policy": "majority"}}),
        (
            200,
            {
                "data": json.dumps(v2_body(v2_images, parameters={"policy": "max"})),
                "headers": {"Content-Type": "application/json"},
            },
        ),
        (400, {"data": b"GIF89a-not-really", "headers": {"Content-Type": "image/gif"}}),
        (400, {"data": b"\x89PNG\r\n\x1a\n-truncated", "headers": {"Content-Type": "image/png"}}),
        (400, {"data": singles[0], "headers": {"Content-Type": "image/png", "X-Ensemble-Policy": "vote"}}),
        (415, {"data": b"hello", "headers": {"Content-Type": "text/plain"}}),
    ]
    for status, request in sent:  # One at a time: the counts do not depend on how TorchServe batches.
        headers = {**auth, **request.pop("headers")}
        assert requests.post(url, headers=headers, timeout=TIMEOUT, **request).status_code == status

    images = singles + multipart + v2_images
    probs = member_probabilities(test_store, "trio", images)
    votes = numpy.stack([probs[m].argmax(axis=-1) for m in MEMBERS])  # votes[member, image]: each member's argmax
    wait_for(
        lambda: values(prometheus, 'sum(ensemble_images_total{ModelName="trio"})') == {"": 9.0},
        "9 images counted",
        WAIT_S,
    )
    assert values(prometheus, 'sum by (Policy) (ensemble_requests_total{ModelName="trio"}) > 0') == {
        "mean": 3,
        "majority": 1,
        "max": 1,
    }
    assert values(prometheus, 'sum by (ErrorType) (ensemble_errors_total{ModelName="trio"}) > 0') == {
        "InvalidImage": 2,
        "InvalidPolicy": 1,
        "UnsupportedMediaType": 1,
    }
    assert values(prometheus, 'sum by (Member) (ensemble_member_images_total{ModelName="trio"})') == {
        m: 9 for m in MEMBERS
    }
    assert values(prometheus, 'sum(ensemble_disagreements_total{ModelName="trio"})') == {
        "": int((votes != votes[:1]).any(axis=0).sum())
    }
    assert values(prometheus, 'sum(ensemble_abstentions_total{ModelName="trio"})') == {"": 0}
    assert values(prometheus, 'sum(ensemble_batch_images_total{ModelName="trio"})') == {"": 9}
    assert values(prometheus, 'sum(ensemble_batches_total{ModelName="trio"})') == {"": len(sent)}
    for m, member in enumerate(MEMBERS):
        expected = {label: int((votes[m] == i).sum()) for i, label in enumerate(LABELS)}
        promql = f'sum by (Label) (ensemble_member_positive_total{{ModelName="trio", Member="{member}"}})'
        assert values(prometheus, promql) == expected
    seconds = values(prometheus, 'sum by (Member) (ensemble_member_forward_seconds_total{ModelName="trio"})')
    assert sorted(seconds) == sorted(MEMBERS) and all(0 < s < 60 for s in seconds.values())
