"""Every engine and precision per member, one intra-op thread, next to this machine's practical peak.

Usage: python -m bench.engines [--quick]   (`make bench-engines`; needs `make demo`)

For each member of the torchvision trio (fixed random weights, 224x224) and of the demos `shapes` and
`multishape` (their trained weights), behind the head that serves it: eager, `frozen` (TorchScript), ONNX
Runtime and OpenVINO on the member's ONNX export, OpenVINO bf16, and int8 (ONNX Runtime's static quantisation,
calibrated on the workload's images) on ONNX Runtime and on OpenVINO. Milliseconds per call at 1 and 8 rows,
the median of interleaved rounds so that noise hits every engine alike; the GFLOP/s the fastest fp32 and the
fastest lossy engine reach (torch's FLOP counter, forward of one row); and, on the workload's images, the
largest probability difference of each fp32 engine from eager and each lossy precision's label agreement with
eager. The practical peak is a 2048x2048 matmul on one thread, fp32 and bf16. Writes bench/results/engines.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.workloads import Workload, demo, torchvision_trio
from handlers.config.files import load_ensembles
from handlers.config.policy import DEFAULT_THRESHOLD
from handlers.config.specs import InputSpec
from handlers.execution.engines import export_onnx, onnxruntime_forward, openvino_forward, precision_unsupported
from handlers.execution.outputs import fit_head, largest_difference
from handlers.execution.plan_forwards import build
from handlers.execution.precision import measure, quantize_int8
from handlers.inputs.images import batch_tensors, decode_image
from handlers.weights.loading import build_member, member_weights

RESULTS = Path(__file__).parent / "results" / "engines.json"
ROWS = (1, 8)
FP32 = ("eager", "frozen", "onnxruntime", "openvino")
LOSSY = {"openvino_bf16": "bf16", "onnxruntime_int8": "int8", "openvino_int8": "int8"}
CPU = torch.device("cpu")


def peak_gflops(dtype: torch.dtype, n: int = 2048, calls: int = 5) -> float:
    """GFLOP/s of an n x n matmul on one thread, best of `calls`: what this core reaches at best in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(_seconds(lambda: a @ b) for _ in range(calls))
    return 2 * n**3 / best / 1e9


def _seconds(call: Any) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def member_engines(workload: Workload, folder: Path, rounds: int) -> dict[str, Any]:
    """Per member: ms per call by engine and rows, GFLOP/s, fp32 differences and lossy agreement."""
    spec = workload.spec
    images = [decode_image(data, spec.limits) for data in workload.images]
    threshold = spec.policy.threshold if spec.policy.threshold is not None else DEFAULT_THRESHOLD
    results = {}
    for member in spec.members:
        given = spec.member_input(member)
        if not isinstance(given, InputSpec):
            raise SystemExit(f"{member.name}: this benchmark sends images; the member takes tensors")
        module = build_member(member, spec.base_dir)
        module.load_state_dict(member_weights(member, spec.base_dir, module).state, strict=True)
        head = fit_head(member, module.eval(), given.instance_shape, spec.task, spec.labels, CPU)
        rows = batch_tensors(images, [given])[given]
        onnx, int8 = folder / f"{spec.name}-{member.name}.onnx", folder / f"{spec.name}-{member.name}.int8.onnx"
        export = export_onnx(head, given.instance_shape, onnx, ROWS)
        if export.exporter is None:
            raise SystemExit(f"{member.name}: not exported: {export.reason}")
        quantize_int8(onnx, int8, rows)
        forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "eager": head,
            "frozen": build("frozen", head, rows[: max(ROWS)]),
            "onnxruntime": onnxruntime_forward(onnx, CPU),
            "openvino": openvino_forward(onnx, CPU),
            "openvino_bf16": openvino_forward(onnx, CPU, precision="bf16"),
            "onnxruntime_int8": onnxruntime_forward(int8, CPU),
            "openvino_int8": openvino_forward(int8, CPU, precision="int8"),
        }
        ms = _time(forwards, rows, rounds)
        with torch.inference_mode():
            reference = head(rows)
            difference = {name: largest_difference(forwards[name](rows), reference) for name in FP32[1:]}
        agreement = {
            name: measure(precision, head, forwards[name], rows, given.views, spec.task, threshold).record()
            for name, precision in LOSSY.items()
        }
        flops = _flops(head, rows[:1])
        best_fp32 = min(FP32, key=lambda name: ms[name]["8"])
        best_lossy = min(LOSSY, key=lambda name: ms[name]["8"])
        results[member.name] = {
            "ms_per_call": ms,
            "gflop_per_row": round(flops / 1e9, 3),
            "gflops": {
                f"best_fp32 ({best_fp32})": round(flops * 8 / ms[best_fp32]["8"] / 1e6, 1),
                f"best_lossy ({best_lossy})": round(flops * 8 / ms[best_lossy]["8"] / 1e6, 1),
            },
            "fp32_difference_from_eager": {name: float(f"{d:.2g}") for name, d in difference.items()},
            "lossy_agreement": agreement,
            "exporter": export.exporter,
        }
        print(f"  {spec.name}/{member.name}: {ms}", flush=True)
    return results


def _flops(head: torch.nn.Module, row: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        head(row)
    return counter.get_total_flops()


def _time(forwards: dict[str, Any], rows: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per call at each row count, engines interleaved round by round."""
    samples: dict[str, dict[int, list[float]]] = {name: {n: [] for n in ROWS} for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():  # Warm-up: first calls compile, allocate and optimise.
            for n in ROWS:
                forward(rows[:n])
                forward(rows[:n])
        for _ in range(rounds):
            for n in ROWS:
                for name, forward in forwards.items():
                    samples[name][n].append(1000 * _seconds(lambda f=forward, n=n: f(rows[:n])))
    return {
        name: {str(n): round(statistics.median(v), 2) for n, v in by_rows.items()} for name, by_rows in samples.items()
    }


def table(results: dict[str, dict[str, Any]], peaks: dict[str, float]) -> str:
    engines = (*FP32, *LOSSY)
    lines = [
        "| member, rows | "
        + " | ".join(engines)
        + " | GFLOP/s fp32 / lossy (8 rows) | agreement bf16 / int8 ORT / int8 OV |",
        "|---|" + "---:|" * len(engines) + "---|---|",
    ]
    for workload, members in results.items():
        for member, row in members.items():
            for n in ROWS:
                ms = [f"{row['ms_per_call'][e][str(n)]:.2f}" for e in engines]
                gflops = (
                    " / ".join(f"{v:.1f} {k.split(' ')[1]}" for k, v in row["gflops"].items()) if n == max(ROWS) else ""
                )
                agreement = (
                    " / ".join(f"{row['lossy_agreement'][e]['agreement']:.3f}" for e in LOSSY) if n == max(ROWS) else ""
                )
                lines.append(f"| {workload}/{member}, {n} | " + " | ".join(ms) + f" | {gflops} | {agreement} |")
    lines.append(
        f"\nPractical peak, one thread, 2048x2048 matmul: fp32 {peaks['fp32']:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.1f} GFLOP/s."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute per workload)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    rounds = 5 if args.quick else 15
    peaks = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as folder:
        trio = torchvision_trio(Path(folder) / "trio", 16)
        shapes = demo(16)
        multishape = Workload(
            "demo-multishape", shapes.config, load_ensembles(shapes.config)["multishape"], shapes.images, ()
        )
        for workload in (trio, shapes, multishape):
            results[workload.name] = member_engines(workload, Path(folder), rounds)
    print(table(results, peaks))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "quick": args.quick,
                "seconds": round(time.perf_counter() - began, 1),
                "machine": {"processor": platform.processor() or platform.machine(), "threads": 1},
                "cpu_runs_fast": {p: precision_unsupported(p) or "yes" for p in ("bf16", "int8")},
                "peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
                "members": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
