"""The reliability suite's short mode against real TorchServe instances: bad inputs, faults, load.

One run of `bench.reliability` (about a minute and a half) feeds every test here, so each fault is
injected once and each test checks one promise against what was measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from bench.bad_inputs import BadInput, catalogue
from bench.reliability import CLIENT_TIMEOUT_S, EDGE_QUEUE, HANG_TIMEOUT_S, KILL_CLIENTS, MAX_IMAGES, main

pytestmark = pytest.mark.integration
CASES = catalogue(MAX_IMAGES)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("reliability") / "reliability.json"
    try:
        main(["--out", str(out)])
    except SystemExit:  # Failures are in the JSON too; the tests below say which.
        pass
    yield json.loads(out.read_text())


def test_report_carries_every_summary_field(report: dict[str, Any]) -> None:
    required = {"bad_inputs_tried", "bad_inputs_mishandled", "faults_injected", "requests_sent", "requests_lost",
                "unexpected_5xx", "max_recovery_s", "rss_growth_mb"}
    assert required <= set(report)
    assert (report["bad_inputs_tried"], report["faults_injected"]) == (len(CASES), 5)


def test_nothing_lost_and_no_unexpected_5xx(report: dict[str, Any]) -> None:
    assert report["requests_sent"] > 1000
    assert (report["requests_lost"], report["unexpected_5xx"], report["bad_inputs_mishandled"]) == (0, 0, 0)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_answered_as_catalogued(report: dict[str, Any], case: BadInput) -> None:
    [row] = [row for row in report["report"]["bad_inputs"] if row["case"] == case.name]
    assert row["ok"], row
    assert row["got"].startswith(str(case.status))


def test_good_requests_batched_with_bad_ones_are_answered_and_the_worker_stays(report: dict[str, Any]) -> None:
    good, worker = report["report"]["bad_inputs"][-2:]
    assert good["ok"] and good["got"] == f"{len(CASES)} x 200"
    assert worker["ok"] and worker["got"] == worker["expected"]


def test_no_cross_talk_between_64_clients(report: dict[str, Any]) -> None:
    section = report["report"]["cross_talk"]
    assert (section["inputs"], section["clients"]) == (1000, 64)
    assert section["matched"] == section["requests"]


def fault(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    [found] = [f for f in report["report"]["faults"] if f["fault"].startswith(prefix)]
    return found


def test_killed_worker_fails_only_its_in_flight_requests(report: dict[str, Any]) -> None:
    killed = fault(report, "worker SIGKILL")
    assert 1 <= killed["failed"] <= KILL_CLIENTS
    assert all(status.startswith("5") for status in killed["failed_statuses"])
    assert killed["failed_within_1s_of_kill"] and killed["new_pid"]
    assert killed["later_all_ok"] and killed["later_requests"] > 0
    assert 0 < killed["recovery_s"] < 10  # The restarted worker chooses its members' plans again, within this bound.


def test_hanging_member_fails_at_the_timeout_and_the_worker_is_replaced(report: dict[str, Any]) -> None:
    hung = fault(report, "member hangs")
    assert str(hung["status"]).startswith("5")
    assert HANG_TIMEOUT_S - 0.5 <= hung["failed_after_s"] <= HANG_TIMEOUT_S + 5
    assert hung["worker_replaced"] and hung["later_all_ok"]


def test_corrupted_archive_is_refused_and_the_previous_version_serves(report: dict[str, Any]) -> None:
    broken = fault(report, "corrupted .mar")
    assert broken["register_status"] == 500
    assert broken["log_names_member_and_digest"]
    assert broken["versions_after"] == ["1.0"]
    assert broken["previous_version_serves"]


def test_version_switch_under_traffic_loses_nothing(report: dict[str, Any]) -> None:
    switch = fault(report, "new version")
    assert (switch["register_status"], switch["set_default_status"], switch["failed"]) == (200, 200, 0)
    assert switch["answered_by"] == ["1.0", "3.0"]
    assert switch["after_switch_all_new"]


def test_expired_and_missing_tokens_are_refused_until_refreshed(report: dict[str, Any]) -> None:
    token = fault(report, "expired and missing token")
    assert (token["expired_status"], token["missing_status"], token["refresh_status"], token["after_refresh_status"]) == (400, 400, 200, 200)


def test_overload_answers_only_200_or_503_and_recovers(report: dict[str, Any]) -> None:
    section = report["report"]["overload"]
    assert section["queue"] == EDGE_QUEUE
    assert section["only_200_or_503"] and section["statuses"].get("503", 0) > 0
    assert section["slowest_s"] < CLIENT_TIMEOUT_S
    assert section["after_load_all_ok"] and section["after_load_s"] < 5


def test_short_soak_is_clean(report: dict[str, Any]) -> None:
    section = report["report"]["soak"]
    assert section["requests"] > 100 and section["non_2xx"] == 0
    assert section["rss_growth_mb"] < 50
