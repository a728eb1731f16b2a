"""Which execution plan each member gets, what each candidate measured, and what the choice costs at worker start.

Usage: python -m bench.execution_plans [--quick]   (`make bench-plans`; needs `make demo`)

For the torchvision trio and both demos, loads each ensemble as a worker on this machine would (one
intra-op thread, member threads = cores), once with every member on eager and once with `auto`,
then times `probabilities` (members side by side on the member threads, inputs already decoded) at
1 and 8 images, both ensembles interleaved so that noise hits them alike. Writes
bench/results/execution_plans.json: per member the plan chosen, its speed-up and every candidate's
ms per call; per ensemble the load time both ways and the whole ensemble's speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.workloads import Workload, demo, torchvision_trio
from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.execution.runner import usable_cores
from handlers.inputs.images import decode_image

RESULTS = Path(__file__).parent / "results" / "execution_plans.json"
BATCHES = (1, 8)


def measure(workload: Workload, rounds: int) -> dict[str, Any]:
    threads = usable_cores()
    loaded: dict[str, Ensemble] = {}
    load_s: dict[str, float] = {}
    for plan in ("eager", "auto"):
        began = time.perf_counter()
        loaded[plan] = Ensemble.from_spec(workload.spec.with_plan(plan), torch.device("cpu"), parallelism=threads)
        load_s[plan] = time.perf_counter() - began
    images = [decode_image(data, workload.spec.limits) for data in workload.images[: max(BATCHES)]]
    ms: dict[str, dict[int, list[float]]] = {plan: {b: [] for b in BATCHES} for plan in loaded}
    for _ in range(rounds):
        for batch in BATCHES:
            for plan, ensemble in loaded.items():
                began = time.perf_counter()
                ensemble.probabilities(images[:batch])
                ms[plan][batch].append(1000 * (time.perf_counter() - began))
    difference = float((loaded["auto"].probabilities(images) - loaded["eager"].probabilities(images)).abs().max())
    return {
        "load_s": {plan: round(s, 2) for plan, s in load_s.items()},
        "members": {m["name"]: m["execution"] for m in loaded["auto"].describe()["members"]},
        "ensemble_ms_median": {plan: {str(b): round(statistics.median(v), 2) for b, v in sizes.items()} for plan, sizes in ms.items()},
        "ensemble_speedup": {str(b): round(statistics.median(ms["eager"][b]) / statistics.median(ms["auto"][b]), 2) for b in BATCHES},
        "max_probability_difference": difference,
    }


def multishape(count: int) -> Workload:
    """The multilabel demo, as bench.workloads.demo builds the binary one."""
    base = demo(count)
    spec = load_ensembles(base.config)["multishape"]
    return Workload(name="demo-multishape", config=base.config, spec=spec, images=base.images, expected=())


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| workload | member | plan chosen | speed-up vs eager | eager ms (1 / slice) | chosen ms (1 / slice) | rejected |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for workload, result in results.items():
        for member, chosen in result["members"].items():
            eager, mine = chosen["ms_per_call"]["eager"], chosen["ms_per_call"][chosen["plan"]]
            lines.append(
                f"| {workload} | {member} | {chosen['plan']} | {chosen['speedup_vs_eager']:.2f}x | "
                f"{' / '.join(f'{v:.1f}' for v in eager.values())} | {' / '.join(f'{v:.1f}' for v in mine.values())} | "
                f"{', '.join(chosen['rejected']) or '-'} |"
            )
    lines += ["", "| workload | load s (eager / auto) | ensemble ms at 1 image (eager / auto) | at 8 images | speed-up 1 / 8 | max difference |", "|---|---:|---:|---:|---:|---:|"]
    for workload, r in results.items():
        e, a = r["ensemble_ms_median"]["eager"], r["ensemble_ms_median"]["auto"]
        lines.append(
            f"| {workload} | {r['load_s']['eager']:.1f} / {r['load_s']['auto']:.1f} | {e['1']:.1f} / {a['1']:.1f} | {e['8']:.1f} / {a['8']:.1f} | "
            f"{r['ensemble_speedup']['1']:.2f}x / {r['ensemble_speedup']['8']:.2f}x | {r['max_probability_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-plans-") as folder:
        workloads = [torchvision_trio(Path(folder), 8), demo(8), multishape(8)]
        results = {w.name: measure(w, 5 if args.quick else 20) for w in workloads}
    print(markdown(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    RESULTS.write_text(json.dumps({"machine": machine, "quick": args.quick, "seconds": round(time.perf_counter() - began, 1), "workloads": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
