"""The sections of an ensemble as pydantic models: input, execution, limits, batching, policy.

Each model checks its own keys; the rules that need the ensemble around it (a member's input against
the ensemble's, a policy's k against the member count) are methods the ensemble calls, failing at the
key path below the section. Class docstrings and field descriptions are the help editors show.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any

from PIL import Image
from pydantic import AfterValidator, Field, model_validator

from handlers.config.fields import Strict, boolean, choice, fail, integer, listed, number, text
from handlers.config.policy import PolicySpec, policy_names, resolve_policy
from handlers.config.specs import (
    CHANNELS,
    DEFAULT_FORMATS,
    DEFAULT_NORM,
    INPUT_TYPES,
    KNOWN_FORMATS,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
    PLANS,
    PRECISIONS,
    RESIZE_MODES,
    TTA_VIEWS,
    Batching,
    Deadline,
    Execution,
    InputSpec,
    Limits,
    MemberInput,
    TensorSpec,
    default_stuck_after_s,
)
from handlers.errors import InvalidPolicy

TENSOR_KEYS = ["shape", "type"]


def _at_most_elements(shape: tuple[int, ...]) -> tuple[int, ...]:
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        fail(f"{math.prod(shape)} elements per instance; at most {MAX_TENSOR_ELEMENTS}")
    return shape


class InputConfig(Strict):
    """How a request becomes member input: images resized and normalized, or float32 tensors of one shape.
    Under a member, every key given overrides the ensemble's input and the others are inherited."""

    type: Annotated[str, *choice(INPUT_TYPES)] = Field(
        "image",
        description="`image`: requests carry images, turned into tensors by the keys below. `tensor`: requests carry "
        "float32 arrays of `shape` (a whole ensemble only; its members share it, and only `shape` goes with it). "
        "Default: image.",
    )
    size: Annotated[
        tuple[Annotated[int, *integer(8, 4096)], ...] | None,
        *listed("a list of 2 integers", min_len=2, max_len=2),
    ] = Field(
        None,
        description="[height, width] in pixels, 8 to 4096 each, that every image is resized to. Required in an "
        "ensemble's image input; a member without it takes the ensemble's.",
    )
    resize: Annotated[str, *choice(RESIZE_MODES)] = Field(
        "stretch",
        description="`stretch`: resize to `size`, ignoring the aspect ratio. "
        "`center_crop`: scale the shorter side to fit, then cut the middle. "
        "Default: stretch (a member: the ensemble's).",
    )
    color_mode: Annotated[str, *choice(tuple(CHANNELS))] = Field(
        "RGB",
        description="`RGB` (3 channels) or `L` (greyscale, 1 channel). Changing it resets `mean` and `std` to the "
        "mode's defaults unless they are given too. Default: RGB (a member: the ensemble's).",
    )
    mean: Annotated[
        tuple[Annotated[float, *number(-10.0, 10.0)], ...] | None,
        *listed("a list of 1 to 3 numbers", min_len=1, max_len=3),
    ] = Field(
        None,
        description="Per-channel mean subtracted after scaling pixels to [0, 1], one number per channel (-10 to 10). "
        "Default: ImageNet's [0.485, 0.456, 0.406] for RGB, [0.5] for L.",
    )
    std: Annotated[
        tuple[Annotated[float, *number(1e-6, 10.0)], ...] | None,
        *listed("a list of 1 to 3 numbers", min_len=1, max_len=3),
    ] = Field(
        None,
        description="Per-channel standard deviation divided by after the mean, one number per channel (1e-6 to 10). "
        "Default: ImageNet's [0.229, 0.224, 0.225] for RGB, [0.5] for L.",
    )
    tta: Annotated[str, *choice(tuple(TTA_VIEWS))] = Field(
        "none",
        description="Test-time augmentation: `none` (1 view), `hflip` (the image and its mirror, 2), `five_crop` "
        "(corners and centre cut from the image resized to size / 0.875, 5), `ten_crop` (those and the mirror's, 10). "
        "A member's probabilities are the mean over its views. Default: none (a member: the ensemble's).",
    )
    shape: Annotated[
        tuple[Annotated[int, *integer(1, MAX_TENSOR_ELEMENTS)], ...] | None,
        *listed(f"a list of 1 to {MAX_TENSOR_DIMS} integers", min_len=1, max_len=MAX_TENSOR_DIMS),
        AfterValidator(_at_most_elements),
    ] = Field(
        None,
        description="Tensor input only, and required there: "
        f"the shape of one instance, 1 to {MAX_TENSOR_DIMS} dimensions "
        f"of at most {MAX_TENSOR_ELEMENTS} elements in all. Members receive [N, *shape] float32.",
    )

    @classmethod
    def allowed_keys(cls, data: dict[Any, Any]) -> tuple[list[str], list[str]]:
        """Tensor input takes `type` and `shape`; image input every key but `shape`; an unknown type is named by its
        own check."""
        kind = data.get("type", "image")
        if kind == "tensor":
            return TENSOR_KEYS, ["shape"]
        if kind == "image":
            return sorted(set(cls.model_fields) - {"shape"}), []
        return sorted(cls.model_fields), []

    def ensemble_input(self) -> MemberInput:
        """The ensemble's own input; the ensemble has already insisted on `size` for images."""
        if self.type == "tensor":
            if self.shape is None:
                fail("missing key 'shape'")
            return TensorSpec(shape=self.shape)
        if self.size is None:
            fail("missing key 'size'")
        height, width = self.size
        return self.over(InputSpec(size=(height, width)))

    def over(self, base: InputSpec) -> InputSpec:
        """`base` with the keys this mapping gives; a new color_mode brings its own mean and std unless given."""
        given = self.model_fields_set
        spec = base
        for key in ("size", "resize", "tta"):
            if key in given:
                spec = replace(spec, **{key: getattr(self, key)})
        if "color_mode" in given and self.color_mode != spec.color_mode:
            mean, std = DEFAULT_NORM[self.color_mode]
            spec = replace(spec, color_mode=self.color_mode, mean=mean, std=std)
        for key in ("mean", "std"):
            if key in given:
                values = getattr(self, key)
                if len(values) != spec.channels:
                    fail(f"expected a list of {spec.channels} numbers, got {list(values)!r}", key)
                spec = replace(spec, **{key: values})
        return spec


class ExecutionConfig(Strict):
    """How members' forward calls run. Under a member, every key given overrides the ensemble's."""

    plan: Annotated[str, *choice(PLANS)] = Field(
        Execution().plan,
        description="`auto`: chosen when a worker starts by measuring every candidate verified against eager. "
        "A fixed plan (eager, channels_last, frozen, frozen_channels_last, compiled) is verified the same way and "
        "refused if it does not reproduce eager. Default: auto (a member: the ensemble's).",
    )
    compile: Annotated[bool, *boolean()] = Field(
        Execution().compile,
        description="Let `auto` also try torch.compile, which costs seconds to minutes per member at every worker "
        "start. Default: false (a member: the ensemble's).",
    )
    precision: Annotated[str, *choice(PRECISIONS)] = Field(
        Execution().precision,
        description="fp32, or a lossy precision, opt-in: bf16 (OpenVINO's bf16 inference) or int8 (static "
        "quantisation by ONNX Runtime's quantiser). A lossy precision needs plan: auto and `calibration`; the build "
        "refuses it when its labels agree with fp32 on fewer calibration images than `min_agreement`. A CPU without "
        "AVX-512 BF16 / AMX (bf16) or VNNI / AMX (int8) serves fp32 and logs why. "
        "Default: fp32 (a member: the ensemble's).",
    )
    calibration: Annotated[str | None, *text()] = Field(
        Execution().calibration,
        description="A folder of images (relative to ensembles.yaml) a lossy precision is calibrated and measured on, "
        "preprocessed as requests are. Default: none (a member: the ensemble's).",
    )
    min_agreement: Annotated[float, *number(0.0, 1.0)] = Field(
        Execution().min_agreement,
        description="The fraction of calibration images whose labels a lossy precision must give as fp32 does. "
        "Default: 0.99 (a member: the ensemble's).",
    )

    @model_validator(mode="after")
    def _lossy_needs_auto(self) -> ExecutionConfig:
        if self.precision != "fp32" and self.plan != "auto":
            fail(
                f"precision {self.precision} runs on the engines measured for it: "
                f"leave plan at auto, not {self.plan!r}",
                "plan",
            )
        return self

    def over(self, base: Execution) -> Execution:
        """`base` with the keys this mapping gives."""
        return replace(base, **{key: getattr(self, key) for key in self.model_fields_set})


class LimitsConfig(Strict):
    """What one request may carry."""

    max_images_per_request: Annotated[int, *integer(1, 4096)] = Field(
        Limits().max_images_per_request,
        description="Images (or tensor instances) one request may carry, 1 to 4096. Default: 64.",
    )
    max_image_pixels: Annotated[int, *integer(64, Image.MAX_IMAGE_PIXELS or 200_000_000)] = Field(
        Limits().max_image_pixels,
        description="Pixels (width x height) one image may have, read from its header before decoding; at most "
        "Pillow's own bomb limit. Default: 16000000.",
    )
    formats: Annotated[
        tuple[Annotated[str, *choice(KNOWN_FORMATS, unknown="image format")], ...],
        *listed("a list of at least 1 string(s)", min_len=1),
    ] = Field(
        DEFAULT_FORMATS,
        description=f"Image formats accepted, of {', '.join(KNOWN_FORMATS)} (GIF: the first frame). "
        f"Default: {', '.join(DEFAULT_FORMATS)}.",
    )

    def to_limits(self) -> Limits:
        return Limits(
            max_images_per_request=self.max_images_per_request,
            max_image_pixels=self.max_image_pixels,
            formats=self.formats,
        )


class BatchingConfig(Strict):
    """TorchServe's batching and workers for the archive, and rows per member forward call."""

    batch_size: Annotated[int, *integer(1, 1024)] = Field(
        Batching().batch_size, description="TorchServe batchSize: requests handled together, 1 to 1024. Default: 8."
    )
    max_batch_delay_ms: Annotated[int, *integer(0, 10_000)] = Field(
        Batching().max_batch_delay_ms,
        description="TorchServe maxBatchDelay in milliseconds, 0 to 10000, that a batch waits to fill (0 is not "
        "'no wait': TorchServe then waits about 100 ms). Default: 2.",
    )
    micro_batch_size: Annotated[int, *integer(1, 4096)] = Field(
        Batching().micro_batch_size,
        description="At most this many rows (images, or their test-time views) per member forward call, 1 to 4096. "
        "Default: 32.",
    )
    workers: Annotated[int, *integer(1, 64)] = Field(
        Batching().workers,
        description="TorchServe workers (min = max), 1 to 64; each runs cores / workers member threads. Default: 1.",
    )
    response_timeout_s: Annotated[int, *integer(1, 3600)] = Field(
        Batching().response_timeout_s, description="TorchServe responseTimeout in seconds, 1 to 3600. Default: 60."
    )
    fuse_members: Annotated[bool, *boolean()] = Field(
        Batching().fuse_members, description="Run members of the same architecture in one vmap call. Default: false."
    )

    def to_batching(self) -> Batching:
        return Batching(**{key: getattr(self, key) for key in type(self).model_fields})


class DeadlineConfig(Strict):
    """How long a request waits for its members and how many must answer; a request may set its own
    `deadline_ms` and `min_members`."""

    ms: Annotated[int | None, *integer(1, 3_600_000)] = Field(
        None,
        description="Milliseconds from when a worker takes up a request's batch until the request is answered with the "
        "members that have answered; the others are left out (`missing`). At most the response timeout. "
        "Default: none, every member is waited for.",
    )
    min_members: Annotated[int, *integer(1)] = Field(
        Deadline().min_members,
        description="The fewest members that must answer, 1 to the member count (to the requested members' count "
        "when a request names fewer); with fewer the request gets 503 QuorumNotMet. Required members count as "
        "needed regardless. Default: 1.",
    )
    stuck_after_s: Annotated[int | None, *integer(1, 3600)] = Field(
        None,
        description="Seconds a member call may run before its worker is replaced (answering what it can first), "
        "above the deadline. Default: half the response timeout.",
    )

    def to_deadline(self, members: int, response_timeout_s: int) -> Deadline:
        """The deadline, checked against the member count and the response timeout."""
        if self.min_members > members:
            fail(f"expected at most the {members} member(s), got {self.min_members}", "min_members")
        if self.ms is not None and self.ms > response_timeout_s * 1000:
            fail(
                f"{self.ms} ms is above batching.response_timeout_s ({response_timeout_s} s): TorchServe would time "
                "the worker out first; lower it or raise the timeout",
                "ms",
            )
        stuck = self.stuck_after_s or default_stuck_after_s(response_timeout_s)
        if self.ms is not None and stuck * 1000 <= self.ms:
            fail(f"{stuck} s must be longer than the deadline ({self.ms} ms)", "stuck_after_s")
        return Deadline(ms=self.ms, min_members=self.min_members, stuck_after_s=self.stuck_after_s)


class DeferConfig(Strict):
    """When an answer goes to a person instead: a threshold per uncertainty measure (nats; vote_margin a share)."""

    entropy: Annotated[float | None, *number(0.0, 100.0)] = Field(
        None, description="Defer when the mean distribution's entropy is above it."
    )
    expected_entropy: Annotated[float | None, *number(0.0, 100.0)] = Field(
        None, description="Defer when the weighted mean of the members' entropies is above it."
    )
    mutual_information: Annotated[float | None, *number(0.0, 100.0)] = Field(
        None, description="Defer when the members disagree by more than it: entropy minus expected_entropy."
    )
    vote_margin: Annotated[float | None, *number(0.0, 1.0)] = Field(
        None, description="Defer when the top vote share minus the second is below it."
    )

    def to_thresholds(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in type(self).model_fields if getattr(self, key) is not None}


class PolicyConfig(Strict):
    """The default policy combining the members' votes, and its parameters; a request may choose another."""

    name: Annotated[str, *choice(tuple(policy_names()))] = Field(
        description="The policy: " + ", ".join(policy_names()) + "."
    )
    k: Annotated[int | None, *integer(1)] = Field(
        None, description="k_of_n only, and required there: members that must vote yes, 1 to the member count."
    )
    threshold: Annotated[float | None, *number(0.0, 1.0)] = Field(
        None,
        description="Binary and multilabel only: the probability, 0 to 1, from which a label is yes. Default: 0.5.",
    )
    confidence: Annotated[float | None, *number(0.0, 1.0)] = Field(
        None,
        description="cascade only: members run cheapest first "
        "until the running weighted mean's top probability reaches it "
        "(multilabel: every label's is at least it or at most 1 minus it). Default: 0.9.",
    )
    early_exit: Annotated[bool | None, *boolean()] = Field(
        None,
        description="any, all, majority and k_of_n only: run members cheapest first and stop an image once its vote is "
        "settled; the labels are exactly those of running every member. Default: false.",
    )

    def resolve(self, task: str, n_members: int) -> PolicySpec:
        """The policy's rules across keys (k for k_of_n only, within the member count; threshold not for multiclass)."""
        keys = ("k", "threshold", "confidence", "early_exit")
        params = {key: getattr(self, key) for key in keys if getattr(self, key) is not None}
        requested = {"policy": self.name, **params}
        try:
            return resolve_policy(requested, default=None, task=task, n_members=n_members)
        except InvalidPolicy as e:
            fail(str(e))
