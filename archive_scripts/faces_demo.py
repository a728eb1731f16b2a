"""The `faces` demo's weights and data: MTCNN's published networks judged on real face crops.

Weights: the trained PNet, RNet and ONet that facenet-pytorch 2.6.0 ships inside its wheel
(`facenet_pytorch/data/*.pt`, MIT licence), copied into artifacts/weights/faces/ only when each file's
sha256 is the one pinned here (and in ensembles.yaml). Nothing is downloaded.

Data: scikit-image's bundled `lfw_subset`: 100 face crops from Labeled Faces in the Wild and 100 crops of
other things, 25x25 greyscale. Each image is sent as a PNG, as a client would, and judged clean and under
named corruptions at three strengths each, so the trade-off between `any`'s sensitivity and `all`'s
precision shows where it matters: on degraded input.

Usage: python -m archive_scripts.faces_demo [--into artifacts/weights/faces] [--samples artifacts/samples]
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy
from PIL import Image, ImageFilter

from handlers.weights.loading import sha256_of

LABELS = ("not_face", "face")
POSITIVE = "face"
WEIGHTS = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
CORRUPTION_SEED = 20261203


@dataclass(frozen=True)
class Crop:
    """One 25x25 crop as a client sends it, and whether it is a face (1) or not (0)."""

    image: Image.Image
    label: int


def install_weights(into: Path) -> None:
    """Copy the networks' weights out of the installed facenet-pytorch, refusing any file whose digest is not pinned."""
    found = find_spec("facenet_pytorch")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("facenet-pytorch is not installed: make setup installs facenet-pytorch==2.6.0 (--no-deps)")
    data = Path(next(iter(found.submodule_search_locations))) / "data"
    into.mkdir(parents=True, exist_ok=True)
    for name, pinned in WEIGHTS.items():
        source = data / f"{name}.pt"
        actual = sha256_of(source)
        if actual != pinned:
            raise SystemExit(f"{source}: sha256 {actual}, but facenet-pytorch 2.6.0 ships {pinned}")
        shutil.copyfile(source, into / f"{name}.pt")
        print(f"copied {source} -> {into / f'{name}.pt'} (sha256 {actual})")


@cache
def crops() -> tuple[Crop, ...]:
    """lfw_subset's 200 crops: the first 100 are faces, the other 100 are not."""
    from skimage.data import lfw_subset

    images = lfw_subset()
    return tuple(
        Crop(Image.fromarray(numpy.round(image * 255).astype(numpy.uint8), mode="L"), int(i < 100))
        for i, image in enumerate(images)
    )


def _downscale(image: Image.Image, size: float, rng: random.Random) -> Image.Image:
    small = image.resize((int(size), int(size)), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def _blur(image: Image.Image, radius: float, rng: random.Random) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def _noise(image: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    pixels = numpy.asarray(image, dtype=numpy.float64)
    noisy = pixels + numpy.random.default_rng(rng.getrandbits(32)).normal(0, sigma, pixels.shape)
    return Image.fromarray(numpy.clip(numpy.round(noisy), 0, 255).astype(numpy.uint8), mode="L")


def _jpeg(image: Image.Image, quality: float, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


# name: (what the strength means, the function, strengths from mild to severe)
CORRUPTIONS: dict[str, tuple[str, Callable[[Image.Image, float, random.Random], Image.Image], tuple[float, ...]]] = {
    "downscale": ("pixels per side, then back to 25", _downscale, (12, 8, 6)),
    "blur": ("Gaussian radius in pixels", _blur, (1.0, 2.0, 3.0)),
    "noise": ("Gaussian sigma in grey levels", _noise, (10, 25, 50)),
    "jpeg": ("JPEG quality", _jpeg, (50, 20, 5)),
}


def corrupted(name: str, strength: float) -> tuple[Crop, ...]:
    """Every crop under one corruption at one strength; the same pixels on every run."""
    _, corrupt, _ = CORRUPTIONS[name]
    rng = random.Random(f"{CORRUPTION_SEED}-{name}-{strength}")
    return tuple(Crop(corrupt(crop.image, strength, rng), crop.label) for crop in crops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=Path("artifacts/weights/faces"))
    parser.add_argument(
        "--samples", type=Path, default=Path("artifacts/samples"), help="where face.png and not-face.png go"
    )
    args = parser.parse_args()
    install_weights(args.into)
    args.samples.mkdir(parents=True, exist_ok=True)
    crops()[0].image.save(args.samples / "face.png")
    crops()[100].image.save(args.samples / "not-face.png")


if __name__ == "__main__":
    main()
