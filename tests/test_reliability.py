"""The reliability suite's short mode against real TorchServe instances: bad inputs, faults, load.

One run of `bench.reliability.measure` (about a minute and a half) feeds every test here, so each fault is
injected once. Each test checks one promise against the raw measurements (statuses, counts, seconds, pids)
and bounds stated here, not against the verdicts the harness prints.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.bad_inputs import BadInput, catalogue
from bench.reliability import CLIENT_TIMEOUT_S, EDGE_QUEUE, HANG_TIMEOUT_S, KILL_CLIENTS, MAX_IMAGES, QUICK, measure

pytestmark = pytest.mark.integration
CASES = catalogue(MAX_IMAGES)
FAULTS = ["worker SIGKILL", "member hangs", "corrupted .mar", "new version", "expired and missing token"]
KILL_RECOVERY_S = 10  # The restarted worker chooses its members' plans again, within this bound.


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """The short mode's measurements (it raises, and fails every test here, only if it could not measure)."""
    return measure(QUICK)


def fault(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    [found] = [f for f in report["faults"] if f["fault"].startswith(prefix)]
    return found


def test_every_section_ran(report: dict[str, Any]) -> None:
    assert [row["case"] for row in report["bad_inputs"][: len(CASES)]] == [case.name for case in CASES]
    assert [f["fault"].startswith(prefix) for f, prefix in zip(report["faults"], FAULTS, strict=True)] == [True] * len(
        FAULTS
    )


def test_every_request_sent_was_answered_and_none_lost(report: dict[str, Any]) -> None:
    summary = report["summary"]
    assert summary["requests_sent"] > 1000
    assert summary["requests_lost"] == 0
    assert summary["requests_answered"] == summary["requests_sent"] == sum(summary["statuses"].values())
    assert summary["unexpected_5xx"] == 0  # 5xx outside the kill, hang and overload windows


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_answered_as_catalogued(report: dict[str, Any], case: BadInput) -> None:
    [row] = [row for row in report["bad_inputs"] if row["case"] == case.name]
    assert row["status"] == case.status, row
    if case.status == 200:  # "200" alone: the harness found the predictions of the image it must read as (`same_as`)
        assert row["got"] == "200", row
    elif case.json_error and case.type is not None:
        assert row["type"] == case.type, row


def test_good_requests_batched_with_bad_ones_are_answered_and_the_worker_stays(report: dict[str, Any]) -> None:
    good, worker = report["bad_inputs"][-2:]
    assert good["statuses"] == [200] * len(CASES)
    assert worker["pid_after"] == worker["pid_before"]


def test_no_cross_talk_between_64_clients(report: dict[str, Any]) -> None:
    section = report["cross_talk"]
    assert (section["inputs"], section["clients"]) == (1000, 64)
    assert section["matched"] == section["requests"]


def test_killed_worker_fails_only_its_in_flight_requests(report: dict[str, Any]) -> None:
    killed = fault(report, "worker SIGKILL")
    assert 1 <= killed["failed"] <= KILL_CLIENTS  # at most one request in flight per client
    assert all(status.startswith("5") for status in killed["failed_statuses"])
    assert all(abs(seconds) <= 1.0 for seconds in killed["failed_ended_s_after_kill"]), killed
    assert killed["pid_after"] != killed["pid_before"]
    assert killed["later_requests"] > 0 and killed["later_statuses"] == ["200"]
    assert 0 < killed["recovery_s"] < KILL_RECOVERY_S


def test_hanging_member_fails_at_the_timeout_and_the_worker_is_replaced(report: dict[str, Any]) -> None:
    hung = fault(report, "member hangs")
    assert str(hung["status"]).startswith("5")
    assert HANG_TIMEOUT_S - 0.5 <= hung["failed_after_s"] <= HANG_TIMEOUT_S + 5
    assert hung["pid_after"] != hung["pid_before"]
    assert hung["later_statuses"] == [200] * 5


def test_corrupted_archive_is_refused_and_the_previous_version_serves(report: dict[str, Any]) -> None:
    broken = fault(report, "corrupted .mar")
    assert broken["register_status"] == 500
    assert broken["log_names_member_and_digest"]
    assert broken["versions_after"] == ["1.0"]
    assert (broken["served_status"], broken["served_version"]) == (200, "1.0")


def test_version_switch_under_traffic_loses_nothing(report: dict[str, Any]) -> None:
    switch = fault(report, "new version")
    assert (switch["register_status"], switch["set_default_status"], switch["failed"]) == (200, 200, 0)
    assert switch["answered_by"] == ["1.0", "3.0"]
    assert switch["answered_by_after_switch"] == ["3.0"]


def test_expired_and_missing_tokens_are_refused_until_refreshed(report: dict[str, Any]) -> None:
    token = fault(report, "expired and missing token")
    assert (
        token["expired_status"],
        token["missing_status"],
        token["refresh_status"],
        token["after_refresh_status"],
    ) == (400, 400, 200, 200)


def test_overload_answers_only_200_or_503_and_recovers(report: dict[str, Any]) -> None:
    section = report["overload"]
    assert section["queue"] == EDGE_QUEUE
    assert set(section["statuses"]) <= {"200", "503"} and section["statuses"].get("503", 0) > 0, section["statuses"]
    assert section["slowest_s"] < CLIENT_TIMEOUT_S
    assert section["after_load_statuses"] == [200] * 10 and section["after_load_s"] < 5


def test_short_soak_is_clean(report: dict[str, Any]) -> None:
    section = report["soak"]
    assert section["requests"] > 100 and section["non_2xx"] == 0
    assert section["rss_growth_mb"] < 50
