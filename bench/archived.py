"""Every contender's members, loaded one way: from the ensemble's archive, each member on a named plan.

The peers of bench/run.py (Flask, Ray Serve, PyTriton, the in-process ceiling) and ours serve the same files: the
archive's state dicts, and its ONNX exports for the engine plans (ONNX Runtime, OpenVINO) with the thread settings
a TorchServe worker uses (one intra-op thread, members side by side on `member_threads` threads). So a comparison
between servers compares the servers, and the engines' gain is measured on its own (ours on `auto` against ours on
`eager`). Imported by processes in .venv-triton too: it needs only the handlers package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from handlers.config.files import read_archive_manifest
from handlers.config.specs import EnsembleSpec, Execution
from handlers.ensemble import Ensemble
from handlers.execution.engines import archived_exports
from handlers.weights.loading import load_archived_members

PLANS_ENV = "BENCH_PLANS"


def every_member(spec: EnsembleSpec, plan: str) -> dict[str, str]:
    """Each member of `spec` on `plan`."""
    return {member.name: plan for member in spec.members}


def with_member_plans(spec: EnsembleSpec, plans: Mapping[str, str]) -> EnsembleSpec:
    """`spec` with each member on the plan `plans` names for it (a fixed plan each: nothing is chosen at load)."""
    members = tuple(replace(member, execution=Execution(plan=plans[member.name])) for member in spec.members)
    return replace(spec, execution=Execution(plan="eager"), members=members)


def archived_ensemble(model_dir: Path, plans: Mapping[str, str], member_threads: int) -> Ensemble:
    """The extracted archive's members, each on its plan, run side by side on `member_threads` threads."""
    torch.set_num_threads(1)
    manifest = read_archive_manifest(model_dir)
    return Ensemble(
        with_member_plans(manifest.ensemble, plans),
        load_archived_members(manifest, model_dir),
        torch.device("cpu"),
        manifest.build,
        manifest.sources,
        parallelism=member_threads,
        exported=archived_exports(manifest.engines, model_dir),
    )


def from_environment() -> Ensemble:
    """What a peer server process loads: BENCH_MODEL_DIR, BENCH_PLANS (JSON, member -> plan), BENCH_MEMBER_THREADS."""
    return archived_ensemble(
        Path(os.environ["BENCH_MODEL_DIR"]),
        json.loads(os.environ[PLANS_ENV]),
        int(os.environ.get("BENCH_MEMBER_THREADS", "1")),
    )
