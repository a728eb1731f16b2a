"""Decode each image once, then build one tensor per distinct input spec for all the members sharing it.

With test-time augmentation (`input.tta`) each image becomes several rows, its views, cut from one
resized tensor: `hflip` adds the mirror image; `five_crop` cuts the four corners and the centre
at `size` from the image resized to `size / CROP_FRACTION`; `ten_crop` adds their mirrors. Specs
differing only in their views share that resized tensor.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import five_crop, horizontal_flip, pil_to_tensor, ten_crop

from handlers.config.specs import InputSpec, Limits
from handlers.errors import InvalidImage, PayloadTooLarge

WIDE_GRAY_MAX = 65535
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255, 255)
# The one prefix base64 images may carry, in our JSON form and in v2 alike.
DATA_URI = re.compile(r"\Adata:image/[A-Za-z0-9.+-]+;base64,")


def decode_base64(text: str, where: str) -> bytes:
    """An image's bytes from standard base64, optionally behind a `data:image/...;base64,` prefix."""
    try:
        return base64.b64decode(DATA_URI.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImage(f"{where}: invalid base64 ({e})") from e


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode untrusted bytes into an upright image, or raise InvalidImage / PayloadTooLarge.

    The pixel limit is checked from the header, before any pixel is decoded; EXIF orientation is
    applied so a rotated photo predicts as the upright one; animated images give their first frame.
    The result is always RGB or L.
    """
    if not data:
        raise InvalidImage("empty image: the request carried no bytes")
    accepted = ", ".join(limits.formats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=limits.formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise PayloadTooLarge(f"image exceeds the pixel limit: {e}") from e
        except Exception as e:  # Pillow raises many types on hostile bytes; all mean "not an image".
            raise InvalidImage(f"not a decodable image of an accepted format ({accepted})") from e
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_image_pixels}"
        )
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except Exception as e:  # Truncated or corrupt data surfaces only when pixels are decoded.
        raise InvalidImage(f"{image.format} image is truncated or corrupt: {e}") from e
    return _rgb_or_gray(upright, image.format)


def _rgb_or_gray(image: Image.Image, fmt: str | None) -> Image.Image:
    """Every decoded image as RGB or L, converted here, per request, where a failure is that request's alone.

    16-bit greyscale is scaled to 8 bits (Pillow's own conversion would clip everything above 255 to
    white); transparency is composited over white, so what hides under transparent pixels never
    reaches a model; CMYK, palette, YCbCr and bilevel images use Pillow's conversions.
    """
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode.startswith("I"):
        # One band: getextrema() is (lowest, highest), not one pair per band.
        low, high = cast(tuple[float, float], image.getextrema())
        if low < 0 or high > WIDE_GRAY_MAX:
            raise InvalidImage(f"{fmt} image has {mode} pixels outside 0..{WIDE_GRAY_MAX}; send 8- or 16-bit images")
        return image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if mode == "F":
        raise InvalidImage(f"{fmt} image has floating-point pixels; send 8- or 16-bit images")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
    try:
        return image.convert("L" if mode == "1" else "RGB")
    except Exception as e:  # A mode Pillow cannot convert (LAB, HSV and the like) is this image's problem.
        raise InvalidImage(f"{fmt} image in mode {mode} cannot be converted to RGB") from e


def to_tensor(image: Image.Image, spec: InputSpec) -> torch.Tensor:
    """One image, already in `spec.color_mode`, as a normalised float tensor [C, H, W] of `spec.load_size`."""
    height, width = spec.load_size
    if spec.resize == "center_crop":
        scale = max(height / image.height, width / image.width)
        cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(cover, Image.Resampling.BILINEAR)
        left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    elif image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels: torch.Tensor = pil_to_tensor(image).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return pixels.sub_(mean).div_(std)


def views(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """[N, C, H', W'] resized images to [N * views, C, H, W] member rows, each image's views together."""
    if spec.tta == "none":
        return batch
    if spec.tta == "hflip":
        cut = (batch, horizontal_flip(batch))
    else:
        cut = (five_crop if spec.tta == "five_crop" else ten_crop)(batch, list(spec.size))
    return torch.stack(cut, dim=1).flatten(0, 1)


def batch_tensors(images: Sequence[Image.Image], specs: Iterable[InputSpec]) -> dict[InputSpec, torch.Tensor]:
    """For each distinct spec, its rows [N * views, C, H, W]; each colour conversion (RGB <-> L) and each resize is
    done once."""
    distinct = list(dict.fromkeys(specs))
    modes = {spec.color_mode for spec in distinct}
    converted = {mode: [image if image.mode == mode else image.convert(mode) for image in images] for mode in modes}
    bases = {spec.base for spec in distinct}
    resized = {base: torch.stack([to_tensor(image, base) for image in converted[base.color_mode]]) for base in bases}
    return {spec: views(resized[spec.base], spec) for spec in distinct}
