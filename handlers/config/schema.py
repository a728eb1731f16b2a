"""The pydantic models of ensembles.yaml and the archive manifest, and the JSON Schema editors check the yaml with.

Both files hold the same ensemble: ensembles.yaml as `ensembles: {<name>: <ensemble>}`, the manifest
inside a `.mar` as one resolved ensemble plus digests and provenance. The models check every rule,
across keys too; `to_spec` then turns a checked ensemble into the frozen specs the rest of the code reads.
Checks that read files (model files, weights) take the folder and `check_files` from the validation context.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema

from handlers.config.fields import Strict, choice, expect_integer, fail, integer, keyed, listed, text, within
from handlers.config.members import NAME, SHA256, MemberConfig, check_member_labels
from handlers.config.policy import TASKS
from handlers.config.sections import (
    BatchingConfig,
    DeadlineConfig,
    DeferConfig,
    ExecutionConfig,
    InputConfig,
    LimitsConfig,
    PolicyConfig,
)
from handlers.config.specs import CONSISTENCY, ArchiveManifest, EnsembleSpec, Execution

MANIFEST_FORMAT = 2
VERSION = r"[0-9A-Za-z][0-9A-Za-z._-]*"


def _ensemble_name(name: Any) -> Any:
    if not isinstance(name, str) or not re.fullmatch(NAME, name):
        fail(f"ensemble name {name!r} must match {NAME} (it is the TorchServe model name)")
    return name


EnsembleName = Annotated[str, Field(pattern=f"^{NAME}$"), BeforeValidator(_ensemble_name)]


class EnsembleConfig(Strict):
    """One ensemble: built into model_store/<name>.mar and served as the TorchServe model <name>."""

    version: Annotated[str, *text(VERSION, "a quoted version string like '1.0'")] = Field(
        description="The model version TorchServe registers, a quoted string such as '1.0'."
    )
    task: Annotated[str, *choice(TASKS)] = Field(
        description="`multiclass`: one label per answer (softmax). `binary`: two labels, a yes/no answer about "
        "`positive_label` (softmax over 2). `multilabel`: any number of labels per answer (sigmoid)."
    )
    labels: Annotated[tuple[Annotated[str, *text()], ...], *listed("a list of at least 1 string(s)", min_len=1)] = (
        Field(
            description="The members' output classes, in output order, without duplicates: exactly 2 for binary, "
            "at least 2 for multiclass, at least 1 for multilabel."
        )
    )
    positive_label: Annotated[str | None, *text()] = Field(
        None, description="Binary only, and required there: the label a yes answer means."
    )
    top_k: Annotated[int | None, *integer(1)] = Field(
        None,
        description="Multiclass only: how many labels each answer's `top` ranks, 1 to the label count. Default: 1.",
    )
    policy: PolicyConfig = Field(
        PolicyConfig(name="mean"), description="The default policy and its parameters (k, threshold). Default: mean."
    )
    defer: DeferConfig = Field(
        DeferConfig(),
        description="Thresholds on the answer's uncertainty (docs: policies, When the members disagree): "
        "an answer beyond any of them becomes `label: null` with `deferred: true` and the reason. "
        "Default: never defer.",
    )
    deadline: DeadlineConfig = Field(
        DeadlineConfig(),
        description="How long a request waits for its members and how many must answer (docs: Deadlines and "
        "quorum). Default: no deadline, one member.",
    )
    consistency: Annotated[str, *choice(CONSISTENCY)] = Field(
        "fast",
        description="`fast`: rows per forward call follow the load. `batch_invariant`: one row per call, so an image's "
        "answer is bit-identical whatever shares its batch (slower). Default: fast.",
    )
    input: InputConfig = Field(
        description="The input every member shares unless it overrides keys: `size` is required for images, "
        "`type: tensor` with `shape` for tensors.",
        json_schema_extra={
            "anyOf": [{"required": ["size"]}, {"required": ["type"], "properties": {"type": {"const": "tensor"}}}],
        },
    )
    limits: LimitsConfig = Field(
        LimitsConfig(), description="Per request: images, pixels per image, image formats. Default: each key's default."
    )
    batching: BatchingConfig = Field(
        BatchingConfig(),
        description="TorchServe batching and workers, and rows per forward call. Default: each key's default.",
    )
    execution: ExecutionConfig = Field(
        ExecutionConfig(), description="How members' forward calls run. Default: each key's default."
    )
    members: Annotated[tuple[MemberConfig, ...], *listed("a non-empty list of members", min_len=1, echo=False)] = Field(
        description="The models of the ensemble, at least one, with unique names."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"task": {"const": "binary"}}},
                    "then": {"required": ["positive_label"], "properties": {"labels": {"minItems": 2, "maxItems": 2}}},
                    "else": {"not": {"required": ["positive_label"]}},
                },
                {
                    "if": {"properties": {"task": {"const": "multiclass"}}},
                    "then": {"properties": {"labels": {"minItems": 2}}},
                    "else": {"not": {"required": ["top_k"]}},
                },
            ]
        }
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _enough_labels(cls, labels: Any, info: ValidationInfo) -> Any:
        task = info.data.get("task")
        least = 1 if task == "multilabel" else 2
        if task is not None and (not isinstance(labels, list) or len(labels) < least):
            fail(f"expected a list of at least {least} string(s), got {labels!r}")
        return labels

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if len(set(labels)) != len(labels):
            fail(f"duplicate labels in {list(labels)}")
        if info.data.get("task") == "binary" and len(labels) != 2:
            fail(f"a binary ensemble has exactly 2 labels, got {len(labels)}")
        return labels

    @field_validator("positive_label")
    @classmethod
    def _positive_is_a_label(cls, label: str, info: ValidationInfo) -> str:
        task, labels = info.data.get("task"), info.data.get("labels")
        if task is not None and task != "binary":
            fail(f"only binary ensembles take a positive_label; this one is {task}")
        if labels is not None and label not in labels:
            fail(f"expected one of {', '.join(labels)}, got {label!r}")
        return label

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_ranks_labels(cls, top_k: Any, info: ValidationInfo) -> Any:
        task, labels = info.data.get("task"), info.data.get("labels")
        if task is not None and task != "multiclass":
            fail(f"top_k ranks the labels of a multiclass ensemble; this one is {task}")
        return top_k if labels is None else expect_integer(top_k, 1, len(labels))

    @field_validator("input")
    @classmethod
    def _image_size_given(cls, spec: InputConfig) -> InputConfig:
        if spec.type == "image" and spec.size is None:
            fail("missing key 'size'")
        return spec

    @model_validator(mode="after")
    def _across_keys(self) -> Self:
        self.resolved()
        return self

    def resolved(self) -> dict[str, Any]:
        """Every field of the spec but its name and folder; checks the rules between keys on the way."""
        if self.task == "binary" and self.positive_label is None:
            fail("missing key 'positive_label' (required for task binary)")
        ensemble_input = within(("input",), self.input.ensemble_input)
        execution = self.execution.over(Execution())
        members = tuple(
            within(("members", i), partial(member.to_spec, ensemble_input, execution))
            for i, member in enumerate(self.members)
        )
        names = [member.name for member in members]
        for i, name in enumerate(names):
            if name in names[:i]:
                fail(f"duplicate member name {name!r}", "members", i, "name")
        check_member_labels(self.task, self.labels, members)
        batching = self.batching.to_batching()
        deadline = within(("deadline",), lambda: self.deadline.to_deadline(len(members), batching.response_timeout_s))
        return {
            "version": self.version,
            "task": self.task,
            "labels": self.labels,
            "positive_label": self.positive_label,
            "policy": within(("policy",), lambda: self.policy.resolve(self.task, len(members))),
            "input": ensemble_input,
            "members": members,
            "limits": self.limits.to_limits(),
            "batching": batching,
            "execution": execution,
            "top_k": (self.top_k or 1) if self.task == "multiclass" else None,
            "consistency": self.consistency,
            "defer": self.defer.to_thresholds(),
            "deadline": deadline,
        }

    def to_spec(self, name: str, base_dir: Path) -> EnsembleSpec:
        return EnsembleSpec(name=name, base_dir=base_dir, **self.resolved())


class EnsemblesFile(Strict):
    """ensembles.yaml: the ensembles `make build` turns into model_store/<name>.mar. Paths are relative to this file."""

    model_config = ConfigDict(title="ensembles.yaml")

    ensembles: Annotated[
        dict[EnsembleName, EnsembleConfig], *keyed("a mapping of ensemble names to ensembles", min_len=1)
    ] = Field(
        description=f"Ensembles by name; a name is the TorchServe model name: {NAME}.",
        json_schema_extra={"propertyNames": {"pattern": f"^{NAME}$"}},
    )

    def to_specs(self, base_dir: Path) -> dict[str, EnsembleSpec]:
        return {name: ensemble.to_spec(name, base_dir) for name, ensemble in self.ensembles.items()}


def _manifest_format(value: Any) -> Any:
    if value != MANIFEST_FORMAT or isinstance(value, bool):
        fail(f"unsupported manifest format {value!r}; expected {MANIFEST_FORMAT}")
    return value


class ManifestFile(Strict):
    """ensemble.json in a model archive: the resolved ensemble, every file's sha256, and where the weights came from."""

    format: Annotated[Literal[2], BeforeValidator(_manifest_format)] = Field(description="The manifest format, 2.")
    name: EnsembleName = Field(description="The ensemble's (and TorchServe model's) name.")
    ensemble: EnsembleConfig = Field(description="The ensemble as built, every default filled in.")
    digests: Annotated[
        dict[str, Annotated[str, *text(SHA256, "a lowercase hex sha256")]],
        *keyed("a mapping of archive paths to sha256 digests"),
    ] = Field(description="The sha256 of every file in the archive, by path.")
    build: Annotated[dict[str, Any], *keyed("a mapping")] = Field(
        description="When and with which versions the archive was built."
    )
    sources: Annotated[dict[str, Any], *keyed("a mapping")] = Field(
        description="Per member: the checkpoint it was built from and the rules applied."
    )
    engines: Annotated[dict[str, Any], *keyed("a mapping")] = Field(
        default_factory=dict,
        description="Per member: its ONNX export (file and exporter), or why the build could not export it.",
    )

    @model_validator(mode="after")
    def _one_source_per_member(self) -> Self:
        names = [member.name for member in self.ensemble.members]
        if sorted(self.sources) != sorted(names):
            fail(f"expected one entry per member {names}", "sources")
        return self

    def to_manifest(self, model_dir: Path) -> ArchiveManifest:
        return ArchiveManifest(
            ensemble=self.ensemble.to_spec(self.name, model_dir),
            digests=dict(self.digests),
            build=dict(self.build),
            sources=dict(self.sources),
            engines=dict(self.engines),
        )


class _FileSchema(GenerateJsonSchema):
    """The schema of the file as written: no null where a key may be absent, defaults as a file would write them."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if "default" in schema and schema["default"] is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, BaseModel):
            return dft.model_dump(mode="json", exclude_none=True)
        return super().encode_default(dft)

    def generate(self, schema: core_schema.CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        return {"$schema": self.schema_dialect, **super().generate(schema, mode)}


def ensembles_json_schema() -> dict[str, Any]:
    """The JSON Schema of ensembles.yaml, as committed in ensembles.schema.json."""
    return EnsemblesFile.model_json_schema(schema_generator=_FileSchema)
