"""The validated specs: frozen dataclasses for an ensemble, its members, inputs, limits, batching and execution.

`files.py` reads ensembles.yaml and the archive manifest into them; every other package reads only these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from handlers.config.policy import PolicySpec
from handlers.errors import ConfigError

INPUT_TYPES = ("image", "tensor")
PLANS = ("auto", "eager", "channels_last", "frozen", "frozen_channels_last", "onnxruntime", "openvino", "compiled")
PRECISIONS = ("fp32", "bf16", "int8")
RESIZE_MODES = ("stretch", "center_crop")
TTA_VIEWS = {"none": 1, "hflip": 2, "five_crop": 5, "ten_crop": 10}
CROP_FRACTION = 0.875
CONSISTENCY = ("fast", "batch_invariant")
CHANNELS = {"RGB": 3, "L": 1}
DEFAULT_NORM = {"RGB": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "L": ((0.5,), (0.5,))}
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
KNOWN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_TENSOR_DIMS = 4
# Architectures named by a model zoo rather than a model file: `<zoo>:<name>`.
ZOOS = ("torchvision:", "timm:", "transformers:")
OUTPUT_KINDS = ("logits", "probabilities")
# A `<package.module>:<Name>` architecture: dotted Python identifiers, a colon, an identifier.
PACKAGE_ARCH = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
MAX_TENSOR_ELEMENTS = 16_000_000


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a member's input tensor; members with equal specs share one tensor."""

    size: tuple[int, int]
    resize: str = "stretch"
    color_mode: str = "RGB"
    mean: tuple[float, ...] = DEFAULT_NORM["RGB"][0]
    std: tuple[float, ...] = DEFAULT_NORM["RGB"][1]
    type: str = "image"
    tta: str = "none"

    @property
    def channels(self) -> int:
        return CHANNELS[self.color_mode]

    @property
    def instance_shape(self) -> tuple[int, ...]:
        """The shape of one member input: [C, H, W]."""
        return (self.channels, *self.size)

    @property
    def views(self) -> int:
        """Member input rows per image: 1, or the test-time augmentation's views."""
        return TTA_VIEWS[self.tta]

    @property
    def base(self) -> InputSpec:
        """The spec whose resized tensor this one's views are cut from: one per load size, so crops share theirs."""
        return replace(self, tta="five_crop" if self.tta == "ten_crop" else "none" if self.tta == "hflip" else self.tta)

    @property
    def load_size(self) -> tuple[int, int]:
        """The (height, width) the image is resized to before its views are cut."""
        if self.tta in ("none", "hflip"):
            return self.size
        return (round(self.size[0] / CROP_FRACTION), round(self.size[1] / CROP_FRACTION))


@dataclass(frozen=True)
class TensorSpec:
    """Members that take numbers, not images: each instance arrives as a float32 tensor of `shape`."""

    shape: tuple[int, ...]
    type: str = "tensor"

    @property
    def instance_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def views(self) -> int:
        """Tensor instances have no views: one row each."""
        return 1


MemberInput = InputSpec | TensorSpec


@dataclass(frozen=True)
class Limits:
    """What one request may carry: images per request, pixels per image, accepted image formats."""

    max_images_per_request: int = 64
    max_image_pixels: int = 16_000_000
    formats: tuple[str, ...] = DEFAULT_FORMATS


@dataclass(frozen=True)
class Batching:
    """TorchServe batching and workers, plus how many images one member forward call takes."""

    batch_size: int = 8
    max_batch_delay_ms: int = 2
    micro_batch_size: int = 32
    workers: int = 1
    response_timeout_s: int = 60
    fuse_members: bool = False

    def threads_per_worker(self, cores: int) -> int:
        """Member threads of one worker: cores / workers, so that all workers together use each core once."""
        return max(1, cores // self.workers)


def default_stuck_after_s(response_timeout_s: int) -> int:
    """`stuck_after_s` when ensembles.yaml gives none: half the response timeout, at least 1."""
    return max(1, response_timeout_s // 2)


@dataclass(frozen=True)
class Deadline:
    """How long a request waits for its members, and how many must answer (docs: Deadlines and quorum).

    `ms` None waits for every member, as an ensemble without a deadline always has. `stuck_after_s` None is half the
    response timeout: a member call running longer than it gets the worker replaced.
    """

    ms: int | None = None
    min_members: int = 1
    stuck_after_s: int | None = None


@dataclass(frozen=True)
class Execution:
    """How a member's forward call runs: `plan` is a fixed plan or `auto` (chosen at load by measurement).

    `compile` lets `auto` also try torch.compile, which takes seconds to minutes per member and so
    slows every worker (re)start; a fixed `plan: compiled` needs no flag. `precision` other than fp32 is
    lossy and opt-in: the build measures it on the `calibration` images and refuses it below `min_agreement`.
    """

    plan: str = "auto"
    compile: bool = False
    precision: str = "fp32"
    calibration: str | None = None
    min_agreement: float = 0.99


@dataclass(frozen=True)
class StateDictRules:
    """Where a member's weights sit inside its checkpoint file, and how their keys become the architecture's.

    Applied in this order: select `key`, remove keys matching a `drop` regex (searched anywhere in the
    file's own key names), strip each prefix of `strip_prefix` in turn, apply each `rename` with re.sub.
    """

    key: str | None = None
    drop: tuple[str, ...] = ()
    strip_prefix: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Only the rules that are set, in the schema ensembles.yaml uses."""
        data: dict[str, Any] = {} if self.key is None else {"key": self.key}
        for name in ("drop", "strip_prefix", "rename"):
            if getattr(self, name):
                data[name] = _lists(getattr(self, name))
        return data


@dataclass(frozen=True)
class Arch:
    """A member's `arch:` taken apart. `kind` is torchvision, timm, transformers (`target` is the model's folder),
    package (`target` is the module) or file (`target` is the model file); `name` is the builder, model or class."""

    kind: str
    target: str
    name: str

    @classmethod
    def parse(cls, arch: str) -> Arch:
        """The form `arch` is written in; ValueError naming the forms when it is none of them."""
        zoo, sep, rest = arch.partition(":")
        if sep and f"{zoo}:" in ZOOS and rest:
            return cls(zoo, rest, rest)
        target, sep, name = arch.rpartition(":")
        if sep and target.endswith(".py") and name.isidentifier():
            return cls("file", target, name)
        if re.fullmatch(PACKAGE_ARCH, arch):
            return cls("package", target, name)
        raise ValueError(
            "expected 'torchvision:<builder>', 'timm:<model>', 'transformers:<path/to/folder>', "
            f"'<path/to/file.py>:<Class>' or '<package.module>:<Name>', got {arch!r}"
        )


@dataclass(frozen=True)
class OutputSpec:
    """Which part of a member's forward output holds its scores (`select`, a path of tuple indices, dict keys or
    attributes; empty: the output itself), and whether they are logits or already probabilities."""

    select: tuple[int | str, ...] = ()
    kind: str = "logits"

    def to_dict(self) -> dict[str, Any]:
        """The `output:` block ensembles.yaml would write for it."""
        data: dict[str, Any] = {"kind": self.kind}
        if self.select:
            data["select"] = self.select[0] if len(self.select) == 1 else list(self.select)
        return data


@dataclass(frozen=True)
class MemberSpec:
    """One member: architecture, constructor kwargs, weights file, its pinned digest and how to read it."""

    name: str
    arch: str
    weights: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    weight: float = 1.0
    input: MemberInput | None = None
    state_dict: StateDictRules = StateDictRules()
    execution: Execution | None = None
    output: OutputSpec = OutputSpec()
    labels: tuple[str, ...] | None = None
    requires: str | None = None
    required: bool = True

    @property
    def arch_file(self) -> str | None:
        """The file an architecture is defined by: a `<path.py>:<Class>` model file, or a Hugging Face folder's
        config.json; None for the models of torchvision, timm and installed packages."""
        arch = Arch.parse(self.arch)
        if arch.kind == "file":
            return arch.target
        return f"{arch.target}/config.json" if arch.kind == "transformers" else None


@dataclass(frozen=True)
class EnsembleSpec:
    """A validated ensemble. Relative paths are resolved against `base_dir`."""

    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    policy: PolicySpec
    input: MemberInput
    members: tuple[MemberSpec, ...]
    base_dir: Path
    positive_label: str | None = None
    limits: Limits = Limits()
    batching: Batching = Batching()
    execution: Execution = Execution()
    top_k: int | None = None
    consistency: str = "fast"
    defer: Mapping[str, float] = field(default_factory=dict)
    deadline: Deadline = Deadline()

    @property
    def stuck_after_s(self) -> int:
        """Seconds a member call may run before the worker is replaced: the deadline's, else half the response timeout
        (a request waiting on a stuck member is then answered before TorchServe times the worker out)."""
        return self.deadline.stuck_after_s or default_stuck_after_s(self.batching.response_timeout_s)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive_label is None else self.labels.index(self.positive_label)

    def member_input(self, member: MemberSpec) -> MemberInput:
        return member.input or self.input

    def member_execution(self, member: MemberSpec) -> Execution:
        return member.execution or self.execution

    def rows_per_call(self, rows: int, threads: int) -> int:
        """Rows per member forward call when `rows` are spread over `threads`, capped by micro_batch_size;
        exactly one under batch_invariant, so the kernels run at one size whatever the load."""
        if self.consistency == "batch_invariant":
            return 1
        return min(self.batching.micro_batch_size, -(-rows // threads))

    def slice_sizes(self, threads: int, views: int) -> tuple[int, ...]:
        """The rows per call a worker runs most, to time plans at: one image's views in one call, and a full batch."""
        return tuple(
            sorted({self.rows_per_call(views, 1), self.rows_per_call(self.batching.batch_size * views, threads)})
        )

    def with_plan(self, plan: str) -> EnsembleSpec:
        """Every member on one fixed plan: the baselines run members as given (`eager`), whatever the file says."""
        return replace(
            self, execution=Execution(plan=plan), members=tuple(replace(m, execution=None) for m in self.members)
        )

    def with_views(self, tta: str) -> EnsembleSpec:
        """Every member with test-time augmentation `tta`: the evaluation and the benchmark compare them."""
        if not isinstance(self.input, InputSpec):
            raise ConfigError(f"{self.name}: test-time augmentation needs image input")
        members = tuple(
            replace(m, input=replace(m.input, tta=tta)) if isinstance(m.input, InputSpec) else m for m in self.members
        )
        return replace(self, input=replace(self.input, tta=tta), members=members)

    def to_dict(self) -> dict[str, Any]:
        """The resolved ensemble as plain data, in the same schema the parser reads."""
        data = asdict(self)
        del data["name"], data["base_dir"]
        data["policy"] = {"name": self.policy.name, **self.policy.params()}
        for member, spec in zip(data["members"], self.members, strict=True):
            for key in ("input", "sha256", "execution", "labels", "requires"):
                if member[key] is None:
                    del member[key]
            member["state_dict"] = spec.state_dict.to_dict()
            if not member["state_dict"]:
                del member["state_dict"]
            member["output"] = spec.output.to_dict()
        for key in ("positive_label", "top_k"):
            if data[key] is None:
                del data[key]
        data["defer"] = dict(self.defer)
        if not data["defer"]:
            del data["defer"]
        data["deadline"] = {key: value for key, value in data["deadline"].items() if value is not None}
        for execution in [data["execution"], *(member.get("execution") for member in data["members"])]:
            if execution is not None and execution["calibration"] is None:
                del execution["calibration"]
        as_json: dict[str, Any] = _lists(data)
        return as_json


@dataclass(frozen=True)
class ArchiveManifest:
    """What `ensemble.json` in a model archive says: the ensemble, file digests and build provenance.

    `sources` maps each member to the checkpoint it was built from: `{"file", "sha256", "state_dict"}`,
    the digest `sha256:` in ensembles.yaml pins and the rules the build applied, plus `filled` /
    `discarded` (buffer name -> count) when torch's loading rules filled or dropped buffers. The archived weights
    are already normalized, so the archived members carry no rules of their own. `engines` maps each member to
    its ONNX export, `{"file", "exporter"}`, or `{"refused": why}`.
    """

    ensemble: EnsembleSpec
    digests: Mapping[str, str]
    build: Mapping[str, Any]
    sources: Mapping[str, Mapping[str, Any]]
    engines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _lists(value: Any) -> Any:
    """Tuples to lists, so the manifest round-trips through JSON unchanged."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value
