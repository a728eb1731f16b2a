"""Fused execution: same-architecture members in one vmap call give the one-at-a-time outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import yaml

from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.execution.cores import usable_cores
from handlers.inputs.images import decode_image
from tests.conftest import image_bytes, write_ensemble
from tests.fixture_models import BranchyNet, PoolNet

# Each member: its arch, the module whose weights are saved, and its extra member keys.
Members = dict[str, tuple[str, torch.nn.Module, dict[str, Any]]]


def ensemble_with(folder: Path, members: Members, *, fuse: bool) -> Ensemble:
    """An ensemble of the given (arch, module, extra member keys), weights saved from the modules, all on eager."""
    path = write_ensemble(folder)
    doc = yaml.safe_load(path.read_text())
    entries = []
    for name, (arch, module, extra) in members.items():
        torch.save(module.state_dict(), folder / f"{name}.pt")
        entries.append({"name": name, "arch": arch, "weights": f"{name}.pt", "kwargs": {"num_classes": 3}, **extra})
    doc["ensembles"]["trio"]["members"] = entries
    doc["ensembles"]["trio"]["batching"] = {"micro_batch_size": 2, "fuse_members": fuse}
    doc["ensembles"]["trio"]["execution"] = {"plan": "eager"}
    path.write_text(yaml.safe_dump(doc))
    return Ensemble.from_spec(load_ensembles(path)["trio"], torch.device("cpu"))


def members_of_one_kind(seed: int) -> Members:
    torch.manual_seed(seed)
    pools: Members = {f"pool{i}": ("fixture_models.py:PoolNet", PoolNet(num_classes=3), {}) for i in range(4)}
    gray: Members = {
        "gray": (
            "fixture_models.py:PoolNet",
            PoolNet(num_classes=3, in_channels=1),
            {"kwargs": {"num_classes": 3, "in_channels": 1}, "input": {"color_mode": "L"}},
        )
    }
    mobiles: Members = {
        f"mobile{i}": ("torchvision:mobilenet_v3_small", torchvision.models.mobilenet_v3_small(num_classes=3), {})
        for i in range(2)
    }
    return {**pools, **gray, **mobiles}


def test_fused_members_match_sequential(tmp_path: Path) -> None:
    fused = ensemble_with(tmp_path / "fused", members_of_one_kind(3), fuse=True)
    sequential = ensemble_with(tmp_path / "sequential", members_of_one_kind(3), fuse=False)
    assert fused.describe()["execution"] == [
        {"members": ["pool0", "pool1", "pool2", "pool3"], "fused": True, "plan": "eager"},
        {"members": ["gray"], "fused": False, "plan": "eager"},
        {"members": ["mobile0", "mobile1"], "fused": True, "plan": "eager"},
    ]
    assert [group["fused"] for group in sequential.describe()["execution"]] == [False] * 7
    images = [decode_image(image_bytes(seed), fused.spec.limits) for seed in range(5)]
    torch.testing.assert_close(fused.probabilities(images), sequential.probabilities(images), atol=1e-5, rtol=0)


def test_members_vmap_cannot_run_are_not_fused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    members: Members = {
        f"branchy{i}": ("fixture_models.py:BranchyNet", BranchyNet(num_classes=3), {}) for i in range(2)
    }
    ensemble = ensemble_with(tmp_path, members, fuse=True)
    assert ensemble.describe()["execution"] == [
        {"members": ["branchy0"], "fused": False, "plan": "eager"},
        {"members": ["branchy1"], "fused": False, "plan": "eager"},
    ]
    assert "vmap cannot run members (0, 1)" in caplog.text
    assert ensemble.probabilities([decode_image(image_bytes(1), ensemble.spec.limits)]).shape == (2, 1, 3)


@pytest.mark.parametrize("parallelism", [2, 3], ids=["two-threads", "three-threads"])
def test_members_in_parallel_match_one_at_a_time(tmp_path: Path, parallelism: int) -> None:
    """5 images, so the slices are uneven (3+2, or 2+2+1): every image must keep its own answer."""
    spec = load_ensembles(write_ensemble(tmp_path))["trio"].with_plan("eager")
    sequential = Ensemble.from_spec(spec, torch.device("cpu"))
    parallel = Ensemble.from_spec(spec, torch.device("cpu"), parallelism=parallelism)
    assert (sequential.describe()["member_threads"], parallel.describe()["member_threads"]) == (1, parallelism)
    images = [decode_image(image_bytes(seed), spec.limits) for seed in range(5)]
    torch.testing.assert_close(parallel.probabilities(images), sequential.probabilities(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"cpu.max": "150000 100000\n"}, 1, id="v2-one-and-a-half-cores"),
        pytest.param({"cpu.max": "100000 100000\n"}, 1, id="v2-one-core"),
        pytest.param({"cpu.max": "max 100000\n"}, None, id="v2-unlimited"),
        pytest.param({"cpu.max": "6400000 100000\n"}, None, id="v2-more-than-the-affinity"),
        pytest.param({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1, id="v1-half-a-core"),
        pytest.param({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, id="v1-unlimited"),
        pytest.param({}, None, id="no-cgroup-files"),
        pytest.param({"cpu.max": "garbage\n"}, None, id="unreadable"),
    ],
)
def test_usable_cores_follow_the_cgroup_quota(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    """A pod's CPU limit caps the member threads; without a quota, the CPU affinity decides (None here)."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cores(tmp_path) == (expected if expected is not None else len(os.sched_getaffinity(0)))
