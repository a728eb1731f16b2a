"""Where a 16-image request's time goes inside our worker: decode, resize per input spec, member calls, rendering.

Usage: python -m bench.request_profile [--rounds N]   (`make bench-request-profile`; needs `make demo`)

Loads the demo `shapes` archive as a TorchServe worker does (its ONNX exports, the plans `auto` chooses, the
member threads of this machine), and answers batches of 16 and of 32 held-out PNGs (one 16-image request, and
the two that TorchServe batches together at 2 clients x 16 images), timing each phase: decoding the PNGs, the
resize and normalisation once per input spec, the members' forward calls on the member threads, and deciding
and rendering the JSON answers. The same phases are timed with every member on eager, as Flask and Triton run
them. Medians of interleaved rounds; writes bench/results/request_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import torch

from bench.contenders import extracted_archive
from bench.workloads import demo
from handlers.config.specs import InputSpec
from handlers.ensemble import Ensemble
from handlers.execution.cores import usable_cores
from handlers.inputs.images import batch_tensors, decode_image

RESULTS = Path(__file__).parent / "results" / "request_profile.json"
BATCHES = (16, 32)
PHASES = ("decode", "resize", "members", "render")


def phases(ensemble: Ensemble, images: list[bytes]) -> dict[str, float]:
    """Milliseconds of each phase for one batch of `images`, as the handler runs them."""
    spec = ensemble.spec
    timed: dict[str, float] = {}

    def timing(name: str, work: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        result = work()
        timed[name] = 1000 * (time.perf_counter() - began)
        return result

    decoded = timing("decode", lambda: [decode_image(data, spec.limits) for data in images])
    # The demo's members take images: every group's spec is an InputSpec.
    timing("resize", lambda: batch_tensors(decoded, cast("list[InputSpec]", [g.spec for g in ensemble.runner.groups])))
    probs = timing("members+resize", lambda: ensemble.probabilities(decoded))
    timing(
        "render",
        lambda: [json.dumps(ensemble.render(probs[:, i : i + 16], spec.policy)) for i in range(0, len(images), 16)],
    )
    timed["members"] = max(0.0, timed.pop("members+resize") - timed["resize"])
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = demo(64)
    threads = usable_cores()
    with extracted_archive(workload.spec) as model_dir:
        loaded = {
            "ours (auto, engines)": Ensemble.from_model_dir(model_dir, torch.device("cpu"), parallelism=threads),
            "eager, as the baselines": Ensemble.from_spec(
                workload.spec.with_plan("eager"), torch.device("cpu"), parallelism=threads
            ),
        }
        plans = {m["name"]: m["execution"]["plan"] for m in loaded["ours (auto, engines)"].describe()["members"]}
    samples: dict[str, dict[int, dict[str, list[float]]]] = {
        name: {batch: {phase: [] for phase in PHASES} for batch in BATCHES} for name in loaded
    }
    for round_number in range(args.rounds + 2):
        for batch in BATCHES:
            images = [workload.images[(round_number * batch + i) % len(workload.images)] for i in range(batch)]
            for name, ensemble in loaded.items():
                timed = phases(ensemble, images)
                if round_number >= 2:  # The first rounds warm the engines and allocators up.
                    for phase in PHASES:
                        samples[name][batch][phase].append(timed[phase])
    medians = {
        name: {
            str(batch): {phase: round(statistics.median(v), 2) for phase, v in by_phase.items()}
            for batch, by_phase in by_batch.items()
        }
        for name, by_batch in samples.items()
    }
    lines = [
        "| members on | images | " + " | ".join(f"{p} ms" for p in PHASES) + " | total ms | images/s, one worker |",
        "|---|---:|" + "---:|" * (len(PHASES) + 2),
    ]
    for name, by_batch in medians.items():
        for images_per_batch, row in by_batch.items():
            total = sum(row.values())
            lines.append(
                f"| {name} | {images_per_batch} | "
                + " | ".join(f"{row[p]:.2f}" for p in PHASES)
                + f" | {total:.2f} | {1000 * int(images_per_batch) / total:.0f} |"
            )
    print("\n".join(lines))
    print(f"plans chosen: {plans}; member threads: {threads}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "rounds": args.rounds,
                "member_threads": threads,
                "plans": plans,
                "ms": medians,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
