"""Synthetic "is a triangle present?" images, drawn with Pillow from a fixed seed.

In the spirit of the FlexServe paper's sensitivity example: each 64x64 image has a noisy gradient
background and clutter (discs and bars); half the images also hold one triangle of random
size, colour, rotation and contrast. Small or faint triangles are hard, so members
miss different ones and the OR policy matters.

The multilabel demo, in the CheXNet mould, draws the same background and bars with any subset of five
kinds of shapes (MULTILABEL_LABELS), each present on its own, of random size, rotation, colour and
contrast; members give one sigmoid score per label.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
LABELS = ("absent", "present")
POSITIVE = "present"
MULTILABEL_LABELS = ("triangle", "ring", "disc", "star", "cross")
PRESENT_RATE = 0.4


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    label: int


@dataclass(frozen=True)
class MultiSample:
    image: Image.Image
    labels: tuple[int, ...]  # one 0/1 per label, in MULTILABEL_LABELS order


def make_split(count: int, seed: int) -> list[Sample]:
    """`count` samples, half with a triangle, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_sample(rng, present=i % 2 == 1) for i in range(count)]


def make_sample(rng: random.Random, *, present: bool) -> Sample:
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):
        rng.choice((_disc, _disc, _bar))(draw, rng)
    if present:
        _triangle(draw, rng)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.5)))
    return Sample(_noise(image, rng), 1 if present else 0)


def _colour(rng: random.Random, base: tuple[int, int, int] | None = None, contrast: int = 255) -> tuple[int, int, int]:
    # tuple() of a generator is tuple[int, ...] to mypy; these are three channels, drawn in the order the committed
    # demo weights were trained on.
    if base is None:
        return tuple(rng.randint(0, 255) for _ in range(3))  # type: ignore[return-value]
    return tuple(max(0, min(255, c + rng.choice((-1, 1)) * rng.randint(contrast // 2, contrast))) for c in base)  # type: ignore[return-value]


def _background(rng: random.Random) -> Image.Image:
    top, bottom = _colour(rng), _colour(rng)
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):
        t = y / (SIZE - 1)
        draw.line([(0, y), (SIZE, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    return image


def _centre(rng: random.Random, radius: float) -> tuple[float, float]:
    return rng.uniform(radius * 0.5, SIZE - radius * 0.5), rng.uniform(radius * 0.5, SIZE - radius * 0.5)


def _polygon(centre: tuple[float, float], radius: float, angles: list[float]) -> list[tuple[float, float]]:
    return [(centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a)) for a in angles]


def _triangle(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    radius = rng.uniform(8, 18)
    turn = rng.uniform(0, 2 * math.pi)
    angles = [turn + k * 2 * math.pi / 3 + rng.uniform(-0.2, 0.2) for k in range(3)]
    fill = _colour(rng, base=(128, 128, 128), contrast=rng.choice((70, 140, 255)))
    draw.polygon(_polygon(_centre(rng, radius), radius, angles), fill=fill)


def _disc(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    radius = rng.uniform(4, 14)
    x, y = _centre(rng, radius)
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_colour(rng))


def _bar(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x0, y0 = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
    length, turn = rng.uniform(10, 40), rng.uniform(0, math.pi)
    end = (x0 + length * math.cos(turn), y0 + length * math.sin(turn))
    draw.line([(x0, y0), end], fill=_colour(rng), width=rng.randint(1, 4))


def _noise(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blend in uniform pixel noise of a random strength, drawn from the seeded generator."""
    noise = Image.frombytes("L", (SIZE, SIZE), rng.randbytes(SIZE * SIZE)).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.0, 0.2))


def make_multilabel_split(count: int, seed: int) -> list[MultiSample]:
    """`count` samples, each kind of shape present on its own with probability PRESENT_RATE.

    Reproducible from `seed`.
    """
    rng = random.Random(seed)
    return [
        make_multi_sample(rng, tuple(int(rng.random() < PRESENT_RATE) for _ in MULTILABEL_LABELS)) for _ in range(count)
    ]


def make_multi_sample(rng: random.Random, labels: tuple[int, ...]) -> MultiSample:
    """Bars first, then the present shapes in random order, each of its own size, turn, colour and contrast.

    Contrast is taken against the background under the shape's centre, so a low one means a faint shape.
    """
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):
        _bar(draw, rng)
    kinds = [kind for kind, present in zip(MULTILABEL_LABELS, labels, strict=True) if present]
    rng.shuffle(kinds)
    placed: list[tuple[tuple[float, float], float]] = []
    for kind in kinds:
        radius = rng.uniform(11, 18)
        centre = _free_centre(rng, radius, placed)
        placed.append((centre, radius))
        under = image.getpixel((int(centre[0]), int(centre[1])))
        assert isinstance(under, tuple)  # An RGB image's pixel.
        fill = _colour(rng, base=(under[0], under[1], under[2]), contrast=rng.choice((100, 170, 255)))
        _SHAPES[kind](draw, centre, radius, rng.uniform(0, 2 * math.pi), fill)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.5)))
    return MultiSample(_noise(image, rng), labels)


def _free_centre(
    rng: random.Random, radius: float, placed: list[tuple[tuple[float, float], float]]
) -> tuple[float, float]:
    """A centre that keeps the shape inside the frame, and 0.8 of the two radii from each placed one.

    The 0.8 spacing holds if 20 tries find such a centre.

    So overlaps stay partial and every present shape stays recognisable; a crowded frame takes the last try.
    """
    for _ in range(20):
        centre = _centre(rng, 2 * radius)
        if all(math.dist(centre, c) >= 0.8 * (radius + r) for c, r in placed):
            break
    return centre


Colour = tuple[int, int, int]


def _draw_triangle(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float, turn: float, fill: Colour
) -> None:
    draw.polygon(_polygon(centre, radius, [turn + k * 2 * math.pi / 3 for k in range(3)]), fill=fill)


def _draw_ring(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float, turn: float, fill: Colour
) -> None:
    """Hollow, unlike the disc: the hole tells them apart even when small (a square was too often taken for a disc)."""
    r = radius * 0.8
    draw.ellipse(
        [centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], outline=fill, width=max(2, round(r * 0.35))
    )


def _draw_disc(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float, turn: float, fill: Colour
) -> None:
    r = radius * 0.75
    draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=fill)


def _draw_star(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float, turn: float, fill: Colour
) -> None:
    """Five tips on the outer radius, interleaved with notches on an inner one."""
    step = 2 * math.pi / 5
    tips = _polygon(centre, radius, [turn + k * step for k in range(5)])
    notches = _polygon(centre, radius * 0.4, [turn + (k + 0.5) * step for k in range(5)])
    draw.polygon([p for pair in zip(tips, notches, strict=True) for p in pair], fill=fill)


def _draw_cross(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float, turn: float, fill: Colour
) -> None:
    """A plus sign: for each arm, its two end corners, then the inner corner before the next arm."""
    half_width = radius * 0.3
    reach, spread = math.hypot(radius, half_width), math.atan2(half_width, radius)
    arms = [turn + k * math.pi / 2 for k in range(4)]
    left = _polygon(centre, reach, [a - spread for a in arms])
    right = _polygon(centre, reach, [a + spread for a in arms])
    inner = _polygon(centre, half_width * math.sqrt(2), [a + math.pi / 4 for a in arms])
    draw.polygon([p for corners in zip(left, right, inner, strict=True) for p in corners], fill=fill)


_SHAPES = {
    "triangle": _draw_triangle,
    "ring": _draw_ring,
    "disc": _draw_disc,
    "star": _draw_star,
    "cross": _draw_cross,
}


def write_samples(folder: Path) -> list[Path]:
    """Write a few example images (PNG and JPEG, with and without a triangle) for curl and the docs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(424242)
    written = []
    for name, present, fmt in (("present", True, "PNG"), ("absent", False, "PNG"), ("present", True, "JPEG")):
        path = folder / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}"
        make_sample(rng, present=present).image.save(path, format=fmt)
        written.append(path)
    return written


def write_multilabel_samples(folder: Path) -> list[Path]:
    """Write a few multilabel example PNGs, named after the shapes they hold, for curl and the docs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(424243)
    written = []
    for kinds in (("triangle", "disc", "cross"), ("ring", "star"), ()):
        path = folder / f"multi-{'-'.join(kinds) or 'none'}.png"
        make_multi_sample(rng, tuple(int(label in kinds) for label in MULTILABEL_LABELS)).image.save(path, format="PNG")
        written.append(path)
    return written


if __name__ == "__main__":
    samples_folder = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/samples")
    for written_path in write_samples(samples_folder) + write_multilabel_samples(samples_folder):
        print(f"wrote {written_path}")
