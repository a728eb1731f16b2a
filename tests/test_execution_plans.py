"""Execution plans: each plan reproduces eager, `auto` keeps only verified candidates, and unfaithful ones are
refused."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from handlers.config.files import load_ensembles, read_archive_manifest
from handlers.ensemble import Ensemble
from handlers.errors import MemberLoadError
from handlers.execution.plan_store import PLANS_FILE
from handlers.execution.plan_timing import time_plans
from handlers.execution.plans import AUTO_PLANS, ENGINE_PLANS, MIN_GAIN, TOLERANCE, prepare_cuda
from handlers.execution.schedule import PER_MEMBER, WITHIN
from handlers.inputs.images import decode_image
from tests.conftest import extract, image_bytes, instances, write_ensemble, write_tensor_ensemble
from tests.fixture_models import BranchyNet, LayoutSensitiveNet

# Times candidate plans on real modules: seconds per test.
pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def load(
    path: Path, name: str, execution: dict[str, Any] | None = None, member: dict[str, Any] | None = None
) -> Ensemble:
    """Ensemble `name` of `path` with `execution` set on the ensemble and `member` on its first member."""
    doc = yaml.safe_load(path.read_text())
    if execution is not None:
        doc["ensembles"][name]["execution"] = execution
    if member is not None:
        doc["ensembles"][name]["members"][0]["execution"] = member
    path.write_text(yaml.safe_dump(doc))
    return Ensemble.from_spec(load_ensembles(path)[name], CPU)


def images(ensemble: Ensemble, count: int) -> list[Any]:
    return [decode_image(image_bytes(seed), ensemble.spec.limits) for seed in range(count)]


def with_member(folder: Path, arch: str, module: torch.nn.Module) -> Path:
    """The test ensemble with its first member replaced by `module` of class `arch` (3 labels)."""
    path = write_ensemble(folder)
    torch.save(module.state_dict(), folder / "odd.pt")
    doc = yaml.safe_load(path.read_text())
    doc["ensembles"]["trio"]["members"][0] = {
        "name": "odd",
        "arch": arch,
        "kwargs": {"num_classes": 3},
        "weights": "odd.pt",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("plan", ["eager", "channels_last", "frozen", "frozen_channels_last"], ids=str)
def test_every_plan_reproduces_eager(tmp_path: Path, plan: str) -> None:
    eager = load(write_ensemble(tmp_path / "eager"), "trio", {"plan": "eager"})
    planned = load(write_ensemble(tmp_path / plan), "trio", {"plan": plan})
    assert [m["execution"]["plan"] for m in planned.describe()["members"]] == [plan] * 3
    for count in (1, 5):
        batch = images(eager, count)
        difference = (planned.probabilities(batch) - eager.probabilities(batch)).abs().max()
        assert float(difference) <= TOLERANCE


def test_auto_times_every_candidate_and_keeps_a_verified_faster_one(tmp_path: Path) -> None:
    ensemble = load(write_ensemble(tmp_path), "trio")
    described = ensemble.describe()
    schedule = described["execution_schedule"]
    assert described["execution"] == [
        {"members": [m["name"]], "fused": False, "plan": m["execution"]["plan"]} for m in described["members"]
    ]
    for member in described["members"]:
        chosen = member["execution"]
        # Loaded from ensembles.yaml, not an archive: there is no ONNX export to time (tests/test_engines.py times it).
        assert set(chosen["ms_per_call"]) == set(AUTO_PLANS) - set(ENGINE_PLANS)
        assert set(chosen["ms_per_call"]["eager"]) == {"1", "4"}  # One image, and batch 8 capped by micro_batch_size 4.
        assert chosen["rejected"] == {}
        assert chosen["plan"] in AUTO_PLANS
        # A plan slower than eager on its own is kept only when, every member on it, a served batch ran faster.
        assert (
            chosen["plan"] == "eager"
            or chosen["speedup_vs_eager"] >= round(MIN_GAIN, 2)
            or schedule["kept"] == f"all {chosen['plan']}"
        )
        assert chosen["load_s"] > 0
    estimated, timed = schedule["members_own_timings_vs_per_member"], schedule["ms_per_batch"]
    assert set(estimated) == {f"all {plan}" for plan in AUTO_PLANS if plan not in ENGINE_PLANS}
    assert set(timed) <= {PER_MEMBER} | {name for name, ratio in estimated.items() if ratio <= WITHIN}
    assert all(set(sizes) == {"1", "8"} for sizes in timed.values())  # One image, and a full batch of 8.
    if schedule["kept"] != PER_MEMBER:
        assert [m["execution"]["plan"] for m in described["members"]] == [schedule["kept"].removeprefix("all ")] * 3


def test_a_data_dependent_branch_is_never_traced(tmp_path: Path) -> None:
    path = with_member(tmp_path, "fixture_models.py:BranchyNet", BranchyNet(num_classes=3))
    ensemble = load(path, "trio")
    rejected = ensemble.describe()["members"][0]["execution"]["rejected"]
    assert set(rejected) == {"frozen", "frozen_channels_last"}
    assert all(
        reason.startswith("the trace may not hold for other inputs (data-dependent Python)")
        for reason in rejected.values()
    )
    with pytest.raises(MemberLoadError, match=r"^member 'odd': plan 'frozen': the trace may not hold for other inputs"):
        load(path, "trio", member={"plan": "frozen"})


def test_a_plan_that_changes_the_answer_is_refused(tmp_path: Path) -> None:
    path = with_member(tmp_path, "fixture_models.py:LayoutSensitiveNet", LayoutSensitiveNet(num_classes=3))
    ensemble = load(path, "trio")
    rejected = ensemble.describe()["members"][0]["execution"]["rejected"]
    assert set(rejected) == {"channels_last", "frozen_channels_last"}
    assert all(reason.startswith("probabilities differ from eager by ") for reason in rejected.values())
    assert ensemble.describe()["members"][0]["execution"]["plan"] in {"eager", "frozen"}
    with pytest.raises(
        MemberLoadError, match=r"^member 'odd': plan 'channels_last': probabilities differ from eager by .* at batch 1"
    ):
        load(path, "trio", member={"plan": "channels_last"})


def test_tensor_members_skip_channels_last(tmp_path: Path) -> None:
    path = write_tensor_ensemble(tmp_path)
    ensemble = load(path, "vectors")
    rejected = ensemble.describe()["members"][0]["execution"]["rejected"]
    reason = "channels_last needs 4-D (N, C, H, W) input; this member takes 3-D"
    assert rejected == {"channels_last": reason, "frozen_channels_last": reason}
    eager = load(path, "vectors", {"plan": "eager"})
    values = torch.from_numpy(instances(3, 6))
    assert float((ensemble.probabilities(values) - eager.probabilities(values)).abs().max()) <= TOLERANCE


def test_compiled_plan_is_opt_in_and_reproduces_eager(tmp_path: Path) -> None:
    path = write_tensor_ensemble(tmp_path)
    compiled = load(path, "vectors", {"plan": "compiled"})
    eager = load(path, "vectors", {"plan": "eager"})
    assert [m["execution"]["plan"] for m in compiled.describe()["members"]] == ["compiled", "compiled"]
    for count in (1, 3, 6):
        values = torch.from_numpy(instances(count, count))
        assert float((compiled.probabilities(values) - eager.probabilities(values)).abs().max()) <= TOLERANCE


def member_threads(model_dir: Path) -> int:
    return read_archive_manifest(model_dir).ensemble.batching.threads_per_worker(os.cpu_count() or 1)


def test_workers_of_one_model_share_the_measured_plans(test_store: Path, tmp_path: Path) -> None:
    """The first worker measures and records; the next rebuilds and verifies the same plans without timing them
    again."""
    model_dir = extract(test_store, "trio", tmp_path)
    first = Ensemble.from_model_dir(model_dir, CPU).describe()["members"]
    recorded = json.loads((model_dir / PLANS_FILE).read_text())
    assert recorded["context"] == {
        "torch": torch.__version__,
        "device": "cpu",
        "member_threads": member_threads(model_dir),
    }
    assert {m["name"]: m["execution"] for m in first} == recorded["members"]
    again = Ensemble.from_model_dir(model_dir, CPU).describe()["members"]
    assert [m["execution"]["measured_by"] for m in first] == ["this worker"] * 3
    assert [m["execution"]["measured_by"] for m in again] == ["another worker"] * 3
    assert [(m["execution"]["plan"], m["execution"]["ms_per_call"]) for m in again] == [
        (m["execution"]["plan"], m["execution"]["ms_per_call"]) for m in first
    ]
    assert all(set(ENGINE_PLANS) <= set(m["execution"]["ms_per_call"]) for m in first)
    assert [m["execution"]["timed_as"]["threads_at_once"] for m in first] == [member_threads(model_dir)] * 3


def _sleeper(seconds: float, lock: threading.Lock | None) -> Any:
    """A stand-in plan whose call takes `seconds` and, with a `lock`, lets one caller in at a time (one engine
    stream)."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with lock or contextlib.nullcontext():
            time.sleep(seconds)
        return batch

    return forward


def test_auto_times_plans_with_the_member_threads_calling_at_once() -> None:
    """A plan that is faster alone but queues its callers is the slower one once every member thread calls it."""
    forwards = {"queues": _sleeper(0.02, threading.Lock()), "side_by_side": _sleeper(0.03, None)}
    probes = {4: torch.zeros(4, 3)}
    alone = time_plans(forwards, probes, CPU, concurrency=1)
    together = time_plans(forwards, probes, CPU, concurrency=2)
    assert alone["queues"][4] < alone["side_by_side"][4]
    assert together["queues"][4] > together["side_by_side"][4]
    assert together["queues"][4] >= 40 and together["side_by_side"][4] < 40, together


@pytest.mark.parametrize("engine", ENGINE_PLANS)
def test_a_worker_rebuilds_an_engine_plan_another_worker_chose(test_store: Path, tmp_path: Path, engine: str) -> None:
    model_dir = extract(test_store, "trio", tmp_path)
    Ensemble.from_model_dir(model_dir, CPU)
    saved = json.loads((model_dir / PLANS_FILE).read_text())
    saved["members"]["mobile"]["plan"] = engine
    (model_dir / PLANS_FILE).write_text(json.dumps(saved))
    members = {m["name"]: m["execution"] for m in Ensemble.from_model_dir(model_dir, CPU).describe()["members"]}
    assert (members["mobile"]["plan"], members["mobile"]["measured_by"]) == (engine, "another worker")


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(lambda saved: "not json", id="garbage"),
        pytest.param(lambda saved: {**saved, "context": {**saved["context"], "torch": "0.0"}}, id="other-torch"),
        pytest.param(
            lambda saved: {**saved, "members": {"mobile": {**saved["members"]["mobile"], "plan": "compiled"}}},
            id="plan-not-allowed",
        ),
        pytest.param(
            lambda saved: {
                **saved,
                "members": {"mobile": {**saved["members"]["mobile"], "ms_per_call": {"eager": {"3": 1.0}}}},
            },
            id="other-sizes",
        ),
        pytest.param(
            lambda saved: {
                **saved,
                "members": {"mobile": {**saved["members"]["mobile"], "timed_as": {"threads_at_once": 7}}},
            },
            id="timed-with-other-threads",
        ),
    ],
)
def test_a_record_that_does_not_apply_is_measured_afresh(test_store: Path, tmp_path: Path, record: Any) -> None:
    model_dir = extract(test_store, "trio", tmp_path)
    Ensemble.from_model_dir(model_dir, CPU)
    saved = json.loads((model_dir / PLANS_FILE).read_text())
    changed = record(saved)
    (model_dir / PLANS_FILE).write_text(changed if isinstance(changed, str) else json.dumps(changed))
    members = {m["name"]: m["execution"] for m in Ensemble.from_model_dir(model_dir, CPU).describe()["members"]}
    assert members["mobile"]["measured_by"] == "this worker"
    assert members["mobile"]["plan"] in AUTO_PLANS


def test_prepare_cuda_turns_off_tf32_and_torchscript_gpu_fusion() -> None:
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch._C._jit_texpr_fuser_enabled(),
    )
    try:
        prepare_cuda()
        assert (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch._C._jit_texpr_fuser_enabled(),
        ) == (False, False, False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch._C._jit_set_texpr_fuser_enabled(saved[2])
