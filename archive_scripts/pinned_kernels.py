"""Kernels pinned for training the demos, so every x86-64 CPU with AVX2 trains the same weights bit for bit.

Left alone, PyTorch picks its kernels by the CPU it runs on: ATen's vector width (AVX2 or AVX-512),
oneDNN's convolutions (AVX2, AVX-512, AMX; blocked by the cache sizes it detects), MKL's code branch
(which differs between Intel and AMD) and as many threads as there are cores. Each choice changes the
order of floating-point sums, so the demos trained on a Xeon with AMX and on an AMD EPYC differ after
the first step, and the docs' numbers hold on one CPU model only.

Training (`make demo`) therefore runs under one fixed choice that every supported CPU can make:

- ATen's AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`);
- MKL's `COMPATIBLE` branch (`MKL_CBWR`), the one Intel documents as reproducible on Intel and non-Intel
  CPUs alike; its `AVX2` branch falls back to the CPU's own dispatch on AMD;
- no oneDNN and no NNPACK: oneDNN promises bitwise results only on the same hardware, so convolutions
  take ATen's own path (im2col and MKL's gemm);
- a fixed number of threads, with OpenMP and MKL not free to change it, and deterministic algorithms.

Serving never runs under this: the worker keeps the fastest kernels its CPU has. `bench/pinned_training.py`
measures what the pin costs in training time and shows the weights with and without it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

THREADS = 2
ENVIRONMENT: Mapping[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "MKL_NUM_THREADS": str(THREADS),
    "OMP_NUM_THREADS": str(THREADS),
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
CAPABILITY = "AVX2"


class PinUnavailable(RuntimeError):
    """This CPU cannot run the pinned kernels (no AVX2): what it trains will not be the pinned weights."""


def unpinned_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The variables of ENVIRONMENT that `environ` (default: this process's) does not set as pinned."""
    environ = os.environ if environ is None else environ
    return {key: environ.get(key) for key, value in ENVIRONMENT.items() if environ.get(key) != value}


def reexec_pinned(module: str, argv: Sequence[str]) -> None:
    """Run `python -m module argv` again under ENVIRONMENT unless this process already is.

    The variables are read when torch, MKL and OpenMP load, before any Python code of ours could set
    them, so a process that started without them replaces itself with one that starts with them.
    """
    if unpinned_variables():
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, **ENVIRONMENT})


def apply() -> None:
    """Pin what torch sets at run time, in a process started under ENVIRONMENT; refuse if the CPU cannot follow."""
    import torch

    missing = unpinned_variables()
    if missing:
        raise PinUnavailable(f"started without the pinned environment (differs: {missing}); run through reexec_pinned")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != CAPABILITY:
        raise PinUnavailable(
            f"this CPU runs ATen's {capability} kernels, not {CAPABILITY}: it has no AVX2, so the demos it trains "
            "differ from the pinned weights"
        )
    torch.set_num_threads(THREADS)
    # The module's class makes `enabled` a ContextProp whose setter takes the bool (set_flags would also reset the
    # fp32 precision); mypy sees the descriptor object itself.
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    torch.backends.nnpack.set_flags(False)
    torch.use_deterministic_algorithms(True)


def describe() -> dict[str, object]:
    """The kernel settings this process trains under, for the training log and the benchmark's results."""
    import torch

    return {
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.enabled,
        # torch.backends.nnpack sets the flag but has no public getter; this is the one it reads itself.
        "nnpack": torch._C._get_nnpack_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "environment": {key: os.environ.get(key) for key in ENVIRONMENT},
    }


if __name__ == "__main__":
    # `python -m archive_scripts.pinned_kernels`: the settings `make demo` would train under on this machine.
    import json

    reexec_pinned("archive_scripts.pinned_kernels", sys.argv[1:])
    apply()
    print(json.dumps(describe(), indent=2))
