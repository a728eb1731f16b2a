"""Parse and validate ensembles.yaml and the archive manifest into frozen dataclasses, once.

Both files share one schema: `ensembles.yaml` holds `ensembles: {<name>: <ensemble>}`; the manifest
inside a `.mar` (`ensemble.json`) holds one resolved `<ensemble>` plus build provenance. Every error
names the file and the key path, e.g.
`ensembles.yaml: ensembles.shapes.members[2].arch: unknown torchvision model 'resnet19'`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from handlers.errors import ConfigError, InvalidPolicy
from handlers.policies import TASKS, PolicySpec, resolve_policy

MANIFEST_NAME = "ensemble.json"
MANIFEST_FORMAT = 2
INPUT_TYPES = ("image", "tensor")
PLANS = ("auto", "eager", "channels_last", "frozen", "frozen_channels_last", "compiled")
RESIZE_MODES = ("stretch", "center_crop")
TTA_VIEWS = {"none": 1, "hflip": 2, "five_crop": 5, "ten_crop": 10}
CROP_FRACTION = 0.875
CONSISTENCY = ("fast", "batch_invariant")
CHANNELS = {"RGB": 3, "L": 1}
DEFAULT_NORM = {"RGB": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "L": ((0.5,), (0.5,))}
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
KNOWN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_TENSOR_DIMS = 4
MAX_TENSOR_ELEMENTS = 16_000_000
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DOTTED = re.compile(r"[^.\s]+(\.[^.\s]+)*")


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


@dataclass(frozen=True)
class Execution:
    """How a member's forward call runs: `plan` is a fixed plan or `auto` (chosen at load by measurement).

    `compile` lets `auto` also try torch.compile, which takes seconds to minutes per member and so
    slows every worker (re)start; a fixed `plan: compiled` needs no flag.
    """

    plan: str = "auto"
    compile: bool = False


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

    @property
    def arch_file(self) -> str | None:
        """The model file of a `<path.py>:<Class>` architecture, None for torchvision builders."""
        return None if self.arch.startswith("torchvision:") else self.arch.rsplit(":", 1)[0]


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
        return tuple(sorted({self.rows_per_call(views, 1), self.rows_per_call(self.batching.batch_size * views, threads)}))

    def with_plan(self, plan: str) -> EnsembleSpec:
        """Every member on one fixed plan: the baselines run members as given (`eager`), whatever the file says."""
        return replace(self, execution=Execution(plan=plan), members=tuple(replace(m, execution=None) for m in self.members))

    def with_views(self, tta: str) -> EnsembleSpec:
        """Every member with test-time augmentation `tta`: the evaluation and the benchmark compare them."""
        if not isinstance(self.input, InputSpec):
            raise ConfigError(f"{self.name}: test-time augmentation needs image input")
        members = tuple(replace(m, input=replace(m.input, tta=tta)) if isinstance(m.input, InputSpec) else m for m in self.members)
        return replace(self, input=replace(self.input, tta=tta), members=members)

    def to_dict(self) -> dict[str, Any]:
        """The resolved ensemble as plain data, in the same schema the parser reads."""
        data = asdict(self)
        del data["name"], data["base_dir"]
        data["policy"] = {"name": self.policy.name, **self.policy.params()}
        for member, spec in zip(data["members"], self.members, strict=True):
            for key in ("input", "sha256", "execution"):
                if member[key] is None:
                    del member[key]
            member["state_dict"] = spec.state_dict.to_dict()
            if not member["state_dict"]:
                del member["state_dict"]
        for key in ("positive_label", "top_k"):
            if data[key] is None:
                del data[key]
        return _lists(data)


@dataclass(frozen=True)
class ArchiveManifest:
    """What `ensemble.json` in a model archive says: the ensemble, file digests and build provenance.

    `sources` maps each member to the checkpoint it was built from: `{"file", "sha256", "state_dict"}`,
    the digest `sha256:` in ensembles.yaml pins and the rules the build applied, plus `filled` /
    `discarded` (buffer name -> count) when torch's loading rules filled or dropped buffers. The archived weights
    are already normalized, so the archived members carry no rules of their own.
    """

    ensemble: EnsembleSpec
    digests: Mapping[str, str]
    build: Mapping[str, Any]
    sources: Mapping[str, Mapping[str, Any]]


def load_ensembles(path: Path, *, check_files: bool = True) -> dict[str, EnsembleSpec]:
    """Read ensembles.yaml. `check_files=False` skips weight-file existence (training writes them)."""
    source = path.name
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{source}: cannot read: {e}") from e
    top = _Node(raw, "", source)
    top.keys(required={"ensembles"})
    ensembles = top["ensembles"]
    if not isinstance(ensembles.value, dict) or not ensembles.value:
        ensembles.fail("expected a mapping of ensemble names to ensembles")
    return {
        name: parse_ensemble(name, ensembles[name], base_dir=path.parent, check_files=check_files)
        for name in ensembles.value
    }


def read_archive_manifest(model_dir: Path) -> ArchiveManifest:
    """Read and validate the manifest a TorchServe model directory carries."""
    path = model_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{MANIFEST_NAME}: cannot read: {e}") from e
    top = _Node(raw, "", MANIFEST_NAME)
    top.keys(required={"format", "name", "ensemble", "digests", "build", "sources"})
    if top["format"].value != MANIFEST_FORMAT:
        top["format"].fail(f"unsupported manifest format {top['format'].value!r}; expected {MANIFEST_FORMAT}")
    name = top["name"].string()
    digests = top["digests"]
    if not isinstance(digests.value, dict):
        digests.fail("expected a mapping of archive paths to sha256 digests")
    for rel in digests.value:
        digests[rel].string(pattern=_SHA256, what="a lowercase hex sha256")
    for key in ("build", "sources"):
        if not isinstance(top[key].value, dict):
            top[key].fail("expected a mapping")
    ensemble = parse_ensemble(name, top["ensemble"], base_dir=model_dir, check_files=True)
    if sorted(top["sources"].value) != sorted(m.name for m in ensemble.members):
        top["sources"].fail(f"expected one entry per member {[m.name for m in ensemble.members]}")
    return ArchiveManifest(
        ensemble=ensemble, digests=dict(digests.value), build=dict(top["build"].value), sources=dict(top["sources"].value)
    )


def parse_ensemble(name: str, node: _Node, *, base_dir: Path, check_files: bool) -> EnsembleSpec:
    """Validate one ensemble mapping; `node` carries the file name and key path for messages."""
    if not _NAME.fullmatch(name):
        node.fail(f"ensemble name {name!r} must match {_NAME.pattern} (it is the TorchServe model name)")
    node.keys(
        required={"version", "task", "labels", "input", "members"},
        optional={"positive_label", "policy", "limits", "batching", "execution", "top_k", "consistency"},
    )
    version = node["version"].string(pattern=re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]*"), what="a quoted version string like '1.0'")
    task = node["task"].choice(TASKS)
    labels = tuple(node["labels"].string_list(min_len=2 if task != "multilabel" else 1))
    if len(set(labels)) != len(labels):
        node["labels"].fail(f"duplicate labels in {list(labels)}")
    positive = None
    if task == "binary":
        if len(labels) != 2:
            node["labels"].fail(f"a binary ensemble has exactly 2 labels, got {len(labels)}")
        if "positive_label" not in node:
            node.fail("missing key 'positive_label' (required for task binary)")
        positive = node["positive_label"].choice(labels)
    elif "positive_label" in node:
        node["positive_label"].fail(f"only binary ensembles take a positive_label; this one is {task}")

    members_node = node["members"]
    if not isinstance(members_node.value, list) or not members_node.value:
        members_node.fail("expected a non-empty list of members")
    ensemble_input = _parse_input(node["input"], None)
    execution = _parse_execution(node["execution"], Execution()) if "execution" in node else Execution()
    members = tuple(
        _parse_member(members_node[i], ensemble_input, execution, base_dir, check_files)
        for i in range(len(members_node.value))
    )
    seen: set[str] = set()
    for i, member in enumerate(members):
        if member.name in seen:
            members_node[i]["name"].fail(f"duplicate member name {member.name!r}")
        seen.add(member.name)

    policy = _parse_policy(node["policy"] if "policy" in node else None, task, len(members))
    top_k = None
    if task == "multiclass":
        top_k = node["top_k"].integer(1, len(labels)) if "top_k" in node else 1
    elif "top_k" in node:
        node["top_k"].fail(f"top_k ranks the labels of a multiclass ensemble; this one is {task}")
    return EnsembleSpec(
        name=name,
        version=version,
        task=task,
        labels=labels,
        positive_label=positive,
        policy=policy,
        input=ensemble_input,
        members=members,
        base_dir=base_dir,
        limits=_parse_limits(node["limits"]) if "limits" in node else Limits(),
        batching=_parse_batching(node["batching"]) if "batching" in node else Batching(),
        execution=execution,
        top_k=top_k,
        consistency=node["consistency"].choice(CONSISTENCY) if "consistency" in node else "fast",
    )


def _parse_policy(node: _Node | None, task: str, n_members: int) -> PolicySpec:
    if node is None:
        return resolve_policy({"policy": "mean"}, default=None, task=task, n_members=n_members)
    node.keys(required={"name"}, optional={"k", "threshold"})
    requested = {("policy" if key == "name" else key): value for key, value in node.value.items()}
    try:
        return resolve_policy(requested, default=None, task=task, n_members=n_members)
    except InvalidPolicy as e:
        node.fail(str(e))


def _parse_input(node: _Node, base: MemberInput | None) -> MemberInput:
    """An input spec; with `base`, a member override where every key is optional."""
    kind = node["type"].choice(INPUT_TYPES) if "type" in node else "image"
    if isinstance(base, TensorSpec):
        node.fail("members of a tensor-input ensemble share its input; remove this member's input")
    if kind == "tensor":
        if base is not None:
            node.fail("only a whole ensemble takes tensor input; members of an image ensemble take images")
        return _parse_tensor_input(node)
    node.keys(required=set() if base else {"size"}, optional={"type", "size", "resize", "color_mode", "mean", "std", "tta"})
    spec = base or InputSpec(size=(1, 1))
    if "size" in node:
        size = node["size"].int_list(length=2, low=8, high=4096)
        spec = replace(spec, size=(size[0], size[1]))
    if "resize" in node:
        spec = replace(spec, resize=node["resize"].choice(RESIZE_MODES))
    if "color_mode" in node:
        mode = node["color_mode"].choice(tuple(CHANNELS))
        if mode != spec.color_mode:
            spec = replace(spec, color_mode=mode, mean=DEFAULT_NORM[mode][0], std=DEFAULT_NORM[mode][1])
    if "mean" in node:
        spec = replace(spec, mean=tuple(node["mean"].float_list(length=spec.channels, low=-10.0, high=10.0)))
    if "std" in node:
        std = node["std"].float_list(length=spec.channels, low=1e-6, high=10.0)
        spec = replace(spec, std=tuple(std))
    if "tta" in node:
        spec = replace(spec, tta=node["tta"].choice(tuple(TTA_VIEWS)))
    for key in ("mean", "std"):
        if len(getattr(spec, key)) != spec.channels:
            node.fail(f"{key} needs {spec.channels} values for color_mode {spec.color_mode}")
    return spec


def _parse_tensor_input(node: _Node) -> TensorSpec:
    """`{type: tensor, shape: [784]}`: one instance's shape, at most 4 dimensions and 16M elements."""
    node.keys(required={"type", "shape"})
    shape_node = node["shape"]
    if not isinstance(shape_node.value, list) or not 1 <= len(shape_node.value) <= MAX_TENSOR_DIMS:
        shape_node.fail(f"expected a list of 1 to {MAX_TENSOR_DIMS} integers, got {shape_node.value!r}")
    shape = tuple(shape_node[i].integer(1, MAX_TENSOR_ELEMENTS) for i in range(len(shape_node.value)))
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        shape_node.fail(f"{math.prod(shape)} elements per instance; at most {MAX_TENSOR_ELEMENTS}")
    return TensorSpec(shape=shape)


def _parse_member(
    node: _Node, ensemble_input: MemberInput, ensemble_execution: Execution, base_dir: Path, check_files: bool
) -> MemberSpec:
    node.keys(
        required={"name", "arch", "weights"}, optional={"kwargs", "sha256", "weight", "input", "state_dict", "execution"}
    )
    name = node["name"].string(pattern=_NAME, what=f"a name matching {_NAME.pattern}")
    arch = _parse_arch(node["arch"], base_dir)
    kwargs: dict[str, Any] = {}
    if "kwargs" in node:
        if not isinstance(node["kwargs"].value, dict) or not all(isinstance(k, str) for k in node["kwargs"].value):
            node["kwargs"].fail("expected a mapping of keyword argument names to values")
        kwargs = dict(node["kwargs"].value)
    weights = node["weights"].string()
    if check_files and not (base_dir / weights).is_file():
        node["weights"].fail(f"file not found: {base_dir / weights}")
    sha256 = node["sha256"].string(pattern=_SHA256, what="a lowercase hex sha256") if "sha256" in node else None
    weight = node["weight"].number(low=0.0, high=1e6, low_open=True) if "weight" in node else 1.0
    member_input = None
    if "input" in node:
        member_input = _parse_input(node["input"], ensemble_input)
        if member_input == ensemble_input:
            member_input = None
    rules = _parse_state_dict(node["state_dict"]) if "state_dict" in node else StateDictRules()
    execution = _parse_execution(node["execution"], ensemble_execution) if "execution" in node else None
    return MemberSpec(
        name=name,
        arch=arch,
        weights=weights,
        kwargs=kwargs,
        sha256=sha256,
        weight=weight,
        input=member_input,
        state_dict=rules,
        execution=None if execution == ensemble_execution else execution,
    )


def _parse_execution(node: _Node, base: Execution) -> Execution:
    """`execution: {plan: auto | eager | <plan>, compile: false}`; a member's keys override its ensemble's `base`."""
    node.keys(optional={"plan", "compile"})
    execution = base
    if "plan" in node:
        execution = replace(execution, plan=node["plan"].choice(PLANS))
    if "compile" in node:
        execution = replace(execution, compile=node["compile"].boolean())
    return execution


def _parse_state_dict(node: _Node) -> StateDictRules:
    """`state_dict: {key, drop, strip_prefix, rename}`: every regex compiled and every replacement checked now."""
    node.keys(optional={"key", "drop", "strip_prefix", "rename"})
    rules = StateDictRules()
    if "key" in node:
        rules = replace(rules, key=node["key"].string(pattern=_DOTTED, what="a dotted path such as state_dict or model.ema"))
    if "drop" in node:
        drops = node["drop"]
        rules = replace(rules, drop=tuple(drops[i].regex().pattern for i in range(len(drops.string_list(min_len=1)))))
    if "strip_prefix" in node:
        rules = replace(rules, strip_prefix=tuple(node["strip_prefix"].string_list(min_len=1)))
    if "rename" in node:
        renames = node["rename"]
        if not isinstance(renames.value, list) or not renames.value:
            renames.fail("expected a non-empty list of [regex, replacement] pairs")
        rules = replace(rules, rename=tuple(_parse_rename(renames[i]) for i in range(len(renames.value))))
    return rules


def _parse_rename(node: _Node) -> tuple[str, str]:
    pair = node.value
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
        node.fail(f"expected a [regex, replacement] pair of strings, got {pair!r}")
    pattern = node[0].regex()
    try:
        pattern.sub(pair[1], "")  # Python checks the replacement's group references here, before any match.
    except (re.error, IndexError) as e:
        node[1].fail(f"invalid replacement for {pattern.pattern!r}: {e}")
    return pattern.pattern, pair[1]


def _parse_arch(node: _Node, base_dir: Path) -> str:
    arch = node.string()
    if arch.startswith("torchvision:"):
        import torchvision.models

        builder = arch.split(":", 1)[1]
        if builder not in torchvision.models.list_models():
            node.fail(f"unknown torchvision model {builder!r}")
        return arch
    file_name, sep, class_name = arch.rpartition(":")
    if not sep or not file_name.endswith(".py") or not class_name.isidentifier():
        node.fail(f"expected 'torchvision:<builder>' or '<path/to/file.py>:<Class>', got {arch!r}")
    path = base_dir / file_name
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError) as e:
        node.fail(f"cannot read model file {path}: {e}")
    if not any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body):
        node.fail(f"model file {file_name} defines no top-level class {class_name!r}")
    return arch


def _parse_limits(node: _Node) -> Limits:
    node.keys(optional={"max_images_per_request", "max_image_pixels", "formats"})
    limits = Limits()
    if "max_images_per_request" in node:
        limits = replace(limits, max_images_per_request=node["max_images_per_request"].integer(1, 4096))
    if "max_image_pixels" in node:
        # Above Pillow's own bomb threshold every image would be refused anyway: say so at build time.
        limits = replace(limits, max_image_pixels=node["max_image_pixels"].integer(64, Image.MAX_IMAGE_PIXELS or 200_000_000))
    if "formats" in node:
        formats = node["formats"].string_list(min_len=1)
        for i, fmt in enumerate(formats):
            if fmt not in KNOWN_FORMATS:
                node["formats"][i].fail(f"unknown image format {fmt!r}; known: {', '.join(KNOWN_FORMATS)}")
        limits = replace(limits, formats=tuple(formats))
    return limits


def _parse_batching(node: _Node) -> Batching:
    bounds = {
        "batch_size": (1, 1024),
        "max_batch_delay_ms": (0, 10_000),
        "micro_batch_size": (1, 4096),
        "workers": (1, 64),
        "response_timeout_s": (1, 3600),
    }
    node.keys(optional={*bounds, "fuse_members"})
    values: dict[str, Any] = {key: node[key].integer(*bounds[key]) for key in bounds if key in node}
    if "fuse_members" in node:
        values["fuse_members"] = node["fuse_members"].boolean()
    return replace(Batching(), **values)


class _Node:
    """A value from a config file with its key path, so every check can say where it failed."""

    def __init__(self, value: Any, path: str, source: str) -> None:
        self.value = value
        self.path = path
        self.source = source

    def fail(self, message: str) -> Any:
        where = f"{self.path}: " if self.path else ""
        raise ConfigError(f"{self.source}: {where}{message}")

    def __contains__(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def __getitem__(self, key: str | int) -> _Node:
        if isinstance(key, int):
            return _Node(self.value[key], f"{self.path}[{key}]", self.source)
        if key not in self:
            self.fail(f"missing key {key!r}")
        return _Node(self.value[key], f"{self.path}.{key}" if self.path else str(key), self.source)

    def keys(self, *, required: AbstractSet[str] = frozenset(), optional: AbstractSet[str] = frozenset()) -> None:
        """Insist on a mapping with every required key and no key outside required | optional."""
        if not isinstance(self.value, dict):
            self.fail(f"expected a mapping, got {type(self.value).__name__}")
        for key in self.value:
            if key not in required | optional:
                valid = ", ".join(sorted(required | optional))
                _Node(None, f"{self.path}.{key}" if self.path else str(key), self.source).fail(
                    f"unknown key; valid keys here: {valid}"
                )
        for key in sorted(required):
            if key not in self.value:
                self.fail(f"missing key {key!r}")

    def string(self, *, pattern: re.Pattern[str] | None = None, what: str = "a string") -> str:
        if not isinstance(self.value, str) or not self.value:
            self.fail(f"expected {what}, got {self.value!r}")
        if pattern is not None and not pattern.fullmatch(self.value):
            self.fail(f"expected {what}, got {self.value!r}")
        return self.value

    def regex(self) -> re.Pattern[str]:
        try:
            return re.compile(self.string(what="a regular expression"))
        except re.error as e:
            self.fail(f"invalid regular expression {self.value!r}: {e}")

    def choice(self, options: tuple[str, ...]) -> str:
        if self.value not in options:
            self.fail(f"expected one of {', '.join(options)}, got {self.value!r}")
        return str(self.value)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail(f"expected true or false, got {self.value!r}")
        return self.value

    def integer(self, low: int, high: int) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or not low <= self.value <= high:
            self.fail(f"expected an integer from {low} to {high}, got {self.value!r}")
        return int(self.value)

    def number(self, *, low: float, high: float, low_open: bool = False) -> float:
        value = self.value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > high or value < low or (low_open and value == low):
            bound = "(" if low_open else "["
            self.fail(f"expected a number in {bound}{low}, {high}], got {value!r}")
        return float(value)

    def string_list(self, *, min_len: int) -> list[str]:
        if not isinstance(self.value, list) or len(self.value) < min_len:
            self.fail(f"expected a list of at least {min_len} string(s), got {self.value!r}")
        return [self[i].string() for i in range(len(self.value))]

    def int_list(self, *, length: int, low: int, high: int) -> list[int]:
        if not isinstance(self.value, list) or len(self.value) != length:
            self.fail(f"expected a list of {length} integers, got {self.value!r}")
        return [self[i].integer(low, high) for i in range(length)]

    def float_list(self, *, length: int, low: float, high: float) -> list[float]:
        if not isinstance(self.value, list) or len(self.value) != length:
            self.fail(f"expected a list of {length} numbers, got {self.value!r}")
        return [self[i].number(low=low, high=high) for i in range(length)]


def _lists(value: Any) -> Any:
    """Tuples to lists, so the manifest round-trips through JSON unchanged."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value
