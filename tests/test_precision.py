"""Lossy precisions, opt-in: measured against fp32 on calibration images at build time, recorded in the manifest,
refused below min_agreement, served by their engines, and back to fp32 (saying why) on a CPU that lacks them."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import yaml

from archive_scripts.build_archives import build_archive, forgiven_lines
from handlers.config.files import load_ensembles, read_archive_manifest
from handlers.ensemble import Ensemble
from handlers.errors import ConfigError
from handlers.execution import plans
from handlers.execution.engines import precision_unsupported
from handlers.inputs.images import decode_image
from tests.conftest import image_bytes
from tests.fixture_models import KnifeEdgeNet, PoolNet

HERE = Path(__file__).parent
CPU = torch.device("cpu")
CALIBRATION_IMAGES = 24


def lossy_ensemble(folder: Path, members: list[dict[str, Any]], modules: dict[str, torch.nn.Module]) -> Path:
    """An ensembles.yaml of `members` with their weights and a folder of calibration images; returns its path."""
    folder.mkdir(parents=True)
    shutil.copyfile(HERE / "fixture_models.py", folder / "fixture_models.py")
    for name, module in modules.items():
        torch.save(module.state_dict(), folder / f"{name}.pt")
    (folder / "calibration").mkdir()
    for seed in range(CALIBRATION_IMAGES):
        (folder / "calibration" / f"{seed:02d}.png").write_bytes(image_bytes(seed, size=(40, 30)))
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": ["a", "b"],
        "input": {"size": [32, 32]},
        "members": members,
    }
    (folder / "ensembles.yaml").write_text(yaml.safe_dump({"ensembles": {"lossy": ensemble}}, sort_keys=False))
    return folder / "ensembles.yaml"


@pytest.fixture(scope="module")
def lossy_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-member archive: a torchvision squeezenet in bf16 and a PoolNet in int8, calibrated on 24 images."""
    root = tmp_path_factory.mktemp("lossy")
    torch.manual_seed(3)
    modules = {"squeeze": torchvision.models.squeezenet1_1(num_classes=2), "pool": PoolNet(num_classes=2)}
    calibrated = {"calibration": "calibration", "min_agreement": 0.5}
    members = [
        {
            "name": "squeeze",
            "arch": "torchvision:squeezenet1_1",
            "kwargs": {"num_classes": 2},
            "weights": "squeeze.pt",
            "execution": {"precision": "bf16", **calibrated},
        },
        {
            "name": "pool",
            "arch": "fixture_models.py:PoolNet",
            "kwargs": {"num_classes": 2},
            "weights": "pool.pt",
            "execution": {"precision": "int8", **calibrated},
        },
    ]
    spec = load_ensembles(lossy_ensemble(root / "src", members, modules))["lossy"]
    return build_archive(spec, root / "store")


@pytest.mark.slow
def test_the_build_measures_each_lossy_precision_and_archives_the_int8_export(
    lossy_archive: Path, tmp_path: Path
) -> None:
    with zipfile.ZipFile(lossy_archive) as packed:
        packed.extractall(tmp_path)
    manifest = read_archive_manifest(tmp_path)
    measured = {member: record["precision"] for member, record in manifest.engines.items()}
    assert {member: (m["precision"], m["images"]) for member, m in measured.items()} == {
        "squeeze": ("bf16", CALIBRATION_IMAGES),
        "pool": ("int8", CALIBRATION_IMAGES),
    }
    assert all(0.5 <= m["agreement"] <= 1.0 for m in measured.values())
    assert measured["pool"]["largest_difference"] > 0  # int8 is lossy on every CPU; bf16 only where the CPU runs it.
    assert (measured["squeeze"]["largest_difference"] > 1e-4) == (precision_unsupported("bf16") is None)
    assert manifest.engines["pool"]["int8"] == "members/pool.int8.onnx"
    assert "members/pool.int8.onnx" in manifest.digests
    assert [line for line in forgiven_lines(lossy_archive) if "calibration images" in line] == [
        f"member {member!r}: {m['precision']} agrees with fp32 on {m['agreement']:.4f} of {CALIBRATION_IMAGES} "
        f"calibration images (largest probability difference {m['largest_difference']:g})"
        for member, m in measured.items()
    ]


@pytest.mark.slow
def test_a_worker_serves_each_member_on_an_engine_of_its_precision_and_shows_the_measurement(
    lossy_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with zipfile.ZipFile(lossy_archive) as packed:
        packed.extractall(tmp_path)
    # As on a CPU with the features (this one has AMX); without them the engines emulate the precision, as tested.
    monkeypatch.setattr(
        plans,
        "precision_unsupported",
        lambda precision: precision_unsupported(precision, frozenset({"amx_bf16", "amx_int8"})),
    )
    ensemble = Ensemble.from_model_dir(tmp_path, CPU)
    described = ensemble.plan_choices()
    assert described["squeeze"]["plan"] == "openvino_bf16"
    assert described["pool"]["plan"] in ("onnxruntime_int8", "openvino_int8")
    manifest = read_archive_manifest(tmp_path)
    assert {member: choice["precision"] for member, choice in described.items()} == {
        member: record["precision"] for member, record in manifest.engines.items()
    }
    probabilities = ensemble.probabilities([decode_image(image_bytes(seed), ensemble.spec.limits) for seed in range(3)])
    assert probabilities.shape == (2, 3, 2)
    assert torch.allclose(probabilities.sum(dim=-1), torch.ones(2, 3, dtype=probabilities.dtype), atol=1e-2)


@pytest.mark.slow
def test_a_cpu_without_the_precision_serves_fp32_and_says_why(
    lossy_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with zipfile.ZipFile(lossy_archive) as packed:
        packed.extractall(tmp_path)
    monkeypatch.setattr(
        plans, "precision_unsupported", lambda precision: precision_unsupported(precision, frozenset({"avx2", "fma"}))
    )
    described = Ensemble.from_model_dir(tmp_path, CPU).plan_choices()
    assert {member: choice["precision"] for member, choice in described.items()} == {
        "squeeze": {
            "precision": "fp32",
            "fallback": (
                "bf16 needs one of the CPU features avx512_bf16, amx_bf16 to run faster than fp32, and "
                "this CPU has none"
            ),
        },
        "pool": {
            "precision": "fp32",
            "fallback": (
                "int8 needs one of the CPU features avx512_vnni, avx_vnni, amx_int8 to run faster than "
                "fp32, and this CPU has none"
            ),
        },
    }
    assert not {choice["plan"] for choice in described.values()} & {
        "openvino_bf16",
        "onnxruntime_int8",
        "openvino_int8",
    }


@pytest.mark.parametrize(
    ("flags", "precision", "expected"),
    [
        pytest.param({"avx512_bf16"}, "bf16", None, id="avx512-bf16"),
        pytest.param({"amx_bf16"}, "bf16", None, id="amx-bf16"),
        pytest.param({"avx_vnni"}, "int8", None, id="avx-vnni"),
        pytest.param({"avx2"}, "fp32", None, id="fp32-anywhere"),
        pytest.param(
            {"avx2", "avx512_vnni"},
            "bf16",
            "bf16 needs one of the CPU features avx512_bf16, amx_bf16 to run faster than fp32, and this CPU has none",
            id="vnni-is-not-bf16",
        ),
    ],
)
def test_which_cpus_run_a_precision(flags: set[str], precision: str, expected: str | None) -> None:
    assert precision_unsupported(precision, frozenset(flags)) == expected


@pytest.mark.slow
def test_a_precision_that_flips_labels_is_refused_at_build_time_with_both_numbers(tmp_path: Path) -> None:
    torch.manual_seed(5)
    knife = KnifeEdgeNet()
    with torch.no_grad():
        knife.conv.weight[1] = knife.conv.weight[0] + 1e-4 * torch.randn_like(knife.conv.weight[0])
        assert knife.conv.bias is not None
        knife.conv.bias[1] = knife.conv.bias[0]
    member = {
        "name": "knife",
        "arch": "fixture_models.py:KnifeEdgeNet",
        "weights": "knife.pt",
        "execution": {"precision": "int8", "calibration": "calibration"},
    }
    spec = load_ensembles(lossy_ensemble(tmp_path / "src", [member], {"knife": knife}))["lossy"]
    with pytest.raises(ConfigError) as caught:
        build_archive(spec, tmp_path / "store")
    pattern = (
        r"members 'knife': precision int8 agrees with fp32 on (0\.\d{4}) of 24 calibration images, below "
        r"execution\.min_agreement 0\.99 \(largest probability difference (\S+)\); serve it in fp32, or lower "
        r"min_agreement if that is acceptable"
    )
    match = re.fullmatch(pattern, str(caught.value))
    assert match is not None, str(caught.value)
    assert float(match.group(1)) < 0.99 and float(match.group(2)) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("execution", "message"),
    [
        pytest.param(
            {"precision": "int8"},
            "members 'pool': precision int8 needs execution.calibration: a folder of images like the ones it "
            "will serve",
            id="no-calibration",
        ),
        pytest.param(
            {"precision": "bf16", "calibration": "missing"},
            "execution.calibration: {src}/missing is not a folder; give a folder of images the member is meant to see",
            id="missing-folder",
        ),
    ],
)
def test_a_lossy_precision_without_calibration_images_is_refused(
    tmp_path: Path, execution: dict[str, str], message: str
) -> None:
    torch.manual_seed(1)
    member = {
        "name": "pool",
        "arch": "fixture_models.py:PoolNet",
        "kwargs": {"num_classes": 2},
        "weights": "pool.pt",
        "execution": execution,
    }
    spec = load_ensembles(lossy_ensemble(tmp_path / "src", [member], {"pool": PoolNet(num_classes=2)}))["lossy"]
    with pytest.raises(ConfigError) as caught:
        build_archive(spec, tmp_path / "store")
    assert str(caught.value) == message.format(src=tmp_path / "src")


def test_a_lossy_precision_with_a_fixed_plan_is_refused_where_it_is_written(tmp_path: Path) -> None:
    member = {
        "name": "pool",
        "arch": "fixture_models.py:PoolNet",
        "kwargs": {"num_classes": 2},
        "weights": "pool.pt",
        "execution": {"precision": "bf16", "plan": "frozen", "calibration": "calibration"},
    }
    path = lossy_ensemble(tmp_path / "src", [member], {"pool": PoolNet(num_classes=2)})
    with pytest.raises(ConfigError) as caught:
        load_ensembles(path)
    assert str(caught.value).endswith(
        "ensembles.lossy.members[0].execution.plan: precision bf16 runs on the engines measured for it: leave "
        "plan at auto, not 'frozen'"
    )
