"""A member of an ensemble as pydantic models: its architecture, weights, checkpoint rules and overrides.

The checks that read files (the architecture's model file, the weights) take the folder and whether the
weights must exist yet from the validation context, so ensembles.yaml and the manifest share them.
"""

from __future__ import annotations

import ast
import re
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from handlers.config.fields import Strict, fail, keyed, listed, mapping, maybe, number, regex, text, within
from handlers.config.sections import ExecutionConfig, InputConfig
from handlers.config.specs import Execution, MemberInput, MemberSpec, StateDictRules, TensorSpec

NAME = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
SHA256 = r"[0-9a-f]{64}"
DOTTED = r"[^.\s]+(\.[^.\s]+)*"


def section(model: type[Strict]) -> Any:
    """An optional section: absent is None, while a null written in the file is refused like any non-mapping."""
    return maybe(Annotated[model, BeforeValidator(mapping)])


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

    key: maybe(text(DOTTED, "a dotted path such as state_dict or model.ema")) = Field(
        None,
        description="Dotted path to the weights inside a checkpoint dict, e.g. `state_dict` or `model.ema`. "
        "Default: the file itself.",
    )
    drop: maybe(listed(regex(), "a list of at least 1 string(s)", min_len=1)) = Field(
        None,
        description="Python regular expressions searched in the file's own key names: matching keys are removed first. "
        "Default: none.",
    )
    strip_prefix: maybe(listed(text(), "a list of at least 1 string(s)", min_len=1)) = Field(
        None, description="Prefixes, in order, each removed from every key that starts with it (e.g. `module.`). Default: none."
    )
    rename: maybe(
        listed(RenamePair, "a non-empty list of [regex, replacement] pairs", min_len=1, echo=False)
    ) = Field(None, description="[regex, replacement] pairs, applied in order to every key with Python's re.sub. Default: none.")

    def to_rules(self) -> StateDictRules:
        return StateDictRules(key=self.key, drop=self.drop or (), strip_prefix=self.strip_prefix or (), rename=self.rename or ())


def files_context(info: ValidationInfo) -> tuple[Path, bool]:
    """(the folder paths are relative to, whether the weights must exist) from the validation context."""
    return info.context["base_dir"], info.context["check_files"]


def check_arch(arch: str, base_dir: Path) -> None:
    """A zoo's model that exists (torchvision builder, timm model), or a model file that defines the class (parsed, never run)."""
    if arch.startswith("torchvision:"):
        import torchvision.models

        builder = arch.split(":", 1)[1]
        if builder not in torchvision.models.list_models():
            fail(f"unknown torchvision model {builder!r}")
        return
    if arch.startswith("timm:"):
        import timm

        model = arch.split(":", 1)[1]
        known = timm.list_models()
        if model not in known:
            close = get_close_matches(model, known, n=3)
            fail(f"unknown timm model {model!r}" + (f"; closest: {', '.join(close)}" if close else ""))
        return
    file_name, sep, class_name = arch.rpartition(":")
    if not sep or not file_name.endswith(".py") or not class_name.isidentifier():
        fail(f"expected 'torchvision:<builder>', 'timm:<model>' or '<path/to/file.py>:<Class>', got {arch!r}")
    path = base_dir / file_name
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as e:
        fail(f"cannot read model file {path}: {e}")
    if not any(isinstance(node, ast.ClassDef) and node.name == class_name for node in tree.body):
        fail(f"model file {file_name} defines no top-level class {class_name!r}")


class MemberConfig(Strict):
    """One member: its architecture, constructor arguments and weights; input and execution override the ensemble's."""

    name: text(NAME, f"a name matching {NAME}") = Field(description=f"The member's name, unique in the ensemble: {NAME}.")
    arch: text() = Field(
        description="`torchvision:<builder>` (checked against torchvision.models.list_models()), `timm:<model>` "
        "(checked against timm.list_models(), built with pretrained=False) or `<path/to/file.py>:<Class>`, "
        "relative to this file (parsed for the class, never run)."
    )
    weights: text() = Field(description="The checkpoint (.pt, .pth, .ckpt, .safetensors), relative to this file.")
    kwargs: keyed(str, Any, "a mapping of keyword argument names to values") = Field(
        default_factory=dict, description="Keyword arguments for the architecture's constructor. Default: none."
    )
    sha256: maybe(text(SHA256, "a lowercase hex sha256")) = Field(
        None,
        description="The checkpoint's lowercase hex sha256: the build refuses a weights file with another digest. "
        "Default: not pinned.",
    )
    weight: number(0.0, 1e6, low_open=True) = Field(
        1.0, description="The member's weight in the `mean` policy, above 0 and at most 1000000. Default: 1."
    )
    input: section(InputConfig) = Field(
        None, description="Input keys that differ from the ensemble's (tta too). Default: the ensemble's input."
    )
    state_dict: StateDictConfig = Field(
        StateDictConfig(), description="How to read a checkpoint as published. Default: the file is the state_dict."
    )
    execution: section(ExecutionConfig) = Field(
        None, description="Execution keys that differ from the ensemble's. Default: the ensemble's execution."
    )

    @field_validator("arch")
    @classmethod
    def _arch_exists(cls, arch: str, info: ValidationInfo) -> str:
        check_arch(arch, files_context(info)[0])
        return arch

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, weights: str, info: ValidationInfo) -> str:
        base_dir, check_files = files_context(info)
        if check_files and not (base_dir / weights).is_file():
            fail(f"file not found: {base_dir / weights}")
        return weights

    def to_spec(self, ensemble_input: MemberInput, ensemble_execution: Execution) -> MemberSpec:
        """The member with its input and execution resolved against the ensemble's (None where they are equal)."""
        member_input = None
        if self.input is not None:
            if isinstance(ensemble_input, TensorSpec):
                fail("members of a tensor-input ensemble share its input; remove this member's input", "input")
            if self.input.type == "tensor":
                fail("only a whole ensemble takes tensor input; members of an image ensemble take images", "input")
            member_input = within(("input",), lambda: self.input.over(ensemble_input))
        execution = None if self.execution is None else self.execution.over(ensemble_execution)
        return MemberSpec(
            name=self.name,
            arch=self.arch,
            weights=self.weights,
            kwargs=dict(self.kwargs),
            sha256=self.sha256,
            weight=self.weight,
            input=None if member_input == ensemble_input else member_input,
            state_dict=self.state_dict.to_rules(),
            execution=None if execution == ensemble_execution else execution,
        )
