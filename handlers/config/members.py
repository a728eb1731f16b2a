"""A member of an ensemble as pydantic models: its architecture, weights, checkpoint rules and overrides.

The checks that read files (the architecture's model file, the weights) take the folder and whether the
weights must exist yet from the validation context, so ensembles.yaml and the manifest share them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from handlers.config.archs import HF_WEIGHTS, check_arch, check_package_member, hf_labels, requirement
from handlers.config.fields import Strict, boolean, choice, fail, keyed, listed, mapping, number, regex, text, within
from handlers.config.sections import ExecutionConfig, InputConfig
from handlers.config.specs import (
    OUTPUT_KINDS,
    Arch,
    Execution,
    MemberInput,
    MemberSpec,
    OutputSpec,
    StateDictRules,
    TensorSpec,
)

NAME = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
SHA256 = r"[0-9a-f]{64}"
DOTTED = r"[^.\s]+(\.[^.\s]+)*"


SectionModel = TypeVar("SectionModel", bound=Strict)
# An optional section: absent is None, while a null written in the file is refused like any non-mapping.
Section = Annotated[SectionModel | None, BeforeValidator(mapping)]


def _rename_pair(pair: Any) -> Any:
    """A [regex, replacement] pair, both checked now: Python reports a bad group reference only when substituting."""
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
        fail(f"expected a [regex, replacement] pair of strings, got {pair!r}")
    try:
        pattern = re.compile(pair[0])
    except re.error as e:
        fail(f"invalid regular expression {pair[0]!r}: {e}", 0)
    try:
        pattern.sub(pair[1], "")
    except (re.error, IndexError) as e:
        fail(f"invalid replacement for {pattern.pattern!r}: {e}", 1)
    return pair


RenamePair = Annotated[tuple[str, str], BeforeValidator(_rename_pair)]


class StateDictConfig(Strict):
    """Where a member's weights sit inside its checkpoint and how their keys become the architecture's.
    Applied in order: `key`, `drop`, `strip_prefix`, `rename`. Absent: the file is the state_dict as is."""

    key: Annotated[str | None, *text(DOTTED, "a dotted path such as state_dict or model.ema")] = Field(
        None,
        description="Dotted path to the weights inside a checkpoint dict, e.g. `state_dict` or `model.ema`. "
        "Default: the file itself.",
    )
    drop: Annotated[
        tuple[Annotated[str, *regex()], ...] | None, *listed("a list of at least 1 string(s)", min_len=1)
    ] = Field(
        None,
        description="Python regular expressions searched in the file's own key names: matching keys are removed first. "
        "Default: none.",
    )
    strip_prefix: Annotated[
        tuple[Annotated[str, *text()], ...] | None, *listed("a list of at least 1 string(s)", min_len=1)
    ] = Field(
        None,
        description="Prefixes, in order, each removed from every key that starts with it (e.g. `module.`). "
        "Default: none.",
    )
    rename: Annotated[
        tuple[RenamePair, ...] | None,
        *listed("a non-empty list of [regex, replacement] pairs", min_len=1, echo=False),
    ] = Field(
        None,
        description="[regex, replacement] pairs, applied in order to every key with Python's re.sub. Default: none.",
    )

    def to_rules(self) -> StateDictRules:
        return StateDictRules(
            key=self.key, drop=self.drop or (), strip_prefix=self.strip_prefix or (), rename=self.rename or ()
        )


def files_context(info: ValidationInfo) -> tuple[Path, bool]:
    """(the folder paths are relative to, whether the weights must exist) from the validation context."""
    if info.context is None:
        raise TypeError("validated without a context: it names base_dir and check_files")
    return info.context["base_dir"], info.context["check_files"]


SELECT_STEP = r"[A-Za-z_][A-Za-z0-9_]*"


def _select_step(step: Any) -> Any:
    if isinstance(step, bool) or not (
        (isinstance(step, int) and step >= 0) or (isinstance(step, str) and re.fullmatch(SELECT_STEP, step))
    ):
        fail(f"expected a tuple or list index (an integer from 0) or a key or attribute name, got {step!r}")
    return step


def _select_path(value: Any) -> Any:
    """One step, or a list of steps walked in order; a single step is kept as a one-step path."""
    steps = value if isinstance(value, list) else [value]
    if not steps:
        fail("expected an index, a name, or a non-empty list of them, e.g. [0, logits]")
    return tuple(_select_step(step) for step in steps)


SELECT_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": f"^{SELECT_STEP}$"},
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": f"^{SELECT_STEP}$"}]},
        },
    ]
}

# Absent is None (the output itself), while a null written in the file fails _select_path like any other bad step.
SelectPath = Annotated[tuple[int | str, ...] | None, BeforeValidator(_select_path), WithJsonSchema(SELECT_SCHEMA)]


class OutputConfig(Strict):
    """Which part of the member's forward output holds its scores, and what they are. After selection, trailing
    dimensions of size 1 are dropped ([N, C, 1, 1] becomes [N, C]); the rest must be [N, the member's labels]."""

    select: SelectPath = Field(
        None,
        description="An integer indexes a tuple or list, a name picks a dict key or an attribute (a Hugging Face "
        "ModelOutput's `logits`), a list walks nested structures, e.g. `[0, logits]`. Default: the output itself, "
        "which must then be a tensor (for a transformers: member, `logits`).",
    )
    kind: Annotated[str, *choice(OUTPUT_KINDS)] = Field(
        "logits",
        description="`logits`: softmax (binary, multiclass) or sigmoid (multilabel) is applied. `probabilities`: the "
        "model applies its own, and its outputs are used as they are, never activated twice. Default: logits.",
    )

    def to_output(self, default: OutputSpec) -> OutputSpec:
        return OutputSpec(select=default.select if self.select is None else self.select, kind=self.kind)


def _distinct(labels: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(labels)) != len(labels):
        fail(f"duplicate labels in {list(labels)}")
    return labels


class MemberConfig(Strict):
    """One member: its architecture, constructor arguments and weights; input and execution override the ensemble's."""

    name: Annotated[str, *text(NAME, f"a name matching {NAME}")] = Field(
        description=f"The member's name, unique in the ensemble: {NAME}."
    )
    arch: Annotated[str, *text()] = Field(
        description="`torchvision:<builder>` (checked against torchvision.models.list_models()), `timm:<model>` "
        "(checked against timm.list_models(), built with pretrained=False), `transformers:<path/to/folder>` (a Hugging "
        "Face image classifier as save_pretrained wrote it, built from its config.json), `<path/to/file.py>:<Class>` "
        "(relative to this file, parsed for the class, never run) or `<package.module>:<Name>` (a class or factory of "
        "an installed package)."
    )
    weights: Annotated[str | None, *text()] = Field(
        None,
        description="The checkpoint (.pt, .pth, .ckpt, .safetensors), relative to this file. Required, except for "
        "transformers: members, whose default is the folder's model.safetensors.",
    )
    kwargs: Annotated[dict[str, Any], *keyed("a mapping of keyword argument names to values")] = Field(
        default_factory=dict, description="Keyword arguments for the architecture's constructor. Default: none."
    )
    sha256: Annotated[str | None, *text(SHA256, "a lowercase hex sha256")] = Field(
        None,
        description="The checkpoint's lowercase hex sha256: the build refuses a weights file with another digest. "
        "Default: not pinned.",
    )
    weight: Annotated[float, *number(0.0, 1e6, low_open=True)] = Field(
        1.0, description="The member's weight in the `mean` policy, above 0 and at most 1000000. Default: 1."
    )
    input: Section[InputConfig] = Field(
        None, description="Input keys that differ from the ensemble's (tta too). Default: the ensemble's input."
    )
    state_dict: StateDictConfig = Field(
        StateDictConfig(), description="How to read a checkpoint as published. Default: the file is the state_dict."
    )
    execution: Section[ExecutionConfig] = Field(
        None, description="Execution keys that differ from the ensemble's. Default: the ensemble's execution."
    )
    output: Section[OutputConfig] = Field(
        None,
        description="Where the scores are in the forward's output, and their kind. "
        "Default: the output is a tensor of logits.",
    )
    labels: Annotated[
        tuple[Annotated[str, *text()], ...] | None,
        *listed("a list of at least 1 string(s)", min_len=1),
        AfterValidator(_distinct),
    ] = Field(
        None,
        description="The member's outputs by name, in its own order, matched to the ensemble's labels by name: extra "
        "outputs are dropped (binary, multiclass: the rest renormalised); "
        "in multilabel a member may cover some labels. "
        "Default: the ensemble's labels (transformers: the config's id2label).",
    )
    requires: Annotated[str | None, *text()] = Field(
        None,
        description="timm, transformers and package members: the pip requirement their code comes from, e.g. "
        "`facenet-pytorch==2.6.0`, checked against the environment. Default: the installed distribution's version, "
        "which the archive pins.",
    )
    required: Annotated[bool, *boolean()] = Field(
        True,
        description="`true`: a hard member, without which a request fails (503 naming it and why). `false`: a soft "
        "member, left out of an answer when it raises, returns non-finite scores, overruns the deadline or is still "
        "busy. Default: true.",
    )
    _found: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _arch_exists(cls, arch: str, info: ValidationInfo) -> str:
        check_arch(arch, *files_context(info))
        return arch

    @model_validator(mode="after")
    def _arch_resolved(self, info: ValidationInfo) -> Self:
        """What the architecture brings: a package's pinned version, a Hugging Face folder's weights and labels."""
        base_dir, check_files = files_context(info)
        arch = Arch.parse(self.arch)
        self._found["requires"] = within(("requires",), lambda: requirement(arch, self.requires))
        if arch.kind == "package":
            within(("arch",), lambda: check_package_member(arch))
        weights = self.weights
        if arch.kind == "transformers":
            self._found["labels"] = within(("arch",), lambda: hf_labels(base_dir / arch.target, check_files))
            weights = weights or f"{arch.target}/{HF_WEIGHTS}"
        elif weights is None:
            fail("missing key 'weights'")
        if check_files and not (base_dir / weights).is_file():
            fail(f"file not found: {base_dir / weights}", "weights")
        self._found["weights"] = weights
        return self

    def to_spec(self, ensemble_input: MemberInput, ensemble_execution: Execution) -> MemberSpec:
        """The member with its input and execution resolved against the ensemble's (None where they are equal)."""
        member_input = None
        if (given := self.input) is not None:
            if isinstance(ensemble_input, TensorSpec):
                fail("members of a tensor-input ensemble share its input; remove this member's input", "input")
            if given.type == "tensor":
                fail("only a whole ensemble takes tensor input; members of an image ensemble take images", "input")
            member_input = within(("input",), lambda: given.over(ensemble_input))
        execution = None if self.execution is None else self.execution.over(ensemble_execution)
        default_output = (
            OutputSpec(select=("logits",)) if Arch.parse(self.arch).kind == "transformers" else OutputSpec()
        )
        return MemberSpec(
            name=self.name,
            arch=self.arch,
            weights=self._found["weights"],
            kwargs=dict(self.kwargs),
            sha256=self.sha256,
            weight=self.weight,
            input=None if member_input == ensemble_input else member_input,
            state_dict=self.state_dict.to_rules(),
            execution=None if execution == ensemble_execution else execution,
            output=default_output if self.output is None else self.output.to_output(default_output),
            labels=self.labels or self._found.get("labels"),
            requires=self._found["requires"],
            required=self.required,
        )


def check_member_labels(task: str, labels: tuple[str, ...], members: tuple[MemberSpec, ...]) -> None:
    """Members' own labels against the ensemble's, matched by name (binary and multiclass members score every
    ensemble label, multilabel members some); every ensemble label must be scored by some member."""
    covered: set[str] = set()
    for i, member in enumerate(members):
        own = member.labels or labels
        covered.update(own)
        if task == "multilabel":
            unknown = [label for label in own if label not in labels]
            if unknown:
                fail(f"unknown labels {unknown}; this ensemble's labels are {list(labels)}", "members", i, "labels")
            continue
        missing = [label for label in labels if label not in own]
        if missing:
            hint = "; name the member's outputs with labels:" if member.labels is None else ""
            fail(
                f"member {member.name!r} has no output for {missing}: a {task} member scores every label of the "
                f"ensemble {list(labels)}, and may have more{hint}",
                "members",
                i,
                "labels",
            )
    uncovered = [label for label in labels if label not in covered]
    if uncovered:
        fail(f"no member scores {uncovered}; every label needs at least one member", "labels")
