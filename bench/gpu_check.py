"""The CUDA path, checked and timed on a lent GPU: plans chosen there, answers against the CPU's, v2 and JSON in \
one batch.

Usage: python -m bench.gpu_check OUT.json [--part all|plans|options]
       (on a machine with CUDA; falls back to the CPU for a dry run)

Loads the torchvision trio (resnet18, mobilenet_v3_small, squeezenet1_1; fixed random weights) and
the CheXNet-shaped DenseNet121 of the tests the way a worker does on a GPU (members one after
another, TF32 off, execution plans chosen by measurement there), compares 32 images' probabilities
with an eager CPU load, answers a mixed batch (a v2 request, a JSON request, a bad v2 request)
through `prepare` and `answer_batch`, and times `probabilities` at several batch sizes, eager
against the chosen plans, interleaved. The `options` part checks the answer options on the trio:
`batch_invariant` bit-identity amid neighbours (and how far `fast` moves), `ten_crop` views and a
`members` subset against the CPU, and their cost at 32 images.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.workloads import torchvision_trio
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import Ensemble, pick_device
from handlers.execution.plans import prepare_cuda
from handlers.inputs.images import decode_image
from handlers.inputs.prepare import PreparedRequest
from tests.checkpoint_layouts import write_chexnet_ensemble

BATCHES = (1, 8, 32)
ROUNDS = 10


def progress(stage: str) -> None:
    """Stages on stderr as they end, so a run cut off by its time limit still says how far it got."""
    print(f"{time.strftime('%H:%M:%S')} {stage}", file=sys.stderr, flush=True)


def check(spec: EnsembleSpec, images: tuple[bytes, ...], device: torch.device) -> dict[str, Any]:
    cpu = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    progress(f"{spec.name}: loaded on the cpu")
    began = time.perf_counter()
    planned = Ensemble.from_spec(spec, device)
    load_s = time.perf_counter() - began
    progress(f"{spec.name}: plans chosen on {device} in {load_s:.1f} s")
    eager = Ensemble.from_spec(spec.with_plan("eager"), device)
    decoded = [decode_image(data, spec.limits) for data in images]
    reference = cpu.probabilities(decoded[:32])
    got = planned.probabilities(decoded[:32])
    labels_agree = bool((reference.argmax(-1) == got.argmax(-1)).all())
    encoded = [base64.b64encode(data).decode() for data in images[:3]]
    v2 = {"id": "gpu", "inputs": [{"name": "images", "shape": [3], "datatype": "BYTES", "data": encoded}]}
    rows = [
        ({"body": json.dumps(v2).encode()}, {"Content-Type": "application/json"}),
        (
            {"body": json.dumps({"instances": [{"b64": e} for e in encoded[:2]]}).encode()},
            {"Content-Type": "application/json"},
        ),
        ({"body": json.dumps({"inputs": []}).encode()}, {"Content-Type": "application/json"}),
    ]
    prepared: list[Any] = []
    for row, headers in rows:
        try:
            prepared.append(planned.prepare(row, headers))
        except Exception as e:  # The handler turns request errors into replies the same way.
            prepared.append(e)
    replies = planned.answer_batch(prepared).replies
    expected = cpu.render(
        cpu.probabilities(decoded[:3]), next(p for p in prepared if isinstance(p, PreparedRequest)).policy
    )
    outputs = {o["name"]: o["data"] for o in replies[0].body["outputs"]}
    if spec.task == "multilabel":
        v2_agrees = outputs["labels"] == [
            label in p["labels"] for p in expected["predictions"] for label in spec.labels
        ]
    else:
        v2_agrees = outputs["label"] == [p["label"] for p in expected["predictions"]]
    progress(f"{spec.name}: compared and answered a mixed batch")
    timings: dict[str, dict[int, list[float]]] = {"eager": {b: [] for b in BATCHES}, "auto": {b: [] for b in BATCHES}}
    batch_of = {b: (decoded * (b // len(decoded) + 1))[:b] for b in BATCHES}
    for ensemble in (eager, planned):
        ensemble.probabilities(batch_of[max(BATCHES)])
    for _ in range(ROUNDS):
        for b in BATCHES:
            for name, ensemble in (("eager", eager), ("auto", planned)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                ensemble.probabilities(batch_of[b])
                timings[name][b].append(1000 * (time.perf_counter() - began))
    medians = {name: {b: statistics.median(v) for b, v in sizes.items()} for name, sizes in timings.items()}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "plans": {
            m["name"]: {k: m["execution"].get(k) for k in ("plan", "speedup_vs_eager", "rejected")}
            for m in planned.describe()["members"]
        },
        "load_s_with_plan_choice": round(load_s, 2),
        "max_probability_difference_vs_cpu": float((reference - got).abs().max()),
        "labels_agree_with_cpu": labels_agree,
        "mixed_batch_statuses": [reply.status for reply in replies],
        "v2_labels_equal_cpu_json": v2_agrees,
        "bad_v2_body": replies[2].body,
        "ms_per_call_median": {name: {str(b): round(v, 2) for b, v in m.items()} for name, m in medians.items()},
        "images_per_s_auto": {str(b): round(1000 * b / medians["auto"][b], 1) for b in BATCHES},
        "auto_speedup_vs_eager": {str(b): round(medians["eager"][b] / medians["auto"][b], 2) for b in BATCHES},
    }


def median_ms(ensemble: Ensemble, images: list[Any], device: torch.device) -> float:
    ensemble.probabilities(images)
    times = []
    for _ in range(ROUNDS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        ensemble.probabilities(images)
        times.append(1000 * (time.perf_counter() - began))
    return round(statistics.median(times), 2)


def options(spec: EnsembleSpec, images: tuple[bytes, ...], device: torch.device) -> dict[str, Any]:
    """batch_invariant, ten_crop and members on `device`, against themselves and the CPU."""
    decoded = [decode_image(data, spec.limits) for data in images]
    target, neighbours = decoded[0], decoded[1:]
    loaded = {
        consistency: Ensemble.from_spec(replace(spec, consistency=consistency), device)
        for consistency in ("fast", "batch_invariant")
    }
    progress("options: fast and batch_invariant loaded")
    moved: dict[str, float] = {}
    identical: dict[str, bool] = {}
    for name, ensemble in loaded.items():
        alone = ensemble.probabilities([target])[:, 0]
        among = [
            ensemble.probabilities([*neighbours[:count][:position], target, *neighbours[:count][position:]])[
                :, position
            ]
            for count, position in ((1, 1), (7, 3), (15, 15), (31, 9))
        ]
        identical[name] = all(torch.equal(alone, other) for other in among)
        moved[name] = max(float((alone - other).abs().max()) for other in among)
    cpu_tta = Ensemble.from_spec(spec.with_views("ten_crop").with_plan("eager"), torch.device("cpu"))
    tta = Ensemble.from_spec(spec.with_views("ten_crop"), device)
    tta_difference = float((cpu_tta.probabilities(decoded[:8]) - tta.probabilities(decoded[:8])).abs().max())
    progress("options: ten_crop compared")
    fast = loaded["fast"]
    names = [m.name for m in spec.members]
    rows = [fast.prepare({"body": data, "members": names[0].encode()}, {}) for data in images[:2]] + [
        fast.prepare({"body": images[2]}, {})
    ]
    replies = fast.answer_batch(rows).replies
    cpu = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    expected = [
        cpu.render(cpu.probabilities([d]), fast.spec.policy, members=m)
        for d, m in zip(decoded[:3], ([names[0]], [names[0]], None), strict=True)
    ]
    subset_labels_agree = [r.body["predictions"][0]["label"] for r in replies] == [
        e["predictions"][0]["label"] for e in expected
    ]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bit_identical_amid_neighbours": identical,
        "max_move_amid_neighbours": moved,
        "ten_crop_max_difference_vs_cpu": tta_difference,
        "members_subset_labels_equal_cpu": subset_labels_agree,
        "answered_by": [r.body["answered_by"] for r in replies],
        "ms_for_32_images": {
            "fast": median_ms(fast, decoded[:32], device),
            "batch_invariant": median_ms(loaded["batch_invariant"], decoded[:32], device),
            "ten_crop": median_ms(tta, decoded[:32], device),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--part", choices=("all", "plans", "options"), default="all")
    args = parser.parse_args()
    device = pick_device(0)
    if device.type == "cuda":
        prepare_cuda()  # As the handler does.
    results: dict[str, Any] = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        trio = torchvision_trio(Path(folder) / "trio", 32)
        if args.part in ("all", "options"):
            results["answer-options"] = options(trio.spec, trio.images, device)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        if args.part in ("all", "plans"):
            results["torchvision-trio"] = check(trio.spec, trio.images, device)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            chexnet = load_ensembles(write_chexnet_ensemble(Path(folder) / "chexnet"))["chexnet"]
            results["chexnet"] = check(chexnet, trio.images, device)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
