"""bench.tune without a server: the candidate grid, the pick, and the --write edit of ensembles.yaml."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bench.tune import (
    Candidate,
    MemberCost,
    Row,
    candidate_grid,
    markdown,
    noise,
    pick,
    update_batching,
    write_batching,
)
from handlers.config.files import load_ensembles

C1, C8, C2X16 = "c1 x1 image", "c8 x1 image", "c2 x16 images"

# Shaped like the demo `shapes` (members cost about what TorchServe's round trip does) and like the
# torchvision trio (members cost ten times the per-request work and two member threads scale almost fully).
TINY = MemberCost(
    2,
    members_ms_b1=4.5,
    members_ms_b1_one_thread=6.5,
    per_image_ms_b8=1.8,
    per_image_ms_b8_one_thread=2.9,
    request_ms=0.8,
    transport_ms=2.2,
)
BIG = MemberCost(
    2,
    members_ms_b1=35.0,
    members_ms_b1_one_thread=60.0,
    per_image_ms_b8=24.0,
    per_image_ms_b8_one_thread=55.0,
    request_ms=3.0,
    transport_ms=2.3,
)
SINGLE_CORE = MemberCost(
    1,
    members_ms_b1=10.0,
    members_ms_b1_one_thread=10.0,
    per_image_ms_b8=8.0,
    per_image_ms_b8_one_thread=8.0,
    request_ms=1.0,
    transport_ms=2.0,
)


def c(workers: int, batch: int, delay: int) -> Candidate:
    return Candidate(workers, batch, delay)


@pytest.mark.parametrize(
    ("cost", "c1_ms", "expected"),
    [
        # 2 workers: 2000 / (3.0 + 2.9) = 339 against 1000 / (3.0 + 1.8) = 208 images/s; delays <= 0.5 x 10 ms.
        (TINY, 10.0, [c(1, 1, 0), c(1, 8, 1), c(1, 8, 2), c(1, 8, 5), c(2, 1, 0), c(2, 4, 1), c(2, 4, 2), c(2, 4, 5)]),
        # No measured c1: the estimate 3.0 + 4.5 = 7.5 ms allows delays <= 3.75 ms.
        (TINY, None, [c(1, 1, 0), c(1, 8, 1), c(1, 8, 2), c(2, 1, 0), c(2, 4, 1), c(2, 4, 2)]),
        # A c1 so short that no delay fits: the shortest is kept all the same.
        (TINY, 1.5, [c(1, 1, 0), c(1, 8, 1), c(2, 1, 0), c(2, 4, 1)]),
        # 2 workers: 2000 / (5.3 + 55) = 33.2 < 1000 / (5.3 + 24) = 34.1 images/s, not swept; every delay fits 45 ms.
        (BIG, 45.0, [c(1, 1, 0), c(1, 8, 1), c(1, 8, 2), c(1, 8, 5)]),
        # Better per-worker scaling (50 ms on one thread): 2000 / 55.3 = 36.2 > 34.1, swept.
        (
            MemberCost(**{**BIG.__dict__, "per_image_ms_b8_one_thread": 50.0}),
            45.0,
            [c(1, 1, 0), c(1, 8, 1), c(1, 8, 2), c(1, 8, 5), c(2, 1, 0), c(2, 4, 1), c(2, 4, 2), c(2, 4, 5)],
        ),
        (SINGLE_CORE, 30.0, [c(1, 1, 0), c(1, 8, 1), c(1, 8, 2), c(1, 8, 5)]),
    ],
    ids=[
        "tiny-members",
        "tiny-members-estimated-c1",
        "tiny-members-short-c1",
        "big-members",
        "big-members-scaling-threads",
        "one-core",
    ],
)
def test_candidate_grid(cost: MemberCost, c1_ms: float | None, expected: list[Candidate]) -> None:
    grid = candidate_grid(cost, clients=8, c1_ms=c1_ms)
    assert list(grid.candidates) == expected
    assert grid.notes


def test_grid_notes_say_why() -> None:
    notes = candidate_grid(BIG, clients=8, c1_ms=45.0).notes
    assert notes[0] == "2 workers not swept: estimated 33 against 34 images/s for single images at saturation"
    assert notes[1] == "delays 1, 2, 5 ms: at most 50% of c1 45.0 ms (measured), the shortest always"


def row(
    candidate: Candidate,
    c1_p50: float,
    rates: tuple[float, float, float],
    *,
    errors: int = 0,
    mismatches: int = 0,
    answered: int = 100,
    failure: str | None = None,
) -> Row:
    points = {
        name: {
            "images_per_s": rate,
            "requests_per_s": rate,
            "p50_ms": c1_p50 if name == C1 else 40.0,
            "p99_ms": 60.0,
            "errors": errors if name == C8 else 0,
            "mismatches": mismatches if name == C8 else 0,
            "requests": answered,
        }
        for name, rate in zip((C1, C8, C2X16), rates, strict=True)
    }
    return Row(candidate, {} if failure else points, {C1: 100, C8: 100, C2X16: 100}, failure)


ONE = c(1, 8, 2)
TWO = c(2, 4, 1)
REF = c(1, 1, 0)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # Geometric means: 179.3 against 187.7; 14 ms is within 1.5 x 12 ms.
        ([row(ONE, 12.0, (80, 160, 450)), row(TWO, 14.0, (70, 220, 430))], TWO),
        # The same with 19 ms: over the 18 ms bound, whatever its throughput.
        ([row(ONE, 12.0, (80, 160, 450)), row(TWO, 19.0, (70, 220, 430))], ONE),
        # Exactly on the bound is eligible.
        ([row(ONE, 12.0, (80, 160, 450)), row(TWO, 18.0, (70, 220, 430))], TWO),
        # One error anywhere disqualifies, and a disqualified row's c1 does not set the bound.
        (
            [row(REF, 8.0, (125, 300, 500), errors=1), row(ONE, 12.0, (80, 160, 450)), row(TWO, 14.0, (70, 220, 430))],
            TWO,
        ),
        ([row(REF, 8.0, (125, 300, 500), mismatches=2), row(ONE, 12.0, (80, 160, 450))], ONE),
        # Unanswered requests (a point's deadline) and failed builds disqualify.
        ([row(TWO, 12.0, (90, 300, 500), answered=99), row(ONE, 12.0, (80, 160, 450))], ONE),
        (
            [row(TWO, 12.0, (90, 300, 500), failure="build or register failed: boom"), row(ONE, 12.0, (80, 160, 450))],
            ONE,
        ),
        # A qualified row with the best c1 tightens the bound for the rest: 10 ms x 1.5 = 15 < 16 ms.
        ([row(REF, 10.0, (100, 120, 400)), row(ONE, 12.0, (80, 160, 450)), row(TWO, 16.0, (70, 220, 430))], ONE),
        # Equal geometric means: lower c1 p50, then fewer workers, smaller batch, shorter delay.
        ([row(TWO, 11.0, (80, 160, 450)), row(ONE, 12.0, (80, 160, 450))], TWO),
        ([row(TWO, 12.0, (80, 160, 450)), row(c(1, 8, 5), 12.0, (80, 160, 450)), row(ONE, 12.0, (80, 160, 450))], ONE),
        # Nothing qualifies: no recommendation.
        ([row(ONE, 12.0, (80, 160, 450), errors=3), row(TWO, 12.0, (80, 160, 450), failure="x")], None),
    ],
    ids=[
        "throughput-within-bound",
        "latency-over-bound",
        "latency-on-bound",
        "error-disqualifies",
        "mismatch-disqualifies",
        "unanswered-disqualifies",
        "failed-build-disqualifies",
        "best-c1-sets-bound",
        "tie-lower-c1",
        "tie-fewer-workers-then-shorter-delay",
        "nothing-qualifies",
    ],
)
def test_pick(rows: list[Row], expected: Candidate | None) -> None:
    result = pick(rows, C1, current=None)
    assert (result.recommended.candidate if result.recommended else None) == expected
    assert set(result.verdicts) == {r.candidate for r in rows}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # The best (187.7) beats the current (179.3) by 1.05x only: the current stays.
        ([row(ONE, 12.0, (80, 160, 450)), row(TWO, 14.0, (70, 220, 430))], ONE),
        # 206.0 against 179.3 is 1.15x: replaced.
        ([row(ONE, 12.0, (80, 160, 450)), row(TWO, 14.0, (70, 260, 480))], TWO),
        # Either side of 1.10x.
        ([row(ONE, 12.0, (100, 100, 100)), row(TWO, 12.0, (111, 111, 111))], TWO),
        ([row(ONE, 12.0, (100, 100, 100)), row(TWO, 12.0, (109, 109, 109))], ONE),
        # A current that is not eligible, or disqualified, is never kept.
        ([row(ONE, 19.0, (80, 160, 450)), row(TWO, 12.0, (70, 220, 430))], TWO),
        ([row(ONE, 12.0, (80, 160, 450), errors=1), row(TWO, 14.0, (70, 200, 430))], TWO),
        # A current that is the best is recommended as it is.
        ([row(ONE, 12.0, (90, 230, 450)), row(TWO, 14.0, (70, 220, 430))], ONE),
    ],
    ids=[
        "kept-within-margin",
        "replaced-beyond-margin",
        "replaced-just-over-margin",
        "kept-just-under-margin",
        "current-over-latency-bound",
        "current-disqualified",
        "current-is-best",
    ],
)
def test_pick_keeps_the_current_within_the_margin(rows: list[Row], expected: Candidate) -> None:
    result = pick(rows, C1, current=ONE)
    assert result.recommended is not None and result.recommended.candidate == expected


def test_noise_widens_the_margin() -> None:
    rows = [row(ONE, 12.0, (80, 160, 450)), row(TWO, 14.0, (70, 260, 480))]  # 1.15x
    narrow = pick(rows, C1, current=ONE, noise=0.05)
    assert narrow.recommended is not None and narrow.recommended.candidate == TWO
    wide = pick(rows, C1, current=ONE, noise=0.20)
    assert wide.recommended is not None and wide.recommended.candidate == ONE and wide.margin == 0.20
    assert wide.verdicts[TWO] == "best, 1.15x: under the 1.20x that replaces the current"


@pytest.mark.parametrize(
    ("first", "again", "expected"),
    [
        (row(ONE, 12.0, (100, 100, 100)), row(ONE, 12.0, (120, 120, 120)), 0.20),
        (row(ONE, 12.0, (120, 120, 120)), row(ONE, 12.0, (100, 100, 100)), 0.20),
        (row(ONE, 12.0, (100, 100, 100)), None, 0.0),
        (row(ONE, 12.0, (100, 100, 100)), row(ONE, 12.0, (120, 120, 120), errors=1), 0.0),
    ],
    ids=["faster-again", "slower-again", "not-repeated", "repeat-failed"],
)
def test_noise(first: Row, again: Row | None, expected: float) -> None:
    assert noise(first, again) == pytest.approx(expected)


def test_kept_current_verdicts() -> None:
    result = pick(
        [row(ONE, 12.0, (80, 160, 450)), row(TWO, 14.0, (70, 220, 430)), row(REF, 13.0, (60, 100, 300))],
        C1,
        current=ONE,
    )
    assert result.verdicts == {
        ONE: "**recommended**",
        TWO: "best, 1.05x: under the 1.10x that replaces the current",
        REF: "eligible, 0.68x",
    }


def test_a_point_that_served_nothing() -> None:
    empty = row(TWO, 12.0, (80, 0, 450), errors=100)
    assert empty.geomean() == 0.0
    result = pick([empty, row(ONE, 12.0, (80, 160, 450))], C1, current=TWO)
    assert result.recommended is not None and result.recommended.candidate == ONE
    assert "| 2 | 4 | 1 ms | 80.0 | 12.0 | 0.0 | 40.0 | 450.0 | 40.0 | 0.0 |  | 100, 0 | disqualified" in markdown(
        [empty], result, TWO
    )


def test_pick_verdicts_and_table() -> None:
    rows = [row(REF, 8.0, (125, 300, 500), errors=1), row(ONE, 12.0, (80, 160, 450)), row(TWO, 19.0, (70, 220, 430))]
    result = pick(rows, C1, current=ONE)
    assert result.best_c1_ms == 12.0
    assert result.verdicts == {
        REF: "disqualified: c8 x1 image: 1 errors, 0 mismatches",
        ONE: "**recommended**",
        TWO: "c1 p50 19.0 > 18.0 ms",
    }
    again = row(ONE, 12.0, (88, 176, 495))
    table = markdown(rows, result, current=ONE, repeat=again).splitlines()
    assert len(table) == 2 + len(rows) + 1
    assert table[-1].endswith("| 0, 0 | current, measured again: 1.10x the first |")
    assert table[3].startswith(
        "| 1 | 8 | 2 ms | 80.0 | 12.0 | 160.0 | 40.0 | 450.0 | 40.0 | 179.3 | 1.00x | 0, 0 | **recommended** "
        "(current) |"
    )


ENSEMBLES = """\
# Top comment: kept as it is.
ensembles:
  small:
    version: "1.0"   # quoted on purpose
    task: binary
    labels: [absent, present]
    positive_label: present
    input:
      size: [32, 32]
    batching:
      # how TorchServe batches
      batch_size: 8
      max_batch_delay_ms: 2   # ms
      micro_batch_size: 32
      workers: 1
    members:
      - name: a
        arch: torchvision:resnet18
        kwargs: {num_classes: 2}
        weights: a.pt
  bare:
    # no batching block yet
    version: "2.0"
    task: multiclass
    labels: [x, y, z]
    input: {size: [16, 16], color_mode: L}
    members:
      - name: b
        arch: torchvision:squeezenet1_1
        kwargs:
          num_classes: 3
        weights: b.pt   # trailing comment
"""


@pytest.fixture
def ensembles_file(tmp_path: Path) -> Path:
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    path = tmp_path / "ensembles.yaml"
    path.write_text(ENSEMBLES)
    path.chmod(0o640)
    return path


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


def test_update_batching_replaces_only_the_values() -> None:
    updated = update_batching(ENSEMBLES, "small", {"workers": 2, "batch_size": 4, "max_batch_delay_ms": 5})
    assert changed_lines(ENSEMBLES, updated) == [
        ("      batch_size: 8", "      batch_size: 4"),
        ("      max_batch_delay_ms: 2   # ms", "      max_batch_delay_ms: 5   # ms"),
        ("      workers: 1", "      workers: 2"),
    ]
    assert update_batching(ENSEMBLES, "small", {"workers": 1, "batch_size": 8, "max_batch_delay_ms": 2}) == ENSEMBLES


def test_update_batching_adds_a_block_before_members() -> None:
    updated = update_batching(ENSEMBLES, "bare", {"workers": 2, "batch_size": 4, "max_batch_delay_ms": 1})
    block = "    batching:\n      workers: 2\n      batch_size: 4\n      max_batch_delay_ms: 1\n"
    assert updated == ENSEMBLES.replace(
        "    input: {size: [16, 16], color_mode: L}\n", "    input: {size: [16, 16], color_mode: L}\n" + block
    )


def test_update_batching_refuses_to_reformat() -> None:
    spaced = ENSEMBLES.replace("    task: binary", "    task:    binary")
    with pytest.raises(ValueError, match="would change other lines"):
        update_batching(spaced, "small", {"workers": 2, "batch_size": 4, "max_batch_delay_ms": 5})
    with pytest.raises(ValueError, match="no ensemble 'missing'"):
        update_batching(ENSEMBLES, "missing", {"workers": 2, "batch_size": 4, "max_batch_delay_ms": 5})


def test_write_batching_on_a_copy(ensembles_file: Path) -> None:
    before = load_ensembles(ensembles_file)
    diff = write_batching(ensembles_file, "small", {"workers": 2, "batch_size": 4, "max_batch_delay_ms": 5})
    text = ensembles_file.read_text()
    assert [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")] == [
        "-      batch_size: 8",
        "-      max_batch_delay_ms: 2   # ms",
        "+      batch_size: 4",
        "+      max_batch_delay_ms: 5   # ms",
        "-      workers: 1",
        "+      workers: 2",
    ]
    assert "# Top comment: kept as it is." in text and '"1.0"   # quoted on purpose' in text
    after = load_ensembles(ensembles_file)
    assert (
        after["small"].batching.workers,
        after["small"].batching.batch_size,
        after["small"].batching.max_batch_delay_ms,
    ) == (2, 4, 5)
    assert after["small"].batching.micro_batch_size == before["small"].batching.micro_batch_size
    assert after["bare"] == before["bare"]
    assert stat.S_IMODE(ensembles_file.stat().st_mode) == 0o640
    assert sorted(p.name for p in ensembles_file.parent.iterdir()) == ["a.pt", "b.pt", "ensembles.yaml"]


def test_write_batching_leaves_the_file_when_refused(ensembles_file: Path) -> None:
    spaced = ENSEMBLES.replace("    task: binary", "    task:    binary")
    ensembles_file.write_text(spaced)
    with pytest.raises(ValueError):
        write_batching(ensembles_file, "small", {"workers": 2, "batch_size": 4, "max_batch_delay_ms": 5})
    assert ensembles_file.read_text() == spaced
