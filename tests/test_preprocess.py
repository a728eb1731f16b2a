"""Decoding untrusted bytes, EXIF orientation, and the one-tensor-per-input-spec transform."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from handlers.errors import InvalidImage, PayloadTooLarge
from handlers.manifest import InputSpec, Limits
from handlers.preprocess import batch_tensors, decode_image, to_tensor
from tests.conftest import image_bytes

HALF = InputSpec(size=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def encoded(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        pytest.param(b"", InvalidImage, "empty image: the request carried no bytes", id="empty"),
        pytest.param(b"%PDF-1.4 not an image", InvalidImage, "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)", id="not-image"),
        pytest.param(image_bytes(1, size=(64, 64))[:6210], InvalidImage, "PNG image is truncated or corrupt: image file is truncated", id="truncated-png"),
        pytest.param(
            image_bytes(1, size=(64, 64), fmt="JPEG")[:1544], InvalidImage,
            "JPEG image is truncated or corrupt: image file is truncated (145 bytes not processed)", id="truncated-jpeg",
        ),
        pytest.param(image_bytes(1, fmt="GIF"), InvalidImage, "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)", id="format-not-accepted"),
        pytest.param(image_bytes(1, size=(65, 64)), PayloadTooLarge, "image of 65x64 = 4160 pixels exceeds the limit of 4096", id="pixel-limit"),
    ],
)
def test_decode_rejects(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        decode_image(data, Limits(max_image_pixels=4096))
    assert str(caught.value) == message


def test_decode_accepts_each_configured_format() -> None:
    limits = Limits(formats=("JPEG", "PNG", "WEBP", "BMP", "GIF"))
    sizes = {fmt: decode_image(image_bytes(3, size=(20, 10), fmt=fmt), limits).size for fmt in limits.formats}
    assert sizes == {fmt: (20, 10) for fmt in limits.formats}


def test_exif_orientation_is_applied() -> None:
    """A photo stored sideways with orientation 6 decodes to the upright pixels."""
    upright = Image.frombytes("RGB", (6, 3), bytes(range(54)))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encoded(stored, exif=exif), Limits())
    assert decoded.size == (6, 3)
    assert decoded.tobytes() == upright.tobytes()


def test_to_tensor_normalises_exactly() -> None:
    image = Image.new("RGB", (4, 4), (255, 0, 255))
    tensor = to_tensor(image, HALF)
    assert tensor.shape == (3, 4, 4)
    assert tensor[:, 0, 0].tolist() == [1.0, -1.0, 1.0]


def test_center_crop_keeps_the_middle() -> None:
    """8x4 image, red | green | blue columns of width 2, 4, 2: a 4x4 centre crop is all green."""
    image = Image.new("RGB", (8, 4), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 2, 4))
    image.paste((0, 0, 255), (6, 0, 8, 4))
    tensor = to_tensor(image, InputSpec(size=(4, 4), resize="center_crop", mean=HALF.mean, std=HALF.std))
    assert tensor.flatten(1).unique(dim=1).tolist() == [[-1.0], [1.0], [-1.0]]


def test_stretch_resizes_to_height_width() -> None:
    tensor = to_tensor(Image.new("RGB", (8, 4)), InputSpec(size=(6, 10)))
    assert tensor.shape == (3, 6, 10)


def test_one_tensor_per_distinct_spec() -> None:
    gray = InputSpec(size=(5, 5), color_mode="L", mean=(0.5,), std=(0.5,))
    images = [Image.new("RGB", (9, 7), (255, 255, 255)), Image.new("RGB", (3, 3))]
    batches = batch_tensors(images, [HALF, gray, HALF])
    assert list(batches) == [HALF, gray]
    assert batches[HALF].shape == (2, 3, 4, 4)
    assert batches[gray].shape == (2, 1, 5, 5)
    assert batches[gray][:, 0, 0, 0].tolist() == [1.0, -1.0]


def test_greyscale_input_converts_to_rgb_for_rgb_members() -> None:
    batches = batch_tensors([Image.new("L", (4, 4), 255)], [HALF])
    assert torch.equal(batches[HALF], torch.ones(1, 3, 4, 4))
