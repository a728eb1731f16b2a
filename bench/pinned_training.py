"""What pinning the demos' training kernels costs in time, and what it buys: the same weights under any CPU's choice.

Usage: python -m bench.pinned_training [--ensemble digits ...]   (`make bench-pinned-training`; default: every demo)

Each demo is trained (nothing saved) four ways, one process each: under two kernel settings that CPUs pick
by default, without the pin (`train_demo --unpinned`) and with it (`archive_scripts.pinned_kernels`):

- `this CPU`: nothing forced, the kernels this machine's CPU gets (AVX-512 ATen and oneDNN on an AVX-512
  CPU, MKL's dispatch for its vendor, one thread per core);
- `AVX2, 1 core`: what an AVX2 laptop or an older server would get, forced through the variables the
  libraries read: ATen's AVX2 kernels, oneDNN capped at AVX2, MKL's AVX2 instructions, one thread.

It reports each member's digest (the sha256 of its tensors, archive_scripts.demo_weights.state_digest)
and seconds, whether the two settings agree without and with the pin, whether the pinned runs give the
digests committed in archive_scripts/demo_weights.json, and the training time the pin costs. The runs
take turns in a fixed order, once each: a training time here is one run, not a median.
Writes bench/results/pinned_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from archive_scripts import demo_weights, pinned_kernels
from archive_scripts.train_demo import DEMOS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "pinned_training.json"
SETTINGS: dict[str, dict[str, str]] = {
    "this CPU": {},
    "AVX2, 1 core": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OMP_NUM_THREADS": "1",
    },
}


def train(ensembles: list[str], setting: dict[str, str], *, pinned: bool) -> dict[str, Any]:
    """One training run of `ensembles` in its own process under `setting`: the kernels it reported and each member's
    seconds and digest."""
    environ = {key: value for key, value in os.environ.items() if key not in pinned_kernels.ENVIRONMENT} | setting
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "trained.json"
        command = [sys.executable, "-m", "archive_scripts.train_demo", "--no-save", "--json", str(report)]
        command += [f"--ensemble={name}" for name in ensembles] + ([] if pinned else ["--unpinned"])
        subprocess.run(command, cwd=ROOT, env=environ, check=True, stdout=subprocess.DEVNULL)
        return json.loads(report.read_text())


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (the kernels it gets depend on it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def summary(runs: dict[str, dict[str, Any]], pinned: demo_weights.Digests) -> dict[str, Any]:
    """Per member: the digest under each run, whether the settings agree without and with the pin, and the cost."""
    first = next(iter(runs.values()))["members"]
    members: dict[str, Any] = {}
    for ensemble, trained in first.items():
        for member in trained:
            row = {run: runs[run]["members"][ensemble][member] for run in runs}
            digests = {run: value["digest"] for run, value in row.items()}
            unpinned = {digests[f"unpinned, {setting}"] for setting in SETTINGS}
            pinned_runs = {digests[f"pinned, {setting}"] for setting in SETTINGS}
            members[f"{ensemble}/{member}"] = {
                "digests": digests,
                "seconds": {run: round(value["seconds"], 2) for run, value in row.items()},
                "unpinned_settings_agree": len(unpinned) == 1,
                "pinned_settings_agree": len(pinned_runs) == 1,
                "pinned_equals_committed": pinned_runs == {pinned.get(ensemble, {}).get(member)},
            }
    seconds = {
        run: round(sum(v["seconds"] for m in runs[run]["members"].values() for v in m.values()), 1) for run in runs
    }
    return {"members": members, "seconds": seconds, "kernels": {run: value["kernels"] for run, value in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensemble", action="append", choices=sorted(DEMOS), help="default: every demo")
    args = parser.parse_args()
    ensembles = args.ensemble or list(DEMOS)
    runs = {}
    for pinned in (False, True):
        for name, setting in SETTINGS.items():
            run = f"{'pinned' if pinned else 'unpinned'}, {name}"
            print(f"training {ensembles}: {run}", flush=True)
            runs[run] = train(ensembles, setting, pinned=pinned)
            print(f"  {sum(v['seconds'] for m in runs[run]['members'].values() for v in m.values()):.1f}s", flush=True)
    result = {
        "command": "python -m bench.pinned_training " + " ".join(f"--ensemble {name}" for name in args.ensemble or []),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "settings": SETTINGS,
        **summary(runs, demo_weights.pinned()),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'member':<24} {'unpinned: settings agree':>25} {'pinned: settings agree':>23} {'= committed':>12}")
    for member, row in result["members"].items():
        print(
            f"{member:<24} {row['unpinned_settings_agree']!s:>25} {row['pinned_settings_agree']!s:>23} "
            f"{row['pinned_equals_committed']!s:>12}"
        )
    print("training seconds:", json.dumps(result["seconds"]))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
