"""The demo pipeline end to end: the demos `make demo` trained (`make test` trains them on a clean clone) are
evaluated on held-out data and built into archives.

The multilabel demo's members are written in three published checkpoint layouts and read back by
their `state_dict:` rules, so building it exercises the same path as a user's own checkpoints.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from archive_scripts.build_archives import build_archive
from archive_scripts.demo_data import MULTILABEL_LABELS, make_multilabel_split, make_split
from archive_scripts.evaluate_demo import TTA_MODES, evaluate, plot, tta_table
from handlers.config.files import load_ensembles
from handlers.weights.loading import sha256_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_same_seed_same_data() -> None:
    first, again = make_split(6, 99), make_split(6, 99)
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]
    assert [s.label for s in first] == [0, 1, 0, 1, 0, 1]
    multi, multi_again = make_multilabel_split(6, 99), make_multilabel_split(6, 99)
    assert [s.image.tobytes() for s in multi] == [s.image.tobytes() for s in multi_again]
    assert [s.labels for s in multi] == [s.labels for s in multi_again]
    assert {len(s.labels) for s in multi} == {len(MULTILABEL_LABELS)}


def test_trained_demos_evaluate_and_build(tmp_path: Path) -> None:
    assert (ROOT / "artifacts" / "weights" / ".trained").exists(), "the demos are not trained: run `make demo` (`make test` does)"
    specs = load_ensembles(ROOT / "ensembles.yaml")
    results = evaluate([specs["shapes"], specs["multishape"]], 1000)
    binary = results["shapes"]["scores"]
    for member in ("resnet18", "strided", "tinycnn_gray"):
        assert binary[f"member {member}"]["accuracy"] >= 0.6, (member, binary)
    recall = {name: binary[f"policy {name}"]["recall"] for name in ("any", "majority", "all")}
    assert recall["any"] > recall["majority"] > recall["all"], binary

    auroc, macro = results["multishape"]["auroc"], results["multishape"]["macro"]
    assert list(auroc) == list(MULTILABEL_LABELS)
    for member in specs["multishape"].members:
        assert min(row[member.name] for row in auroc.values()) >= 0.65, (member.name, auroc)
        assert macro[f"member {member.name}"]["f1"] >= 0.6, (member.name, macro)
    multi_recall = {name: macro[f"policy {name}"]["recall"] for name in ("any", "majority", "all")}
    assert multi_recall["any"] > multi_recall["majority"] > multi_recall["all"], macro

    views = tta_table(specs["multishape"], 1000)
    rows = [f"member {m.name}" for m in specs["multishape"].members] + ["policy mean"]
    assert list(views) == [f"{tta}: {row}" for tta in TTA_MODES for row in rows]
    assert views["none: policy mean"]["macro F1"] == pytest.approx(macro["policy mean"]["f1"], abs=1e-3)
    assert views["none: policy mean"]["macro AUROC"] == pytest.approx(sum(row["policy mean"] for row in auroc.values()) / len(auroc), abs=1e-12)
    assert all(0.5 < value <= 1.0 for row in views.values() for value in row.values()), views

    picture = tmp_path / "pr.png"
    plot({"shapes": binary, "multishape": macro}, picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for name in ("shapes", "multishape"):
        archive = build_archive(specs[name], tmp_path / "store")
        with zipfile.ZipFile(archive) as packed:
            sources = json.loads(packed.read("ensemble.json"))["sources"]
        assert sources == {
            m.name: {"file": m.weights, "sha256": sha256_of(ROOT / m.weights), "state_dict": m.state_dict.to_dict()}
            for m in specs[name].members
        }
    layouts = {m.name: (Path(m.weights).suffix, m.state_dict.to_dict()) for m in specs["multishape"].members}
    assert sorted(layouts.values(), key=str) == sorted(
        [(".pt", {"strip_prefix": ["module."]}), (".ckpt", {"key": "state_dict", "strip_prefix": ["model."]}), (".safetensors", {})],
        key=str,
    )
