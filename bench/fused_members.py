"""Fused against one-at-a-time execution of 4 same-architecture members, at batch 1 and 8.

Usage: python -m bench.fused_members [--quick]   (`make bench-fused`)

Both paths run in this one invocation on the same inputs with the same threads (all cores);
outputs are checked to agree within 1e-5. Writes bench/results/fused.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision

from archive_scripts.demo_models import TinyConvNet
from handlers.config.specs import InputSpec, MemberSpec
from handlers.execution.groups import FUSE_TOLERANCE, plan_groups

RESULTS = Path(__file__).parent / "results" / "fused.json"
WORKLOADS: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "resnet18 (10 classes, 224x224)": (lambda: torchvision.models.resnet18(num_classes=10), 224),
    "TinyConvNet (2 classes, 48x48)": (lambda: TinyConvNet(num_classes=2, width=16), 48),
}


def run_each(modules: list[torch.nn.Module], batch: torch.Tensor) -> torch.Tensor:
    """The one-at-a-time path: every member's own forward call, stacked."""
    return torch.stack([module(batch) for module in modules])


def seconds_per_call(run: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        run(batch)
        begin = time.perf_counter()
        for _ in range(repeats):
            run(batch)
    return (time.perf_counter() - begin) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for name, (build, size) in WORKLOADS.items():
        torch.manual_seed(0)
        modules = [build().eval() for _ in range(4)]
        spec = InputSpec(size=(size, size))
        members = [MemberSpec(name=f"m{i}", arch="same", weights="-") for i in range(4)]
        [fused] = plan_groups(members, modules, [spec] * 4, fuse=True, device=device)
        assert fused.fused, f"{name}: fused outputs differ from sequential by more than {FUSE_TOLERANCE}"

        sequential = partial(run_each, modules)
        for batch_size in (1, 8):
            batch = torch.randn(batch_size, 3, size, size)
            with torch.inference_mode():
                difference = float((fused.run(batch) - sequential(batch)).abs().max())
            repeats = (2 if args.quick else 5) if size == 224 else (10 if args.quick else 40)
            seq_s = seconds_per_call(sequential, batch, repeats)
            fused_s = seconds_per_call(fused.run, batch, repeats)
            rows.append(
                {
                    "workload": name,
                    "batch": batch_size,
                    "sequential_ms": 1000 * seq_s,
                    "fused_ms": 1000 * fused_s,
                    "speedup": seq_s / fused_s,
                    "max_abs_difference": difference,
                }
            )
    print("| 4 members of | batch | one at a time ms | fused ms | fused speed-up | max difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workload']} | {r['batch']} | {r['sequential_ms']:.1f} | {r['fused_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['max_abs_difference']:.1e} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
