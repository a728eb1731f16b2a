"""The demo pipeline end to end: generate data, train the members, evaluate them, build the archive."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.demo_data import make_split
from archive_scripts.evaluate_demo import evaluate
from archive_scripts.train_demo import train
from handlers.ensemble import Ensemble
from handlers.manifest import load_ensembles

pytestmark = pytest.mark.slow


def test_same_seed_same_data() -> None:
    first, again = make_split(6, 99), make_split(6, 99)
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]
    assert [s.label for s in first] == [0, 1, 0, 1, 0, 1]


def test_demo_trains_evaluates_and_builds(tmp_path: Path) -> None:
    shutil.copyfile("ensembles.yaml", tmp_path / "ensembles.yaml")
    (tmp_path / "archive_scripts").mkdir()
    shutil.copyfile("archive_scripts/demo_models.py", tmp_path / "archive_scripts" / "demo_models.py")
    spec = load_ensembles(tmp_path / "ensembles.yaml", check_files=False)["shapes"]

    seconds = train(spec, threads=torch.get_num_threads())
    assert list(seconds) == ["resnet18", "strided", "tinycnn_gray"]

    table = evaluate(Ensemble.from_spec(load_ensembles(tmp_path / "ensembles.yaml")["shapes"], torch.device("cpu")), 1000)
    for member in ("resnet18", "strided", "tinycnn_gray"):
        assert table[f"member {member}"]["accuracy"] >= 0.6, (member, table)
    recall = {name: table[f"policy {name}"]["recall"] for name in ("any", "majority", "all")}
    assert recall["any"] > recall["majority"] > recall["all"], table

    archive = build_archive(load_ensembles(tmp_path / "ensembles.yaml")["shapes"], tmp_path / "store")
    assert archive == tmp_path / "store" / "shapes.mar"
