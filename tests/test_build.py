"""Building archives: what goes into a .mar, and that a failed build leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from archive_scripts.build_archives import build_archive
from handlers.config.files import load_ensembles
from handlers.errors import IntegrityError, MemberLoadError
from handlers.weights.checkpoints import CONVERT
from handlers.weights.loading import sha256_of
from tests.conftest import source_spec
from tests.fixture_models import PoolNet

# Builds real archives with torch-model-archiver: seconds per test.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_archive_contents(test_store: Path) -> None:
    with zipfile.ZipFile(test_store / "trio.mar") as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("ensemble.json"))
        model_config = yaml.safe_load(archive.read("model-config.yaml"))
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        digests_ok = {
            rel: hashlib.sha256(archive.read(rel)).hexdigest() == digest for rel, digest in manifest["digests"].items()
        }
    assert {"ensemble_handler.py", "ensemble.json", "model-config.yaml", "code/fixture_models.py"} <= names
    assert {"members/mobile.safetensors", "members/pool_rgb.safetensors", "members/pool_gray.safetensors"} <= names
    shipped = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "handlers").rglob("*.py"))
    assert "handlers/answers/policies.py" in shipped
    assert sorted(name for name in names if name.startswith("handlers/")) == shipped
    assert sorted(rel for rel in manifest["digests"] if rel.startswith("handlers/")) == shipped
    assert not any("__pycache__" in name for name in names)
    assert mar_manifest["model"]["handler"] == "ensemble_handler.py"
    assert (mar_manifest["model"]["modelName"], mar_manifest["model"]["modelVersion"]) == ("trio", "2.1")
    assert model_config == {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 8,
        "maxBatchDelay": 300,
        "responseTimeout": 60,
    }
    assert set(digests_ok.values()) == {True}
    spec = source_spec(test_store, "trio")
    archived = ["members/mobile.safetensors", "members/pool_rgb.safetensors", "members/pool_gray.safetensors"]
    assert [m["weights"] for m in manifest["ensemble"]["members"]] == archived
    assert [m["sha256"] for m in manifest["ensemble"]["members"]] == [manifest["digests"][rel] for rel in archived]
    assert not any("state_dict" in m for m in manifest["ensemble"]["members"])
    assert manifest["sources"] == {
        m.name: {"file": m.weights, "sha256": sha256_of(spec.base_dir / m.weights), "state_dict": {}}
        for m in spec.members
    }
    assert set(manifest["build"]) == {
        "built_at",
        "python",
        "torch",
        "torchvision",
        "torchserve",
        "torch_model_archiver",
    }
    assert (manifest["build"]["torch"], manifest["build"]["torchserve"]) == (torch.__version__, "0.12.0")


def failing_build(
    ensemble_yaml: Callable[..., Path], tmp_path: Path, change: Callable[[dict, Path], None]
) -> tuple[Exception, Path]:
    """Build a good archive, break the source, rebuild; return the error and the store."""
    path = ensemble_yaml()
    store = tmp_path / "store"
    build_archive(load_ensembles(path)["trio"], store)
    good = (store / "trio.mar").read_bytes()
    doc = yaml.safe_load(path.read_text())
    change(doc["ensembles"]["trio"], path.parent)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises((IntegrityError, MemberLoadError)) as caught:
        build_archive(load_ensembles(path)["trio"], store)
    assert (store / "trio.mar").read_bytes() == good, "a failed rebuild must leave the previous archive intact"
    assert sorted(p.name for p in store.iterdir()) == ["trio.mar"], "no staging folder or partial archive is left"
    return caught.value, store


def test_declared_digest_mismatch_is_refused(ensemble_yaml: Callable[..., Path], tmp_path: Path) -> None:
    error, _ = failing_build(ensemble_yaml, tmp_path, lambda e, _: e["members"][1].update(sha256="0" * 64))
    assert str(error).startswith("member 'pool_rgb': pool_rgb.pt: sha256 ")
    assert str(error).endswith(f" != pinned {'0' * 64}")


def test_state_dict_that_does_not_fit_is_refused(ensemble_yaml: Callable[..., Path], tmp_path: Path) -> None:
    error, _ = failing_build(ensemble_yaml, tmp_path, lambda e, _: e["members"][1]["kwargs"].update(num_classes=4))
    assert str(error) == (
        "member 'pool_rgb': pool_rgb.pt: weights do not fit fixture_models.py:PoolNet (strict loading): "
        "0 missing, 0 unexpected, 2 of another shape\n"
        "  another shape (2): head.weight: file [3, 8], model [4, 8]; head.bias: file [3], model [4]\n"
        "Tensors of another shape mean another architecture: check the member's kwargs (num_classes, width, ...)."
    )


def test_pickled_whole_model_is_refused(ensemble_yaml: Callable[..., Path], tmp_path: Path) -> None:
    def pickle_whole_model(ensemble: dict, folder: Path) -> None:
        torch.save(torch.nn.Linear(2, 2), folder / "whole.pt")
        ensemble["members"][0]["weights"] = "whole.pt"

    error, _ = failing_build(ensemble_yaml, tmp_path, pickle_whole_model)
    assert str(error) == (
        "member 'mobile': whole.pt: holds pickled Python objects (torch.nn.modules.linear.Linear) that "
        "torch.load(weights_only=True) refuses, as in a whole model saved with torch.save(model) or a checkpoint "
        f"with custom classes; it is never loaded unsafely. {CONVERT}"
    )


def test_wrong_output_size_is_refused(ensemble_yaml: Callable[..., Path], tmp_path: Path) -> None:
    def four_outputs(ensemble: dict, folder: Path) -> None:
        torch.save(PoolNet(num_classes=4).state_dict(), folder / "pool_rgb.pt")
        ensemble["members"][1]["kwargs"]["num_classes"] = 4

    error, _ = failing_build(ensemble_yaml, tmp_path, four_outputs)
    assert str(error) == (
        "member 'pool_rgb': the scores are Tensor[2, 4] for a probe of 2 rows; its 3 labels need [N, 3] after "
        "trailing dimensions of size 1 are dropped; no part of its output has the shape [N, 3] its labels need "
        "(labels: names the member's own outputs)"
    )
