"""Tune every contender of `make bench` alike: one search, one rule, on images the benchmark never measures.

Usage: python -m bench.search [--seconds 3]   (`make bench-tune`; writes bench/results/bench_tuning.json)

For each workload, on its tuning images (bench/points.py: another seed than the measured ones, checked
disjoint), every served contender is started under each `Setup` of one grid and driven at the benchmark's
load points for `--seconds` each, every answer checked by the answers gate (bench/reference.py):

- units 1 or 2 (TorchServe workers, gunicorn workers, Ray replicas, Triton instances; members on 2 or 1
  threads each), each with no batching, and with batches of up to 8 requests gathered for up to 2 ms.
  Flask has no batcher: it is searched over units alone.
- Ours is searched first, on `auto`; the plans its best setup's workers chose are the plans every peer
  serves (bench/archived.py), so the peers are tuned on the members they will be measured with.
- The rule is `make tune`'s (bench/tune.py): a setup with any error or wrong answer is out; of the rest,
  those whose single-client p50 is within 1.5x the lowest are eligible, and the one with the highest
  geometric mean of images/s over the load points wins (ties: fewer units, then smaller batches).
- The ceiling is searched per load point over 1 and 2 processes sharing the point's images in flight,
  by images/s alone (it has no clients to keep waiting).

The eager variants (`make bench`'s second phase) keep their contender's setup: what is searched is the
server's configuration, and the engine is the variable that phase isolates.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.contenders import SERVED, CeilingPool, Setup, extracted_archive, served
from bench.loadgen import LoadPoint
from bench.points import BENCHES, POINTS, WARM, ceiling_closed, closed
from bench.reference import Gate, GateJudge, reference_answers

RESULTS = Path(__file__).parent / "results" / "bench_tuning.json"
SETUPS = (Setup(1), Setup(2), Setup(1, 8, 2), Setup(2, 8, 2))
SLACK = 0.5


def grid(contender: str) -> tuple[Setup, ...]:
    """The setups searched for `contender`: Flask has no batcher."""
    return tuple(s for s in SETUPS if contender != "flask" or s.max_batch == 1)


def pick(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The winning row by the rule in the module docstring, or None when every setup erred or answered wrong."""
    qualified = [row for row in rows if not row["problems"]]
    if not qualified:
        return None
    lowest = min(row["points"][POINTS[0].name]["p50_ms"] for row in qualified)
    eligible = [row for row in qualified if row["points"][POINTS[0].name]["p50_ms"] <= (1 + SLACK) * lowest]
    return max(
        eligible, key=lambda row: (row["geomean_images_per_s"], -row["setup"]["units"], -row["setup"]["max_batch"])
    )


def measure_setup(send: Any, judge: GateJudge, seconds: float) -> dict[str, Any]:
    """One setup at every load point, after a warm-up; its problems are its errors and the gate's findings."""
    closed(send, judge, WARM, 1.0)
    points: dict[str, LoadPoint] = {p.name: closed(send, judge, p, seconds) for p in POINTS}
    problems = list(judge.problems)
    problems += [f"{name}: {p.errors} errors" for name, p in points.items() if p.errors]
    return {
        "points": {name: p.to_json() for name, p in points.items()},
        "geomean_images_per_s": math.exp(
            sum(math.log(max(p.images_per_s, 1e-9)) for p in points.values()) / len(points)
        ),
        "problems": problems,
    }


def tune_workload(name: str, seconds: float) -> dict[str, Any]:
    bench = BENCHES[name]
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as folder:
        workload = bench.workload(Path(folder), tuning=True)
        measured = bench.workload(Path(folder) / "measured", tuning=False)
        if set(workload.images) & set(measured.images):
            raise SystemExit(f"{name}: tuning and measurement images overlap; choose another tuning seed")
        expected, gate = reference_answers(workload.spec, workload.images), Gate(workload.spec)
        found: dict[str, Any] = {"objective_ms": bench.objective_ms, "tune_seed": bench.tune_seed, "contenders": {}}
        with extracted_archive(workload.spec) as model_dir:
            plans: dict[str, str] = {}
            for contender in [c for c in SERVED if c != "ours_eager"]:
                rows = []
                for setup in grid(contender):
                    judge = GateJudge(gate, expected)
                    with served(contender, workload.spec, model_dir, plans or "auto", setup, workload.images, gate) as (
                        send,
                        chose,
                    ):
                        row = {"setup": setup.to_json(), "plans": chose, **measure_setup(send, judge, seconds)}
                    rows.append(row)
                    print(
                        f"  {name} / {contender} / {setup}: {row['geomean_images_per_s']:.1f} images/s (geomean), "
                        f"c1 p50 {row['points'][POINTS[0].name]['p50_ms']:.1f} ms, problems {len(row['problems'])}",
                        flush=True,
                    )
                best = pick(rows)
                found["contenders"][contender] = {"setup": best["setup"] if best else None, "rows": rows}
                if contender == "ours":
                    if best is None:
                        raise SystemExit(f"{name}: every setup of ours failed the gate: {rows[0]['problems']}")
                    plans = best["plans"]
            found["plans"] = plans
            found["contenders"]["ours_eager"] = {"setup": found["contenders"]["ours"]["setup"], "rows": []}
            found["ceiling"] = tune_ceiling(name, model_dir, plans, workload.images, expected, seconds)
    return found


def tune_ceiling(
    name: str, model_dir: Path, plans: dict[str, str], images: Any, expected: Any, seconds: float
) -> dict[str, Any]:
    """Per load point, the number of ceiling processes (1 or 2) that calls the members fastest."""
    chosen: dict[str, Any] = {}
    with ExitStack() as stack:
        pools = {}
        for processes in (1, 2):
            pools[processes] = CeilingPool(model_dir, plans, processes, images, expected)
            stack.callback(pools[processes].close)
        for point in POINTS:
            tried: dict[int, dict[str, Any]] = {}
            for processes, pool in pools.items():
                if processes <= point.in_flight:
                    measured, problems = ceiling_closed(pool, point, seconds)
                    tried[processes] = {
                        "images_per_s": measured.images_per_s,
                        "problems": problems + ([f"{measured.errors} errors"] if measured.errors else []),
                    }
                    print(
                        f"  {name} / ceiling / {point.name} / {processes} processes: "
                        f"{measured.images_per_s:.1f} images/s",
                        flush=True,
                    )
            fine = {p: row for p, row in tried.items() if not row["problems"]}
            chosen[point.name] = {
                "processes": max(fine, key=lambda p: fine[p]["images_per_s"]) if fine else None,
                "tried": tried,
            }
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load point and setup")
    parser.add_argument("--only", choices=sorted(BENCHES), help="one workload (the others' results are kept)")
    args = parser.parse_args()
    began = time.perf_counter()
    results = json.loads(RESULTS.read_text())["workloads"] if args.only and RESULTS.exists() else {}
    for name in [args.only] if args.only else list(BENCHES):
        print(f"{name}: searching {len(SETUPS)} setups per contender", flush=True)
        results[name] = tune_workload(name, args.seconds)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": "make bench-tune",
                "commit": commit,
                "seconds_per_point": args.seconds,
                "machine": platform.processor() or platform.machine(),
                "rule": "no errors or wrong answers; c1 p50 <= 1.5x the lowest; highest geometric mean of images/s",
                "seconds": round(time.perf_counter() - began, 1),
                "workloads": results,
            },
            indent=2,
        )
        + "\n"
    )
    for name, found in results.items():
        print(
            f"{name}: "
            + ", ".join(
                f"{c} {Setup(**v['setup']) if v['setup'] else 'none qualified'}" for c, v in found["contenders"].items()
            )
        )
    print(f"wrote {RESULTS} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
