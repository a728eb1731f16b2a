"""Which execution plan each member gets, what each candidate measured, and what the choice costs at worker start.

Usage: python -m bench.execution_plans [--quick]   (`make bench-plans`; needs `make demo`)

For the torchvision trio and both demos, loads each ensemble as a worker on this machine would (one
intra-op thread, member threads = cores) four ways: every member on eager; every member on `frozen`, the
fastest plan before the engines; `auto` on the built archive (ONNX Runtime and OpenVINO among the
candidates); and `auto` at `precision: bf16` (calibrated on the workload's images). It then times
`probabilities` (members side by side on the member threads, inputs already decoded) at 1 and 8 images, the
four interleaved so that noise hits them alike. Writes bench/results/execution_plans.json: per member the plan
chosen, its speed-up and every candidate's ms per call, and its bf16 engine and agreement; per ensemble the load
times and the whole ensemble's speed-ups against `frozen`.
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

from bench.contenders import extracted_archive
from bench.workloads import Workload, demo, torchvision_trio
from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.execution.cores import usable_cores
from handlers.inputs.images import decode_image

RESULTS = Path(__file__).parent / "results" / "execution_plans.json"
BATCHES = (1, 8)


def measure(workload: Workload, rounds: int, folder: Path) -> dict[str, Any]:
    """The ensemble loaded four ways, timed interleaved: eager, every member on `frozen` (the fastest plan before
    the engines), `auto` on its archive (engines included), and `auto` at `precision: bf16` on its archive."""
    threads = usable_cores()
    cpu = torch.device("cpu")
    loaded: dict[str, Ensemble] = {}
    load_s: dict[str, float] = {}
    with (
        extracted_archive(workload.spec) as fp32,
        extracted_archive(workload.at_precision("bf16", folder / workload.name).spec) as bf16,
    ):
        loaders = {
            "eager": lambda: Ensemble.from_spec(workload.spec.with_plan("eager"), cpu, parallelism=threads),
            "frozen": lambda: Ensemble.from_spec(workload.spec.with_plan("frozen"), cpu, parallelism=threads),
            "auto": lambda: Ensemble.from_model_dir(fp32, cpu, parallelism=threads),
            "bf16": lambda: Ensemble.from_model_dir(bf16, cpu, parallelism=threads),
        }
        for name, load in loaders.items():
            began = time.perf_counter()
            loaded[name] = load()
            load_s[name] = time.perf_counter() - began
    images = [decode_image(data, workload.spec.limits) for data in workload.images[: max(BATCHES)]]
    ms: dict[str, dict[int, list[float]]] = {plan: {b: [] for b in BATCHES} for plan in loaded}
    for _ in range(rounds):
        for batch in BATCHES:
            for plan, ensemble in loaded.items():
                began = time.perf_counter()
                ensemble.probabilities(images[:batch])
                ms[plan][batch].append(1000 * (time.perf_counter() - began))
    reference = loaded["eager"].probabilities(images)
    median = {plan: {b: statistics.median(v) for b, v in sizes.items()} for plan, sizes in ms.items()}
    return {
        "load_s": {plan: round(s, 2) for plan, s in load_s.items()},
        "members": {m["name"]: m["execution"] for m in loaded["auto"].describe()["members"]},
        "bf16_members": {m["name"]: m["execution"] for m in loaded["bf16"].describe()["members"]},
        "ensemble_ms_median": {plan: {str(b): round(v, 2) for b, v in sizes.items()} for plan, sizes in median.items()},
        "speedup_vs_frozen": {
            plan: {str(b): round(median["frozen"][b] / median[plan][b], 2) for b in BATCHES}
            for plan in ("eager", "auto", "bf16")
        },
        "max_probability_difference": {
            plan: float(f"{float((loaded[plan].probabilities(images) - reference).abs().max()):.2g}")
            for plan in ("frozen", "auto", "bf16")
        },
    }


def multishape(count: int) -> Workload:
    """The multilabel demo, as bench.workloads.demo builds the binary one."""
    base = demo(count)
    spec = load_ensembles(base.config)["multishape"]
    return Workload(name="demo-multishape", config=base.config, spec=spec, images=base.images, expected=())


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| workload | member | plan chosen (fp32) | speed-up vs eager | eager ms (1 / slice) | chosen ms (1 / slice) "
        "| bf16: plan, agreement |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for workload, result in results.items():
        for member, chosen in result["members"].items():
            eager, mine = chosen["ms_per_call"]["eager"], chosen["ms_per_call"][chosen["plan"]]
            lossy = result["bf16_members"][member]
            agreement = lossy["precision"].get("agreement", lossy["precision"].get("fallback"))
            lines.append(
                f"| {workload} | {member} | {chosen['plan']} | {chosen['speedup_vs_eager']:.2f}x | "
                f"{' / '.join(f'{v:.1f}' for v in eager.values())} | {' / '.join(f'{v:.1f}' for v in mine.values())} | "
                f"{lossy['plan']}, {agreement} |"
            )
    lines += [
        "",
        "| workload | load s (eager / frozen / auto / bf16) | ensemble ms at 1 image (frozen / auto / bf16) "
        "| at 8 images | auto vs frozen, 1 / 8 | bf16 vs frozen, 1 / 8 "
        "| largest difference from eager (frozen / auto / bf16) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, r in results.items():
        ms, up = r["ensemble_ms_median"], r["speedup_vs_frozen"]
        lines.append(
            f"| {workload} | {' / '.join(f'{v:.1f}' for v in r['load_s'].values())} | "
            + " | ".join(" / ".join(f"{ms[p][b]:.1f}" for p in ("frozen", "auto", "bf16")) for b in ("1", "8"))
            + f" | {up['auto']['1']:.2f}x / {up['auto']['8']:.2f}x | {up['bf16']['1']:.2f}x / {up['bf16']['8']:.2f}x | "
            + " / ".join(f"{v:.1e}" for v in r["max_probability_difference"].values())
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-plans-") as folder:
        workloads = [torchvision_trio(Path(folder) / "trio", 32), demo(32), multishape(32)]
        results = {w.name: measure(w, 5 if args.quick else 20, Path(folder) / "calibration") for w in workloads}
    print(markdown(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cores": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine,
                "quick": args.quick,
                "seconds": round(time.perf_counter() - began, 1),
                "workloads": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
