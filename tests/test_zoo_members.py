"""Members named by a model zoo (`timm:<model>`), archived and served by the real handler with their own scores."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import yaml

from archive_scripts.build_archives import build_archive
from handlers.config.files import load_ensembles
from handlers.inputs.images import batch_tensors, decode_image
from tests.checkpoint_layouts import randomize
from tests.conftest import image_bytes, load_handler, serve

# Builds a real archive with torch-model-archiver and loads it in the real handler: seconds.
pytestmark = pytest.mark.slow
LABELS = ["cat", "dog", "fox"]


def write_timm_ensemble(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A timm resnet10t saved as timm's own models save their state_dict, next to a torchvision member."""
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    published = randomize(timm.create_model("resnet10t", pretrained=False, num_classes=len(LABELS)), 3).eval()
    torch.save(published.state_dict(), folder / "resnet10t.pth")
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": LABELS,
        "input": {"size": [40, 40]},
        "execution": {"plan": "eager"},
        "members": [
            {"name": "tiny_resnet", "arch": "timm:resnet10t", "kwargs": {"num_classes": len(LABELS)}, "weights": "resnet10t.pth"},
        ],
    }
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {"zoo": ensemble}}, sort_keys=False))
    return path, published


def test_a_timm_member_is_served_with_the_scores_of_the_published_module(tmp_path: Path) -> None:
    path, published = write_timm_ensemble(tmp_path / "src")
    spec = load_ensembles(path)["zoo"]
    archive = build_archive(spec, tmp_path / "store")
    with zipfile.ZipFile(archive) as packed:
        manifest = json.loads(packed.read("ensemble.json"))
    assert manifest["ensemble"]["members"][0]["arch"] == "timm:resnet10t"
    handler, context = load_handler(tmp_path / "store", "zoo", tmp_path / "model")
    images = [image_bytes(seed, size=(57, 33)) for seed in (1, 2, 3)]
    replies = serve(handler, context, [({"body": data}, {"Content-Type": "image/png"}) for data in images])
    rows = batch_tensors([decode_image(data, spec.limits) for data in images], [spec.input])[spec.input]
    with torch.inference_mode():
        expected = torch.softmax(published(rows), dim=-1)
    for (status, body, _), want in zip(replies, expected, strict=True):
        assert status == 200
        served = body["predictions"][0]["members"]["tiny_resnet"]
        assert served["label"] == LABELS[int(want.argmax())]
        assert served["score"] == pytest.approx(float(want.max()), abs=1e-4)
