"""Decoding untrusted bytes, EXIF orientation, and the one-tensor-per-input-spec transform."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from bench.bad_inputs import header_only_png
from handlers.config.specs import InputSpec, Limits
from handlers.errors import InvalidImage, PayloadTooLarge
from handlers.inputs.images import batch_tensors, decode_image, to_tensor
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
        pytest.param(
            b"%PDF-1.4 not an image",
            InvalidImage,
            "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)",
            id="not-image",
        ),
        pytest.param(
            image_bytes(1, size=(64, 64))[:6210],
            InvalidImage,
            "PNG image is truncated or corrupt: image file is truncated",
            id="truncated-png",
        ),
        pytest.param(
            image_bytes(1, size=(64, 64), fmt="JPEG")[:1544],
            InvalidImage,
            "JPEG image is truncated or corrupt: image file is truncated (145 bytes not processed)",
            id="truncated-jpeg",
        ),
        pytest.param(
            image_bytes(1, fmt="GIF"),
            InvalidImage,
            "not a decodable image of an accepted format (JPEG, PNG, WEBP, BMP)",
            id="format-not-accepted",
        ),
        pytest.param(
            image_bytes(1, size=(65, 64)),
            PayloadTooLarge,
            "image of 65x64 = 4160 pixels exceeds the limit of 4096",
            id="pixel-limit",
        ),
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


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        pytest.param(
            10000,
            10000,
            "image exceeds the pixel limit: Image size (100000000 pixels) exceeds limit of 89478485 pixels",
            id="10000x10000-pillow-warns",
        ),
        pytest.param(
            20000,
            10000,
            "image exceeds the pixel limit: Image size (200000000 pixels) exceeds limit of 178956970 pixels",
            id="20000x10000-pillow-refuses",
        ),
        pytest.param(
            5000, 4000, "image of 5000x4000 = 20000000 pixels exceeds the limit of 16000000", id="over-our-limit"
        ),
    ],
)
def test_pixel_bombs_are_refused_from_the_header(width: int, height: int, message: str) -> None:
    data = header_only_png(width, height)
    assert len(data) < 300
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(data, Limits())
    assert str(caught.value).startswith(message)


def pixels(image: Image.Image) -> list[object]:
    return list(image.get_flattened_data())


def test_palette_transparency_is_composited_over_white() -> None:
    """Index 0 is transparent and hides black; index 1 is opaque red."""
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putpixel((1, 0), 1)
    decoded = decode_image(encoded(image, transparency=0), Limits())
    assert (decoded.mode, pixels(decoded)) == ("RGB", [(255, 255, 255), (255, 0, 0)])


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        pytest.param(
            "RGBA",
            [(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)],
            [(255, 255, 255), (10, 20, 30), (127, 127, 127)],
            id="rgba",
        ),
        pytest.param(
            "LA", [(40, 0), (40, 255), (0, 128)], [(255, 255, 255), (40, 40, 40), (127, 127, 127)], id="gray-alpha"
        ),
    ],
)
def test_alpha_is_composited_over_white(
    mode: str, values: list[tuple[int, ...]], expected: list[tuple[int, ...]]
) -> None:
    image = Image.new(mode, (3, 1))
    image.putdata(values)
    decoded = decode_image(encoded(image), Limits())
    assert (decoded.mode, pixels(decoded)) == ("RGB", expected)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (5, 1))
    image.putdata([0, 257, 32896, 40000, 65535])
    decoded = decode_image(encoded(image), Limits())
    assert (decoded.mode, pixels(decoded)) == ("L", [0, 1, 128, 156, 255])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        pytest.param(
            Image.new("I", (2, 2), 70000),
            "TIFF image has I pixels outside 0..65535; send 8- or 16-bit images",
            id="32-bit-int",
        ),
        pytest.param(
            Image.new("F", (2, 2), 0.5), "TIFF image has floating-point pixels; send 8- or 16-bit images", id="float"
        ),
    ],
)
def test_wide_pixels_that_cannot_be_scaled_are_refused(image: Image.Image, message: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(encoded(image, "TIFF"), Limits(formats=("TIFF",)))
    assert str(caught.value) == message


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    data = encoded(Image.new("RGB", (8, 8), (200, 30, 60)).convert("CMYK"), "JPEG", quality=100)
    decoded = decode_image(data, Limits())
    assert decoded.mode == "RGB"
    pixel = decoded.getpixel((4, 4))
    assert isinstance(pixel, tuple)
    assert all(abs(got - want) <= 3 for got, want in zip(pixel, (200, 30, 60), strict=True))


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(buffer.getvalue(), Limits(formats=("GIF",)))
    assert (decoded.mode, set(pixels(decoded))) == ("RGB", {(255, 0, 0)})


def test_bilevel_decodes_to_greyscale() -> None:
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    decoded = decode_image(encoded(image), Limits())
    assert (decoded.mode, pixels(decoded)) == ("L", [0, 255])
