"""Lossy precisions (`execution.precision: bf16 | int8`), accepted only after they are measured.

At build time a member with a lossy precision runs on its calibration images (`execution.calibration`, a
folder of images, preprocessed exactly as requests are) in fp32 eager and in the lossy engine. The labels
must agree on at least `execution.min_agreement` of the images; the agreement and the largest probability
difference go into the archive's manifest (`engines.<member>.precision`) and `describe` shows them.

- bf16: OpenVINO's bf16 inference of the member's fp32 ONNX export (nothing more is archived).
- int8: post-training static quantisation of that export by ONNX Runtime's quantiser (QDQ, weights int8 per
  channel, activations uint8), calibrated on the same images; the quantised `.onnx` is archived and pinned.

A worker whose CPU cannot run the precision faster than fp32 (`engines.precision_unsupported`) serves the
member in fp32 and logs why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers.config.specs import InputSpec
from handlers.errors import ConfigError
from handlers.execution.engines import onnxruntime_forward, openvino_forward
from handlers.execution.outputs import largest_difference
from handlers.inputs.images import batch_tensors, decode_image

# The engines a lossy precision runs on, as plans `auto` times against each other.
LOSSY_PLANS = {"bf16": ("openvino_bf16",), "int8": ("onnxruntime_int8", "openvino_int8")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
CALIBRATION_ROWS = 64
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Agreement:
    """How a lossy precision compares with fp32 eager on the calibration images."""

    precision: str
    agreement: float
    largest_difference: float
    images: int

    def record(self) -> dict[str, Any]:
        """What the manifest's `engines.<member>.precision` and `describe` say."""
        return {
            "precision": self.precision,
            "agreement": round(self.agreement, 4),
            "largest_difference": float(f"{self.largest_difference:.3g}"),
            "images": self.images,
        }


def calibration_rows(folder: Path, given: InputSpec, limits: Any) -> torch.Tensor:
    """Every image in `folder` (sorted by name), decoded and preprocessed as a request's would be:
    [N * views, *input]."""
    if not folder.is_dir():
        raise ConfigError(
            f"execution.calibration: {folder} is not a folder; give a folder of images the member is meant to see"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"execution.calibration: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = [decode_image(path.read_bytes(), limits) for path in files]
    return batch_tensors(images, [given])[given]


def lossy_forward(precision: str, onnx: Path, int8: Path | None) -> Forward:
    """The engine the build measures a precision with: OpenVINO bf16, or the int8 file on ONNX Runtime."""
    cpu = torch.device("cpu")
    if precision == "bf16":
        return openvino_forward(onnx, cpu, precision="bf16", cache=None)
    if int8 is None:
        raise ValueError("int8 needs its quantised export")
    return onnxruntime_forward(int8, cpu)


def quantize_int8(onnx: Path, out: Path, rows: torch.Tensor) -> None:
    """Post-training static quantisation of `onnx` into `out`, calibrated on `rows` (ONNX Runtime's quantiser)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    # onnxruntime ships no type information: its reader is Any to mypy.
    class Rows(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, Any]] = (
                {"input": rows[i : i + 8].contiguous().numpy()} for i in range(0, min(len(rows), CALIBRATION_ROWS), 8)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    quantize_static(
        str(onnx),
        str(out),
        Rows(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def measure(
    precision: str, head: nn.Module, lossy: Forward, rows: torch.Tensor, views: int, task: str, threshold: float
) -> Agreement:
    """Labels of `lossy` against fp32 eager on `rows` (averaged over each image's `views`, as served)."""
    with torch.inference_mode():
        reference = _per_image(torch.cat([head(chunk) for chunk in torch.split(rows, 16)]), views)
        got = _per_image(torch.cat([lossy(chunk) for chunk in torch.split(rows, 16)]), views)
    same = labels(reference, task, threshold) == labels(got, task, threshold)
    agreeing = same.all(dim=1) if same.dim() > 1 else same
    return Agreement(precision, float(agreeing.float().mean()), largest_difference(got, reference), len(agreeing))


def labels(probabilities: torch.Tensor, task: str, threshold: float) -> torch.Tensor:
    """The labels an image gets from its probabilities: the top class, or each label at or above `threshold`."""
    if task == "multiclass":
        return probabilities.argmax(dim=-1)
    return probabilities >= threshold


def refuse_below(agreement: Agreement, minimum: float, member: str) -> None:
    """ConfigError when the lossy precision's labels agree with fp32 on fewer images than `minimum` asks."""
    if agreement.agreement < minimum:
        raise ConfigError(
            f"members {member!r}: precision {agreement.precision} agrees with fp32 on {agreement.agreement:.4f} of "
            f"{agreement.images} calibration images, below execution.min_agreement {minimum:g} (largest probability "
            f"difference {agreement.largest_difference:.3g}); "
            "serve it in fp32, or lower min_agreement if that is acceptable"
        )


def _per_image(probabilities: torch.Tensor, views: int) -> torch.Tensor:
    return probabilities.reshape(-1, views, *probabilities.shape[1:]).mean(dim=1)
