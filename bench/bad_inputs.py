"""The bad-input catalogue: each hostile or unusual request, and how the ensemble must answer it.

Used by the reliability suite against a real TorchServe (each case is sent inside a batch of good
requests) and by the unit tests of the decode path. A case answered 200 names the images whose
in-process predictions it must equal: the upright image for an EXIF-rotated one, the first frame
for an animated GIF, the 8-bit equivalent for a 16-bit image.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, cast

from PIL import Image

OVER_MAX_REQUEST_BYTES = 9 * 1024 * 1024


@dataclass(frozen=True)
class BadInput:
    """One request (`requests.post` keyword arguments) and the status and error type it must get.

    `json_error=False` marks the one case TorchServe's frontend answers before our handler runs (a body
    over `max_request_size`): the status is right, the body is TorchServe's, not our JSON.
    """

    name: str
    request: dict[str, Any]
    status: int
    type: str | None = None
    same_as: tuple[bytes, ...] = field(default=())
    path: str = "predictions"
    json_error: bool = True


def encoded(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A reproducible random RGB image."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height greyscale pixels, with almost no pixel data after it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b"")
    )


def exif_rotated(upright: Image.Image) -> bytes:
    """The image stored sideways, with EXIF orientation 6 saying how to turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)


def animated_gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def unpadded_base64(data: bytes) -> str:
    """Base64 of the image (plus trailing zero bytes, which PNG ignores) with its '==' padding cut off."""
    data += b"\0" * ((1 - len(data)) % 3)
    return base64.b64encode(data).decode().rstrip("=")


def raw(data: bytes, content_type: str = "image/png", **headers: str) -> dict[str, Any]:
    return {"data": data, "headers": {"Content-Type": content_type, **headers}}


def b64_json(*encoded_images: str) -> dict[str, Any]:
    return {"json": {"instances": [{"b64": text} for text in encoded_images]}}


def catalogue(max_images: int) -> list[BadInput]:
    """Every case, for an image ensemble accepting JPEG, PNG and GIF with at most `max_images` per request."""
    good = encoded(photo(1))
    gray16 = Image.new("I;16", (24, 24))
    gray16.putdata([(i * 977) % 65536 for i in range(24 * 24)])
    gray8 = Image.new("L", (24, 24))
    # One band: every pixel is a number (Pillow's type also allows a tuple of bands).
    gray8.putdata([int(cast(int, v) / 257 + 0.5) for v in gray16.get_flattened_data()])
    rgba = photo(3).convert("RGBA")
    rgba.putalpha(255)
    palette = photo(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    gif_frames = [photo(5).convert("P").convert("RGB"), photo(6)]
    first_frame = Image.open(io.BytesIO(animated_gif(gif_frames))).convert("RGB")
    return [
        BadInput("non-image bytes", raw(b"%PDF-1.4 definitely not an image"), 400, "InvalidImage"),
        BadInput("empty body", raw(b""), 400, "RequestError"),
        BadInput("truncated JPEG", raw(encoded(photo(2, (64, 64)), "JPEG")[:900], "image/jpeg"), 400, "InvalidImage"),
        BadInput("PNG header claiming 20000x10000", raw(header_only_png(20000, 10000)), 413, "PayloadTooLarge"),
        BadInput("PNG header claiming 10000x10000", raw(header_only_png(10000, 10000)), 413, "PayloadTooLarge"),
        BadInput("format not accepted (TIFF)", raw(encoded(photo(2), "TIFF"), "image/tiff"), 400, "InvalidImage"),
        BadInput(
            "CMYK JPEG",
            raw(encoded(photo(7).convert("CMYK"), "JPEG"), "image/jpeg"),
            200,
            same_as=(encoded(photo(7).convert("CMYK"), "JPEG"),),
        ),
        BadInput(
            "palette PNG with transparency",
            raw(encoded(palette, transparency=0)),
            200,
            same_as=(encoded(palette, transparency=0),),
        ),
        BadInput("RGBA PNG, opaque", raw(encoded(rgba)), 200, same_as=(encoded(photo(3)),)),
        BadInput("16-bit greyscale PNG", raw(encoded(gray16)), 200, same_as=(encoded(gray8),)),
        BadInput(
            "animated GIF (first frame)",
            raw(animated_gif(gif_frames), "image/gif"),
            200,
            same_as=(encoded(first_frame),),
        ),
        BadInput("EXIF orientation 6", raw(exif_rotated(photo(8))), 200, same_as=(encoded(photo(8)),)),
        BadInput("base64 outside the alphabet", b64_json("iVBOR*w0KGgo="), 400, "InvalidImage"),
        BadInput(
            "base64 with a data: prefix",
            b64_json("data:image/png;base64," + base64.b64encode(good).decode()),
            200,
            same_as=(good,),
        ),
        BadInput("base64 missing padding", b64_json(unpadded_base64(good)), 400, "InvalidImage"),
        BadInput("JSON that is not JSON", raw(b'{"instances": [', "application/json"), 400, "RequestError"),
        BadInput("JSON of the wrong shape", {"json": {"images": [good.hex()]}}, 400, "RequestError"),
        BadInput("wrong content type", raw(good, "text/plain"), 415, "UnsupportedMediaType"),
        BadInput(
            f"{max_images + 1} images, over max images per request",
            b64_json(*[base64.b64encode(good).decode()] * (max_images + 1)),
            413,
            "PayloadTooLarge",
        ),
        BadInput("body over max_request_size", raw(b"\0" * OVER_MAX_REQUEST_BYTES), 413, json_error=False),
        BadInput("unknown policy", raw(good, **{"X-Ensemble-Policy": "vote"}), 400, "InvalidPolicy"),
        BadInput(
            "k out of range",
            {**raw(good), "params": {"policy": "k_of_n", "k": "9"}},
            400,
            "InvalidPolicy",
            path="invoke",
        ),
        BadInput(
            "threshold not a number",
            raw(good, **{"X-Ensemble-Policy": "any", "X-Ensemble-Threshold": "high"}),
            400,
            "InvalidPolicy",
        ),
        BadInput(
            "threshold above 1",
            raw(good, **{"X-Ensemble-Policy": "any", "X-Ensemble-Threshold": "1.5"}),
            400,
            "InvalidPolicy",
        ),
    ]
