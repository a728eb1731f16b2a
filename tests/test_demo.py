"""The demo pipeline end to end: the demos `make demo` trained (`make test` trains them on a clean clone) are
evaluated on held-out data and built into archives.

The multilabel demo's members are written in three published checkpoint layouts and read back by
their `state_dict:` rules, so building it exercises the same path as a user's own checkpoints.
"""

from __future__ import annotations

import json
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from archive_scripts.build_archives import build_archive
from archive_scripts.demo_data import MULTILABEL_LABELS, make_multilabel_split, make_split
from archive_scripts.evaluate_demo import TTA_MODES, evaluate, plot, plot_corruptions, tta_table
from archive_scripts.faces_demo import CORRUPTIONS
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
    assert (ROOT / "artifacts" / "weights" / ".trained").exists(), (
        "the demos are not trained: run `make demo` (`make test` does)"
    )
    specs = load_ensembles(ROOT / "ensembles.yaml")
    results = evaluate([specs["shapes"], specs["multishape"]], 1000)
    binary = results["shapes"]["scores"]
    for name in ("resnet18", "strided", "tinycnn_gray"):
        assert binary[f"member {name}"]["accuracy"] >= 0.6, (name, binary)
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
    assert views["none: policy mean"]["macro AUROC"] == pytest.approx(
        sum(row["policy mean"] for row in auroc.values()) / len(auroc), abs=1e-12
    )
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
        [
            (".pt", {"strip_prefix": ["module."]}),
            (".ckpt", {"key": "state_dict", "strip_prefix": ["model."]}),
            (".safetensors", {}),
        ],
        key=str,
    )


def test_the_real_data_demos_evaluate_and_build(tmp_path: Path) -> None:
    """faces: published MTCNN weights on lfw_subset, clean and corrupted; digits: three kinds of member on real
    handwriting. Both build, with every package their members' code comes from pinned."""
    specs = load_ensembles(ROOT / "ensembles.yaml")
    results = evaluate([specs["faces"], specs["digits"]], 0)

    faces = results["faces"]
    assert faces["images"] == 200
    for member in ("pnet", "rnet", "onet"):
        assert faces["scores"][f"member {member}"]["accuracy"] >= 0.95, faces["scores"]
    blurred = faces["corrupted recall"]["blur 2"]
    assert blurred["any"] >= blurred["majority"] >= blurred["all"], blurred
    assert blurred["any"] > blurred["all"] + 0.3, blurred
    assert list(faces["corrupted accuracy"]) == [
        f"{name} {s:g}" for name, (_, _, strengths) in CORRUPTIONS.items() for s in strengths
    ]

    digits = results["digits"]
    assert digits["images"] == 450
    for member in ("timm_resnet", "vit", "tinycnn"):
        assert digits["scores"][f"member {member}"]["accuracy"] >= 0.9, digits["scores"]
    mean = digits["scores"]["policy mean"]
    assert mean["accuracy"] >= 0.98 and mean["top-1"] <= mean["top-2"] <= mean["top-3"], mean

    picture = tmp_path / "faces.png"
    plot_corruptions(faces["corrupted accuracy"], faces["scores"], ["pnet", "rnet", "onet"], picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    pins = {}
    for name in ("faces", "digits"):
        with zipfile.ZipFile(build_archive(specs[name], tmp_path / "store")) as packed:
            members = json.loads(packed.read("ensemble.json"))["ensemble"]["members"]
        pins[name] = {m["name"]: (m["arch"], m.get("requires"), m["output"]) for m in members}
    probabilities = {"kind": "probabilities"}
    assert pins["faces"] == {
        "pnet": ("facenet_pytorch.models.mtcnn:PNet", "facenet-pytorch==2.6.0", {"select": 1, **probabilities}),
        "rnet": ("facenet_pytorch.models.mtcnn:RNet", "facenet-pytorch==2.6.0", {"select": 1, **probabilities}),
        "onet": ("facenet_pytorch.models.mtcnn:ONet", "facenet-pytorch==2.6.0", {"select": 2, **probabilities}),
    }
    assert pins["digits"] == {
        "timm_resnet": ("timm:test_resnet", f"timm=={version('timm')}", {"kind": "logits"}),
        "vit": (
            "transformers:code/vit",
            f"transformers=={version('transformers')}",
            {"select": "logits", "kind": "logits"},
        ),
        "tinycnn": ("code/demo_models.py:TinyConvNet", None, {"kind": "logits"}),
    }
