"""Test-time augmentation: each image's views run in the same forward calls, and a member scores the mean over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec, InputSpec, Limits
from handlers.ensemble import Ensemble
from handlers.inputs.images import batch_tensors, decode_image, to_tensor
from handlers.weights.loading import load_member
from tests.conftest import image_bytes, image_input

LIMITS = Limits()
IMAGES = [decode_image(image_bytes(seed, size=(45, 38)), LIMITS) for seed in (51, 52, 53)]


def spec_with(
    ensemble_yaml: Callable[..., Path], ensemble_tta: str, member_tta: dict[int, str] | None = None
) -> EnsembleSpec:
    path = ensemble_yaml()
    doc = yaml.safe_load(path.read_text())
    trio = doc["ensembles"]["trio"]
    trio["input"]["tta"] = ensemble_tta
    for index, tta in (member_tta or {}).items():
        trio["members"][index].setdefault("input", {})["tta"] = tta
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_ensembles(path)["trio"].with_plan("eager")


def crops(image: Image.Image, spec: InputSpec) -> list[torch.Tensor]:
    """The four corners and the centre, cut by hand with PIL from the image resized to load_size."""
    (height, width), (big_h, big_w) = spec.size, spec.load_size
    resized = image.convert(spec.color_mode).resize((big_w, big_h), Image.Resampling.BILINEAR)
    top, left = round((big_h - height) / 2), round((big_w - width) / 2)
    corners = [(0, 0), (0, big_w - width), (big_h - height, 0), (big_h - height, big_w - width), (top, left)]
    plain = replace(spec, tta="none")
    return [to_tensor(resized.crop((x, y, x + width, y + height)), plain) for y, x in corners]


def expected_views(image: Image.Image, spec: InputSpec) -> torch.Tensor:
    """One image's views, built without handlers.inputs.images.views."""
    if spec.tta == "none":
        return to_tensor(image.convert(spec.color_mode), spec)[None]
    if spec.tta == "hflip":
        plain = to_tensor(image.convert(spec.color_mode), spec)
        return torch.stack([plain, plain.flip(-1)])
    views = crops(image, spec)
    if spec.tta == "ten_crop":
        views += crops(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), spec)
    return torch.stack(views)


@pytest.mark.parametrize("tta", ["none", "hflip", "five_crop", "ten_crop"], ids=str)
def test_views_are_the_resized_image_cut_and_mirrored(tta: str) -> None:
    spec = InputSpec(size=(32, 28), tta=tta)
    [rows] = batch_tensors(IMAGES, [spec]).values()
    assert rows.shape == (len(IMAGES) * spec.views, 3, 32, 28)
    assert spec.load_size == {"none": (32, 28), "hflip": (32, 28)}.get(tta, (37, 32))
    for i, image in enumerate(IMAGES):
        torch.testing.assert_close(
            rows[i * spec.views : (i + 1) * spec.views], expected_views(image, spec), atol=1e-6, rtol=0
        )


def test_specs_differing_only_in_views_share_one_resize() -> None:
    plain, flipped = InputSpec(size=(32, 32)), InputSpec(size=(32, 32), tta="hflip")
    five, ten = InputSpec(size=(32, 32), tta="five_crop"), InputSpec(size=(32, 32), tta="ten_crop")
    rows = batch_tensors(IMAGES, [plain, flipped, flipped, five, ten])
    assert list(rows) == [plain, flipped, five, ten]
    assert torch.equal(rows[flipped][0::2], rows[plain])
    assert torch.equal(rows[ten].unflatten(0, (3, 10))[:, :5], rows[five].unflatten(0, (3, 5)))


def member_probabilities(spec: EnsembleSpec, index: int, images: list[Image.Image]) -> torch.Tensor:
    """[image, label]: the member run on each image's views one view at a time, softmax, then the mean."""
    member = spec.members[index]
    module, _ = load_member(member, spec.base_dir)
    given = image_input(spec.member_input(member))
    with torch.inference_mode():
        return torch.stack(
            [
                torch.stack([torch.softmax(module(view[None]), dim=-1)[0] for view in expected_views(image, given)])
                .double()
                .mean(dim=0)
                for image in images
            ]
        )


@pytest.mark.parametrize("tta", ["hflip", "five_crop", "ten_crop"], ids=str)
def test_member_scores_are_the_mean_over_views(ensemble_yaml: Callable[..., Path], tta: str) -> None:
    spec = spec_with(ensemble_yaml, tta)
    probs = Ensemble.from_spec(spec, torch.device("cpu")).probabilities(IMAGES)
    for index in range(len(spec.members)):
        torch.testing.assert_close(probs[index], member_probabilities(spec, index, IMAGES), atol=1e-6, rtol=0)


def test_one_member_with_its_own_views(ensemble_yaml: Callable[..., Path]) -> None:
    spec = spec_with(ensemble_yaml, "none", {1: "ten_crop"})
    plain = spec_with(ensemble_yaml, "none")
    probs = Ensemble.from_spec(spec, torch.device("cpu")).probabilities(IMAGES)
    without = Ensemble.from_spec(plain, torch.device("cpu")).probabilities(IMAGES)
    assert torch.equal(probs[[0, 2]], without[[0, 2]])
    torch.testing.assert_close(probs[1], member_probabilities(spec, 1, IMAGES), atol=1e-6, rtol=0)
    assert not torch.allclose(probs[1], without[1], atol=1e-3)


@pytest.mark.parametrize("parallelism", [1, 2], ids=lambda p: f"threads{p}")
def test_views_of_a_batch_split_back_per_request(ensemble_yaml: Callable[..., Path], parallelism: int) -> None:
    spec = spec_with(ensemble_yaml, "five_crop", {2: "hflip"})
    ensemble = Ensemble.from_spec(
        replace(spec, batching=replace(spec.batching, micro_batch_size=3)), torch.device("cpu"), parallelism=parallelism
    )
    encoded = [image_bytes(seed, size=(45, 38)) for seed in (51, 52, 53)]
    rows: list[dict[str, Any]] = [
        {"body": encoded[0], "members": b"pool_gray"},
        {"body": encoded[1]},
        {"body": encoded[2], "members": b"mobile"},
    ]
    answer = ensemble.answer_batch([ensemble.prepare(row, {}) for row in rows])
    alone = [Ensemble.from_spec(spec, torch.device("cpu")).probabilities([image]) for image in IMAGES]
    for reply, probs, members in zip(answer.replies, alone, (["pool_gray"], None, ["mobile"]), strict=True):
        assert reply.status == 200
        want = ensemble.render(probs, ensemble.spec.policy, members=members)
        assert_close_answers(reply.body, want)


def assert_close_answers(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Same labels and members, and every score within 1e-6 (a batch's slices run at other sizes than one image
    alone)."""
    assert got["answered_by"] == want["answered_by"]
    for got_view, want_view in zip(got["predictions"], want["predictions"], strict=True):
        assert got_view["label"] == want_view["label"]
        assert got_view["score"] == pytest.approx(want_view["score"], abs=1e-6)
        assert list(got_view["members"]) == list(want_view["members"])
        for name, member in want_view["members"].items():
            assert got_view["members"][name]["score"] == pytest.approx(member["score"], abs=1e-6)
