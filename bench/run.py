"""Side by side, like for like: ours against every other way of serving the same members, tuned alike.

Usage: python -m bench.run [--quick] [--variants engine,eager]   (`make bench`, `make bench-quick`, `make bench-eager`)

Per workload (bench/points.py), after `make bench-tune` has chosen each contender's setup (bench/search.py):

1. Like for like. Every contender loads the same archive (bench/archived.py). In the *engine* phase ours
   serves on `auto`, and every peer serves each member on the plan ours' workers chose (`describe`): the
   same ONNX Runtime / OpenVINO files, one intra-op thread, members side by side. `ours_eager` (ours with
   every member eager) runs beside them: ours against it is the engines' gain, reported on its own. In the
   *eager* phase every contender serves every member eager: the servers compared on plain PyTorch.
2. Closed loop, alternating rounds. At each load point every contender is measured for `seconds` per
   round, the order rotated by one each round (quick: 3 rounds x 5 s; full: 5 x 20 s). A ratio is the
   median of per-round ratios of ours over the peer with SciPy's 95% bootstrap interval, judged against
   1.0 by its bounds (bench/intervals.py). A point with any error or wrong answer is `invalid`.
3. Answers gate. Every answer is checked against an in-process reference that shares none of our decode,
   transform or render code (bench/reference.py): each member's label and score, the combined label and score.
4. Concurrency curve and open loop. Each served contender at 1 to 32 closed-loop clients of one image;
   then Poisson arrivals from 10% to 120% of its best closed-loop rate (bench/loadgen.py `open_loop`,
   latency from the scheduled arrival), and its throughput at p99 <= the workload's objective.
5. The ceiling: the members called in-process on batches (no HTTP), with the processes the search chose per
   point, measured in the same rounds; it is called a ceiling at a point only when no served contender beat it.

`make bench` and `make bench-quick` run the engine phase, `make bench-eager` the eager phase. Writes
bench/results/bench.json (bench-quick.json, bench-eager.json) with the machine, versions, commit and command,
and, from a full engine phase, the picture docs/bench_open_loop.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.contenders import CORES, TRITON_PYTHON, CeilingPool, Setup, extracted_archive, served
from bench.intervals import ratio_interval
from bench.loadgen import LoadPoint, open_loop, requests_for, rotated
from bench.points import BENCHES, CURVE_CLIENTS, IMAGES, POINTS, WARM, Point, ceiling_closed, closed
from bench.reference import Gate, GateJudge, reference_answers
from bench.search import RESULTS as TUNING

RESULTS = Path(__file__).parent / "results"
PICTURE = Path(__file__).parent.parent / "docs" / "bench_open_loop.png"
TARGET = 1.0
MODES = {
    # rounds, seconds per round, seconds per curve level, seconds per offered rate, offered rates (x closed-loop max)
    "quick": (3, 5.0, 1.5, 3.0, (0.1, 0.5, 0.8, 1.0, 1.2)),
    "full": (5, 20.0, 4.0, 8.0, (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.2)),
}
PEERS = ("fanout", "flask", "pytriton", "ray")
NAMES = {
    "ours": "ours: the ensemble .mar on TorchServe 0.12 (ensemble handler)",
    "ours_eager": "ours with every member eager",
    "fanout": "TorchServe fan-out: one .mar per member, the client combines",
    "flask": "Flask 3.1 app on gunicorn (FlexServe-style), no batching",
    "pytriton": "Triton's frontend and dynamic batcher via PyTriton 0.7 (Python backend calling our member code)",
    "ray": "Ray Serve 2.60 with @serve.batch",
    "ceiling": "in-process ceiling: images decoded and the members called on batches, no HTTP",
}
Measure = Callable[[Point, float], tuple[LoadPoint, list[str]]]


def run_phase(name: str, variant: str, mode: str, folder: Path, tuning: Mapping[str, Any]) -> dict[str, Any]:
    """One workload under one variant: every contender up at once, then rounds, curve and open loop."""
    rounds, seconds, curve_s, open_s, fractions = MODES[mode]
    bench = BENCHES[name]
    workload = bench.workload(folder, tuning=False)
    expected, gate = reference_answers(workload.spec, workload.images), Gate(workload.spec)
    setups = {c: Setup(**found["setup"]) if found["setup"] else Setup(1) for c, found in tuning["contenders"].items()}
    first = "ours" if variant == "engine" else "ours_eager"
    print(f"{name} / {variant}: starting contenders", flush=True)
    with ExitStack() as stack:
        model_dir = stack.enter_context(extracted_archive(workload.spec))
        sends, judges = {}, {}
        plans: dict[str, dict[str, str]] = {}
        order = [first, *(["ours_eager"] if variant == "engine" else []), *PEERS]
        for contender in order:
            wanted = (
                "eager"
                if variant == "eager" or contender == "ours_eager"
                else "auto"
                if contender == "ours"
                else plans["ours"]
            )
            judges[contender] = GateJudge(gate, expected)
            sends[contender], plans[contender] = stack.enter_context(
                served(contender, workload.spec, model_dir, wanted, setups[contender], workload.images, gate)
            )
            closed(sends[contender], judges[contender], WARM, 2.0)
            print(f"  {contender} up ({setups[contender]}; plans {plans[contender]})", flush=True)
        processes = {p.name: (tuning["ceiling"][p.name]["processes"] or 1) for p in POINTS}
        pools = {}
        for count in sorted(set(processes.values())):
            pools[count] = CeilingPool(model_dir, plans[first], count, workload.images, expected)
            stack.callback(pools[count].close)
        measures: dict[str, Measure] = {c: _served_measure(sends[c], judges[c]) for c in sends}
        measures["ceiling"] = lambda point, s: ceiling_closed(pools[processes[point.name]], point, s)
        points = {point.name: _rounds(name, variant, point, measures, rounds, seconds) for point in POINTS}
        curve = _curve(name, variant, sends, judges, curve_s)
        opened = _open(name, variant, sends, judges, curve, fractions, open_s)
    return {
        "objective_ms": bench.objective_ms,
        "setups": {c: str(s) for c, s in setups.items() if c in sends},
        "setups_searched": {c: s.to_json() for c, s in setups.items() if c in sends},
        "ceiling_processes": processes,
        "plans": plans,
        "tuned_plans": tuning.get("plans"),
        "points": {p: summarize(first, by) for p, by in points.items()},
        "curve": curve,
        "open_loop": summarize_open(first, opened, bench.objective_ms),
    }


def _served_measure(send: Any, judge: GateJudge) -> Measure:
    return lambda point, s: (closed(send, judge, point, s), list(judge.problems))


def _rounds(
    name: str, variant: str, point: Point, measures: Mapping[str, Measure], rounds: int, seconds: float
) -> dict[str, list[dict[str, Any]]]:
    """Every contender once per round, the order rotated by one each round."""
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in measures}
    names = list(measures)
    for r in range(rounds):
        for contender in rotated(names, r):
            measured, problems = measures[contender](point, seconds)
            found[contender].append({**measured.to_json(), "problems": problems})
            print(
                f"  {name} / {variant} / {point.name} / round {r + 1} / {contender}: "
                f"{measured.images_per_s:.1f} images/s, "
                f"p99 {measured.p99_ms:.1f} ms, errors {measured.errors}, wrong {measured.mismatches}",
                flush=True,
            )
    return found


def summarize(first: str, by: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per contender: its rounds, median latency percentiles, validity; for the others, ours over it, per round."""
    rows: dict[str, Any] = {}
    for contender, measured in by.items():
        errors, wrong = sum(r["errors"] for r in measured), sum(r["mismatches"] for r in measured)
        rows[contender] = {
            "images_per_s": round(statistics.median(r["images_per_s"] for r in measured), 2),
            "images_per_s_per_round": [round(r["images_per_s"], 2) for r in measured],
            **{key: round(statistics.median(r[key] for r in measured), 2) for key in ("p50_ms", "p90_ms", "p99_ms")},
            "latency_samples": sum(r["latency_samples"] for r in measured),
            "rounds": len(measured),
            "errors": errors,
            "mismatches": wrong,
            "problems": measured[-1]["problems"] + [r["first_error"] for r in measured if r.get("first_error")][:3],
            "valid": errors == 0 and wrong == 0,
            "client_cpu_share": round(
                statistics.median(r["client_cpu_s"] / max(r["wall_s"], 1e-9) / CORES for r in measured), 3
            ),
        }
    ours = by[first]
    for contender, measured in by.items():
        if contender == first:
            continue
        per_round = [
            o["images_per_s"] / p["images_per_s"] if p["images_per_s"] else float("inf")
            for o, p in zip(ours, measured, strict=True)
        ]
        judged = ratio_interval(per_round, TARGET)
        if not (rows[first]["valid"] and rows[contender]["valid"]):
            judged = {**judged, "verdict": "invalid"}
        rows[contender]["ours_over_this"] = {**judged, "per_round": [round(r, 3) for r in per_round]}
    served = [c for c in rows if c != "ceiling"]
    best_served = max(rows[c]["images_per_s"] for c in served)
    rows["ceiling"]["is_ceiling"] = rows["ceiling"]["valid"] and rows["ceiling"]["images_per_s"] >= best_served
    return rows


def _curve(
    name: str, variant: str, sends: Mapping[str, Any], judges: Mapping[str, GateJudge], seconds: float
) -> dict[str, list[dict[str, Any]]]:
    """Closed-loop images/s and latency at 1 to 32 clients of one image, contenders rotated per level."""
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in sends}
    names = list(sends)
    for level, clients in enumerate(CURVE_CLIENTS):
        for contender in rotated(names, level):
            measured = closed(sends[contender], judges[contender], Point(f"c{clients}", clients, 1, 0, 0), seconds)
            found[contender].append({"clients": clients, **measured.to_json()})
            print(
                f"  {name} / {variant} / curve c{clients} / {contender}: {measured.images_per_s:.1f} images/s, "
                f"p99 {measured.p99_ms:.1f} ms",
                flush=True,
            )
    return found


def _open(
    name: str,
    variant: str,
    sends: Mapping[str, Any],
    judges: Mapping[str, GateJudge],
    curve: Mapping[str, list[dict[str, Any]]],
    fractions: tuple[float, ...],
    seconds: float,
) -> dict[str, list[dict[str, Any]]]:
    """Poisson arrivals of one image at each fraction of every contender's best closed-loop rate."""
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in sends}
    names = list(sends)
    single = requests_for(IMAGES, 1, IMAGES)
    for level, fraction in enumerate(fractions):
        for contender in rotated(names, level):
            rate = fraction * max(p["images_per_s"] for p in curve[contender])
            if rate <= 0:  # It answered nothing in closed loop: its points are invalid already.
                continue
            measured = open_loop(
                sends[contender], single, judges[contender], rate_per_s=rate, seconds=seconds, seed=level
            )
            found[contender].append({"fraction": fraction, "offered_per_s": round(rate, 2), **measured.to_json()})
            print(
                f"  {name} / {variant} / open {fraction:.0%} ({rate:.1f}/s) / {contender}: "
                f"{measured.images_per_s:.1f} images/s, "
                f"p50 {measured.p50_ms:.1f} ms, p99 {measured.p99_ms:.1f} ms, errors {measured.errors}",
                flush=True,
            )
    return found


def summarize_open(first: str, opened: Mapping[str, list[dict[str, Any]]], objective_ms: float) -> dict[str, Any]:
    """Each contender's rates, and its throughput at p99 <= the objective (the best rate that kept it, no errors)."""
    found: dict[str, Any] = {}
    for contender, rates in opened.items():
        kept = [
            r["images_per_s"] for r in rates if r["p99_ms"] <= objective_ms and not r["errors"] and not r["mismatches"]
        ]
        found[contender] = {"rates": rates, "throughput_at_objective": round(max(kept), 2) if kept else 0.0}
    ours = found[first]["throughput_at_objective"]
    for contender, row in found.items():
        if contender != first:
            row["ours_over_this_at_objective"] = (
                round(ours / row["throughput_at_objective"], 3) if row["throughput_at_objective"] else None
            )
    return found


def context(mode: str, argv: list[str]) -> dict[str, Any]:
    """The machine, versions, commit and command a results file came from."""
    cpu = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), [])
    shown = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    triton = subprocess.run(
        [str(TRITON_PYTHON), "-c", "import importlib.metadata as m; print(m.version('nvidia-pytriton'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, check=False).stdout.strip()

    return {
        "command": " ".join(["python -m bench.run", *argv]),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {
            "cpu": model,
            "flags": [f for f in shown if f in flags],
            "cores": CORES,
            "python": platform.python_version(),
        },
        "versions": {
            **{
                pkg: version(pkg)
                for pkg in (
                    "torch",
                    "torchvision",
                    "torchserve",
                    "onnxruntime",
                    "openvino",
                    "flask",
                    "gunicorn",
                    "ray",
                    "scipy",
                )
            },
            "nvidia-pytriton": triton,
        },
        "contenders": NAMES,
        "rounds": MODES[mode][0],
        "seconds_per_round": MODES[mode][1],
        "target": f"ours >= {TARGET}x every like-for-like served peer at every point, judged by ci_low",
    }


def report(results: Mapping[str, Any]) -> str:
    """A markdown table: per workload, variant and point, each contender's images/s and ours over it."""
    lines = [
        "| workload | variant | load | contender | images/s | p50 / p99 ms | ours over it [95% CI] | verdict |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for name, variants in results.items():
        for variant, phase in variants.items():
            for point, rows in phase["points"].items():
                for contender, row in rows.items():
                    judged = row.get("ours_over_this")
                    ratio = f"{judged['ratio']:.2f}x [{judged['ci_low']:.2f}-{judged['ci_high']:.2f}]" if judged else ""
                    verdict = judged["verdict"] if judged else ("" if row["valid"] else "invalid")
                    if contender == "ceiling":
                        verdict = "a ceiling" if row["is_ceiling"] else "not a ceiling: a server beat it"
                    lines.append(
                        f"| {name} | {variant} | {point} | {contender} | {row['images_per_s']:.1f} | "
                        f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f} | {ratio} | {verdict} |"
                    )
    return "\n".join(lines)


def picture(results: Mapping[str, Any], path: Path) -> None:
    """p99 latency against offered load, per contender, one panel per workload (engine phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        phase = results[name]["engine"]
        for contender, row in phase["open_loop"].items():
            rates = row["rates"]
            axis.plot([r["images_per_s"] for r in rates], [r["p99_ms"] for r in rates], marker="o", label=contender)
        axis.axhline(
            phase["objective_ms"],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"objective {phase['objective_ms']:.0f} ms",
        )
        axis.set_yscale("log")
        axis.set_xlabel("images/s answered (Poisson arrivals, 10% to 120% of each one's closed-loop best)")
        axis.set_ylabel("p99 latency, ms (from scheduled arrival)")
        axis.set_title(f"{name}: engine plans")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds x 5 s instead of 5 x 20 s, shorter curve and open loop"
    )
    parser.add_argument("--variants", default="engine", help="engine (default), eager, or engine,eager")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    variants = args.variants.split(",")
    if not TUNING.exists():
        raise SystemExit(f"{TUNING} is missing: run `make bench-tune` first (it tunes every contender alike)")
    tuning = json.loads(TUNING.read_text())["workloads"]
    began = time.perf_counter()
    results: dict[str, Any] = {}
    for name in BENCHES:
        results[name] = {}
        for variant in variants:
            with tempfile.TemporaryDirectory(prefix="bench-workload-") as folder:
                results[name][variant] = run_phase(name, variant, mode, Path(folder), tuning[name])
    table = report(results)
    print(table)
    out = RESULTS / (
        "bench" + "-quick" * args.quick + ("" if variants == ["engine"] else "-" + "-".join(variants)) + ".json"
    )
    out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                **context(mode, sys.argv[1:]),
                "seconds": round(time.perf_counter() - began, 1),
                "tuning": {"file": str(TUNING.name), "commit": json.loads(TUNING.read_text())["commit"]},
                "workloads": results,
            },
            indent=2,
        )
        + "\n"
    )
    if not args.quick and "engine" in variants:
        picture(results, PICTURE)
    print(f"wrote {out} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
