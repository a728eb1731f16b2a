"""Members named by a model zoo (`timm:<model>`) or an installed package (`<package.module>:<Name>`), archived and
served by the real handler with their own scores; a worker without the pinned package refuses to load."""

from __future__ import annotations

import json
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml

from archive_scripts.build_archives import build_archive
from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.errors import ConfigError
from handlers.inputs.images import batch_tensors, decode_image
from tests.checkpoint_layouts import randomize
from tests.conftest import image_bytes, image_input, load_handler, serve

# Builds a real archive with torch-model-archiver and loads it in the real handler: seconds.
pytestmark = pytest.mark.slow
LABELS = ["cat", "dog", "fox"]


def write_one_member(folder: Path, name: str, size: int, member: dict, **ensemble: object) -> Path:
    """An ensembles.yaml declaring ensemble `name`: one member over LABELS at size x size; returns its path."""
    declared = {
        "version": "1.0",
        "task": "multiclass",
        "labels": LABELS,
        "input": {"size": [size, size]},
        **ensemble,
        "members": [member],
    }
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {name: declared}}, sort_keys=False))
    return path


def write_timm_ensemble(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A timm resnet10t saved as timm's own models save their state_dict, next to a torchvision member."""
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    published = randomize(timm.create_model("resnet10t", pretrained=False, num_classes=len(LABELS)), 3).eval()
    torch.save(published.state_dict(), folder / "resnet10t.pth")
    member = {
        "name": "tiny_resnet",
        "arch": "timm:resnet10t",
        "kwargs": {"num_classes": len(LABELS)},
        "weights": "resnet10t.pth",
    }
    return write_one_member(folder, "zoo", 40, member, execution={"plan": "eager"}), published


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
    shared = image_input(spec.input)
    rows = batch_tensors([decode_image(data, spec.limits) for data in images], [shared])[shared]
    with torch.inference_mode():
        expected = torch.softmax(published(rows), dim=-1)
    for (status, body, _), want in zip(replies, expected, strict=True):
        assert status == 200
        served = body["predictions"][0]["members"]["tiny_resnet"]
        assert served["label"] == LABELS[int(want.argmax())]
        assert served["score"] == pytest.approx(float(want.max()), abs=1e-4)


def write_package_ensemble(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A member named by an installed package's factory (`<package.module>:<Name>`), with weights saved as published."""
    folder.mkdir(parents=True)
    torch.manual_seed(4)
    published = randomize(torchvision.models.squeezenet1_1(num_classes=len(LABELS)), 4).eval()
    torch.save(published.state_dict(), folder / "squeeze.pth")
    member = {
        "name": "squeeze",
        "arch": "torchvision.models.squeezenet:squeezenet1_1",
        "kwargs": {"num_classes": len(LABELS)},
        "weights": "squeeze.pth",
    }
    return write_one_member(folder, "pkg", 48, member, execution={"plan": "eager"}), published


@pytest.fixture(scope="module")
def package_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("package")
    path, published = write_package_ensemble(root / "src")
    return path, build_archive(load_ensembles(path)["pkg"], root / "store"), published


def test_a_package_member_is_pinned_to_its_distribution_and_served_with_its_own_scores(
    package_archive: tuple[Path, Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, archive, published = package_archive
    with zipfile.ZipFile(archive) as packed:
        member = json.loads(packed.read("ensemble.json"))["ensemble"]["members"][0]
    assert (member["arch"], member["requires"]) == (
        "torchvision.models.squeezenet:squeezenet1_1",
        f"torchvision=={version('torchvision')}",
    )
    handler, context = load_handler(archive.parent, "pkg", tmp_path / "model")
    images = [image_bytes(seed, size=(50, 41)) for seed in (4, 5)]
    replies = serve(handler, context, [({"body": data}, {"Content-Type": "image/png"}) for data in images])
    spec = load_ensembles(path)["pkg"]
    shared = image_input(spec.input)
    rows = batch_tensors([decode_image(data, spec.limits) for data in images], [shared])[shared]
    with torch.inference_mode():
        expected = torch.softmax(published(rows), dim=-1)
    for (status, body, _), want in zip(replies, expected, strict=True):
        assert status == 200
        assert body["predictions"][0]["members"]["squeeze"]["score"] == pytest.approx(float(want.max()), abs=1e-4)


@pytest.mark.parametrize(
    ("requires", "says"),
    [
        pytest.param(
            "torchvision==0.28.0", f"this environment has torchvision {version('torchvision')}", id="other-version"
        ),
        pytest.param(
            "facenet-pytorch-nonexistent==2.6.0",
            "this environment does not have facenet-pytorch-nonexistent",
            id="missing",
        ),
    ],
)
def test_a_worker_without_the_pinned_package_refuses_with_the_pip_line(
    package_archive: tuple[Path, Path, torch.nn.Module], tmp_path: Path, requires: str, says: str
) -> None:
    with zipfile.ZipFile(package_archive[1]) as packed:
        packed.extractall(tmp_path)
    manifest = json.loads((tmp_path / "ensemble.json").read_text())
    manifest["ensemble"]["members"][0]["requires"] = requires
    (tmp_path / "ensemble.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as caught:
        Ensemble.from_model_dir(tmp_path, torch.device("cpu"))
    assert str(caught.value) == (
        f"ensemble.json: ensemble.members[0].requires: package member needs {requires}, and {says}; "
        f"install it where the ensemble runs: pip install '{requires}'"
    )


def write_hugging_face_ensemble(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny ViT image classifier as save_pretrained writes it (config.json, model.safetensors in the original key
    layout), whose id2label orders the classes differently from the ensemble."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(6)
    order = ["fox", "cat", "dog"]
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(order)),  # 3 labels: transformers 5 counts them from id2label
        label2id={label: i for i, label in enumerate(order)},
    )
    published = ViTForImageClassification(config).eval()
    with torch.no_grad():
        published.classifier.weight.mul_(20.0)
    published.save_pretrained(folder / "vit")
    return write_one_member(folder, "hf", 16, {"name": "vit", "arch": "transformers:vit"}), published


def test_a_hugging_face_folder_is_served_with_its_logits_in_the_ensemble_label_order(tmp_path: Path) -> None:
    path, published = write_hugging_face_ensemble(tmp_path / "src")
    spec = load_ensembles(path)["hf"]
    assert (spec.members[0].labels, spec.members[0].weights, spec.members[0].requires) == (
        ("fox", "cat", "dog"),
        "vit/model.safetensors",
        f"transformers=={version('transformers')}",
    )
    archive = build_archive(spec, tmp_path / "store")
    with zipfile.ZipFile(archive) as packed:
        manifest = json.loads(packed.read("ensemble.json"))
        assert json.loads(packed.read("code/vit/config.json"))["id2label"] == {"0": "fox", "1": "cat", "2": "dog"}
    assert manifest["ensemble"]["members"][0]["arch"] == "transformers:code/vit"
    assert manifest["ensemble"]["members"][0]["output"] == {"select": "logits", "kind": "logits"}
    handler, context = load_handler(tmp_path / "store", "hf", tmp_path / "model")
    images = [image_bytes(seed, size=(20, 18)) for seed in (7, 8, 9)]
    replies = serve(
        handler, context, [({"body": data, "top_k": b"3"}, {"Content-Type": "image/png"}) for data in images]
    )
    shared = image_input(spec.input)
    rows = batch_tensors([decode_image(data, spec.limits) for data in images], [shared])[shared]
    with torch.inference_mode():
        logits = published(rows).logits[:, [1, 2, 0]]  # fox, cat, dog -> cat, dog, fox
    expected = torch.softmax(logits, dim=-1)
    for (status, body, _), want in zip(replies, expected, strict=True):
        assert status == 200
        served = {entry["label"]: entry["score"] for entry in body["predictions"][0]["members"]["vit"]["top"]}
        assert served == pytest.approx(dict(zip(LABELS, want.tolist(), strict=True)), abs=1e-4)
