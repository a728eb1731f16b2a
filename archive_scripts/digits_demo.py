"""The `digits` demo's data and its Hugging Face member: real handwriting, ten labels.

scikit-learn's bundled digits (1,797 8x8 images by 43 writers, values 0 to 16) with a fixed stratified
split: 1,347 images to train on, 450 held out (`python -m archive_scripts.digits_demo artifacts/samples` writes
the first held-out image of each digit there as digit-<label>.png). Each image is an 8x8 greyscale PNG, as a client
would send it, and the serving code resizes it. Three members of different kinds learn it: a timm `test_resnet`, a
small ViT saved with `save_pretrained` and served as a Hugging Face folder, and a TinyConvNet of our own.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy
from PIL import Image
from torch import nn

LABELS = tuple(str(digit) for digit in range(10))
HELD_OUT = 0.25
SPLIT_SEED = 0


@dataclass(frozen=True)
class Digit:
    """One handwritten digit as a client sends it, and its label's index."""

    image: Image.Image
    label: int


@cache
def split() -> tuple[tuple[Digit, ...], tuple[Digit, ...]]:
    """(train, held out): the same stratified split on every run (scikit-learn's train_test_split, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = numpy.round(digits.images * (255 / 16)).astype(numpy.uint8)
    train, test, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=digits.target
    )

    def as_digits(images: numpy.ndarray, labels: numpy.ndarray) -> tuple[Digit, ...]:
        return tuple(Digit(Image.fromarray(im, mode="L"), int(y)) for im, y in zip(images, labels, strict=True))

    return as_digits(train, train_y), as_digits(test, test_y)


def vit(num_labels: int = len(LABELS)) -> nn.Module:
    """The ViT member as its trainer creates it: 16x16 greyscale, patches of 4, two layers of width 64."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # PreTrainedConfig takes num_labels through **kwargs, which ViTConfig's @strict dataclass signature omits.
        num_labels=num_labels,  # type: ignore[call-arg]
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    return ViTForImageClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path)
    folder = parser.parse_args().samples
    folder.mkdir(parents=True, exist_ok=True)
    first: dict[int, Digit] = {}
    for digit in split()[1]:
        first.setdefault(digit.label, digit)
    for label, digit in sorted(first.items()):
        digit.image.save(folder / f"digit-{LABELS[label]}.png")


if __name__ == "__main__":
    main()
