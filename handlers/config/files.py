"""Reading ensembles.yaml and the archive manifest (`ensemble.json`) into validated specs, once.

Both files share one schema: `ensembles.yaml` holds `ensembles: {<name>: <ensemble>}`; the manifest
inside a `.mar` holds one resolved `<ensemble>` plus build provenance. Every error names the file and
the key path, e.g. `ensembles.yaml: ensembles.shapes.members[2].arch: unknown torchvision model 'resnet19'`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from handlers.config.nodes import Node
from handlers.config.policy import TASKS, PolicySpec, resolve_policy
from handlers.config.specs import (
    CHANNELS,
    CONSISTENCY,
    DEFAULT_NORM,
    INPUT_TYPES,
    KNOWN_FORMATS,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
    PLANS,
    RESIZE_MODES,
    TTA_VIEWS,
    ArchiveManifest,
    Batching,
    EnsembleSpec,
    Execution,
    InputSpec,
    Limits,
    MemberInput,
    MemberSpec,
    StateDictRules,
    TensorSpec,
)
from handlers.errors import ConfigError, InvalidPolicy

MANIFEST_NAME = "ensemble.json"
MANIFEST_FORMAT = 2
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DOTTED = re.compile(r"[^.\s]+(\.[^.\s]+)*")


def load_ensembles(path: Path, *, check_files: bool = True) -> dict[str, EnsembleSpec]:
    """Read ensembles.yaml. `check_files=False` skips weight-file existence (training writes them)."""
    source = path.name
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{source}: cannot read: {e}") from e
    top = Node(raw, "", source)
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
    top = Node(raw, "", MANIFEST_NAME)
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


def parse_ensemble(name: str, node: Node, *, base_dir: Path, check_files: bool) -> EnsembleSpec:
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


def _parse_policy(node: Node | None, task: str, n_members: int) -> PolicySpec:
    if node is None:
        return resolve_policy({"policy": "mean"}, default=None, task=task, n_members=n_members)
    node.keys(required={"name"}, optional={"k", "threshold"})
    requested = {("policy" if key == "name" else key): value for key, value in node.value.items()}
    try:
        return resolve_policy(requested, default=None, task=task, n_members=n_members)
    except InvalidPolicy as e:
        node.fail(str(e))


def _parse_input(node: Node, base: MemberInput | None) -> MemberInput:
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


def _parse_tensor_input(node: Node) -> TensorSpec:
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
    node: Node, ensemble_input: MemberInput, ensemble_execution: Execution, base_dir: Path, check_files: bool
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


def _parse_execution(node: Node, base: Execution) -> Execution:
    """`execution: {plan: auto | eager | <plan>, compile: false}`; a member's keys override its ensemble's `base`."""
    node.keys(optional={"plan", "compile"})
    execution = base
    if "plan" in node:
        execution = replace(execution, plan=node["plan"].choice(PLANS))
    if "compile" in node:
        execution = replace(execution, compile=node["compile"].boolean())
    return execution


def _parse_state_dict(node: Node) -> StateDictRules:
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


def _parse_rename(node: Node) -> tuple[str, str]:
    pair = node.value
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
        node.fail(f"expected a [regex, replacement] pair of strings, got {pair!r}")
    pattern = node[0].regex()
    try:
        pattern.sub(pair[1], "")  # Python checks the replacement's group references here, before any match.
    except (re.error, IndexError) as e:
        node[1].fail(f"invalid replacement for {pattern.pattern!r}: {e}")
    return pattern.pattern, pair[1]


def _parse_arch(node: Node, base_dir: Path) -> str:
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


def _parse_limits(node: Node) -> Limits:
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


def _parse_batching(node: Node) -> Batching:
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


