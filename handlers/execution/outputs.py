"""From what a member's forward returns to probabilities in the ensemble's label order.

Models return tensors, tuples (MTCNN's stage networks), dicts, dataclasses or Hugging Face ModelOutputs.
`MemberHead` wraps a member: it picks the scores out of the structure (`output.select`), drops trailing
dimensions of size 1 (a fully convolutional net at its native size gives [N, C, 1, 1]), applies the
task's activation to logits (never to `probabilities`), and maps the member's own labels onto the
ensemble's by name. Extra outputs are dropped and the rest renormalised (binary, multiclass); in
multilabel a label the member does not cover is NaN, which no policy counts as a vote.

`fit_head` probes the member once when it loads (at build and in every worker) and refuses what does
not fit, saying what the forward returned, with types and shapes, and which `output:` blocks would fit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from handlers.config.specs import MemberSpec, OutputSpec
from handlers.errors import MemberLoadError

SUM_TOLERANCE = 1e-3
RANGE_TOLERANCE = 1e-6
PROBE_ROWS = 2
logger = logging.getLogger(__name__)
Path = tuple[int | str, ...]


class MemberHead(nn.Module):
    """A member whose forward returns probabilities [N, ensemble labels], whatever the model itself returns."""

    columns: torch.Tensor  # a buffer: the member's output for each ensemble label (`outputs` where not covered)

    def __init__(
        self, module: nn.Module, output: OutputSpec, task: str, columns: Sequence[int | None], outputs: int
    ) -> None:
        """`columns[j]` is the member's output for ensemble label j (None: not covered); it has `outputs` in all."""
        super().__init__()
        self.module = module
        self.select = output.select
        self.logits = output.kind == "logits"
        self.multilabel = task == "multilabel"
        self.dropped = outputs > sum(column is not None for column in columns)
        self.reordered = list(columns) != list(range(outputs))
        self.register_buffer("columns", torch.tensor([outputs if c is None else c for c in columns]), persistent=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        scores = squeeze_trailing(pick(self.module(batch), self.select)).float()
        if self.multilabel:
            probs = torch.sigmoid(scores) if self.logits else scores
            if self.reordered:
                uncovered = probs.new_full((*probs.shape[:-1], 1), float("nan"))
                probs = torch.cat([probs, uncovered], dim=-1).index_select(-1, self.columns)
            return probs
        kept = scores.index_select(-1, self.columns) if self.reordered else scores
        if self.logits:
            return torch.softmax(kept, dim=-1)
        return kept / kept.sum(dim=-1, keepdim=True) if self.dropped else kept


def fit_head(
    member: MemberSpec,
    module: nn.Module,
    instance_shape: tuple[int, ...],
    task: str,
    labels: Sequence[str],
    device: torch.device,
) -> MemberHead:
    """The member behind its head, once a probe batch proves its output fits; MemberLoadError saying why not."""
    own = list(member.labels or labels)
    probe = torch.randn(PROBE_ROWS, *instance_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        returned = module.to(device).eval()(probe)
    where = f"member {member.name!r}"
    shape = f"[N, {len(own)}]"
    if not member.output.select and not isinstance(returned, torch.Tensor):
        raise MemberLoadError(
            f"{where}: its forward returns {describe(returned)}, not a tensor; say which part holds its {len(own)} "
            f"scores with an output: block{_proposals(returned, own, task)}"
        )
    try:
        scores = pick(returned, member.output.select)
    except LookupError as e:
        raise MemberLoadError(
            f"{where}: output.select {show_path(member.output.select)}: {e}{_proposals(returned, own, task)}"
        ) from None
    if not isinstance(scores, torch.Tensor) or squeeze_trailing(scores).shape != (PROBE_ROWS, len(own)):
        selected = f" (output.select {show_path(member.output.select)})" if member.output.select else ""
        raise MemberLoadError(
            f"{where}: the scores{selected} are {describe(scores)} for a probe of {PROBE_ROWS} rows; "
            f"its {len(own)} labels "
            f"need {shape} after trailing dimensions of size 1 are dropped{_proposals(returned, own, task)}"
        )
    _check_kind(where, squeeze_trailing(scores).float(), member.output.kind, task)
    columns = [own.index(label) if label in own else None for label in labels]
    return MemberHead(module, member.output, task, columns, len(own))


def label_mapping(member: MemberSpec, labels: Sequence[str]) -> dict[str, Any]:
    """How `describe` shows a member's outputs: what it selects, their kind, and its labels against the ensemble's."""
    own = list(member.labels or labels)
    return {
        "select": list(member.output.select),
        "kind": member.output.kind,
        "columns": {label: own.index(label) for label in labels if label in own},
        "dropped": [label for label in own if label not in labels],
        "not_scored": [label for label in labels if label not in own],
    }


def pick(returned: Any, path: Path) -> Any:
    """The part of a forward's output at `path`: integers index tuples and lists, names pick keys or attributes."""
    value = returned
    for depth, step in enumerate(path):
        if isinstance(step, int):
            found = isinstance(value, (tuple, list)) and step < len(value)
            missing = f"no item {step}"
        elif isinstance(value, Mapping):
            found, missing = step in value, f"no key {step!r}"
        else:
            found = dataclasses.is_dataclass(value) and step in {f.name for f in dataclasses.fields(value)}
            missing = f"no key or field {step!r}"
        if not found:
            inner = f", and at {show_path(path[:depth])} it is {describe(value)}" if depth else ""
            raise LookupError(f"the forward returns {describe(returned)}{inner}, which has {missing}")
        value = value[step] if isinstance(step, int) or isinstance(value, Mapping) else getattr(value, step)
    return value


def squeeze_trailing(scores: torch.Tensor) -> torch.Tensor:
    """[N, C, 1, 1] -> [N, C]: trailing dimensions of size 1 dropped, never the batch or the label dimension."""
    while scores.dim() > 2 and scores.shape[-1] == 1:
        scores = scores.squeeze(-1)
    return scores


def describe(value: Any) -> str:
    """A structure's types and shapes, e.g. `tuple(Tensor[2, 4], Tensor[2, 10])` or
    `ImageClassifierOutput(logits=Tensor[2, 10])`."""
    if isinstance(value, torch.Tensor):
        return f"Tensor[{', '.join(str(size) for size in value.shape)}]"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(item) for item in value)})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__}({', '.join(f'{key}={describe(item)}' for key, item in value.items())})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = (f"{field.name}={describe(getattr(value, field.name))}" for field in dataclasses.fields(value))
        return f"{type(value).__name__}({', '.join(fields)})"
    return type(value).__name__


def show_path(path: Path) -> str:
    """A select path as ensembles.yaml writes it: `2`, `logits` or `[0, logits]`."""
    return str(path[0]) if len(path) == 1 else f"[{', '.join(str(step) for step in path)}]"


def largest_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference; NaN (a label a member does not score) must sit in the same places."""
    if got.shape != expected.shape or not torch.equal(got.isnan(), expected.isnan()):
        return float("inf")
    return float(torch.nan_to_num((got - expected).abs(), nan=0.0).max()) if got.numel() else 0.0


def looks_like_probabilities(scores: torch.Tensor, task: str) -> bool:
    """Every value in [0, 1] and, for binary and multiclass, every row summing to 1."""
    in_range = bool(((scores >= -RANGE_TOLERANCE) & (scores <= 1 + RANGE_TOLERANCE)).all())
    return in_range and (task == "multilabel" or bool(((scores.sum(dim=-1) - 1).abs() <= SUM_TOLERANCE).all()))


def _check_kind(where: str, scores: torch.Tensor, kind: str, task: str) -> None:
    if kind == "probabilities":
        low, high = float(scores.min()), float(scores.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise MemberLoadError(
                f"{where}: output kind probabilities, but the probe batch gave values from {low:.4g} to {high:.4g}, "
                "outside [0, 1]; if the model returns raw scores, declare output: {kind: logits}"
            )
        sums = scores.sum(dim=-1)
        if task != "multilabel" and not bool(((sums - 1).abs() <= SUM_TOLERANCE).all()):
            raise MemberLoadError(
                f"{where}: output kind probabilities, but the probe batch's rows sum to {float(sums.min()):.4g} to "
                f"{float(sums.max()):.4g}, not 1 (within {SUM_TOLERANCE:g}); if the model returns raw scores, "
                "declare output: {kind: logits}"
            )
    elif looks_like_probabilities(scores, task):
        what = "in [0, 1]" if task == "multilabel" else "in [0, 1] and summing to 1"
        logger.warning(
            "%s: its outputs already look like probabilities (every probe row %s); if its forward applies softmax or "
            "sigmoid, declare output: {kind: probabilities}, or they are activated twice",
            where,
            what,
        )


def _tensor_paths(value: Any, path: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _tensor_paths(item, (*path, index))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                yield from _tensor_paths(item, (*path, key))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensor_paths(getattr(value, f.name), (*path, f.name))


def output_blocks(returned: Any, task: str) -> list[tuple[str, int]]:
    """Every `output:` block that selects scores [N, C] from a structure (trailing size-1 dimensions dropped), with
    C."""
    blocks = []
    for path, tensor in _tensor_paths(returned):
        scores = squeeze_trailing(tensor)
        if path and scores.dim() == 2 and scores.shape[0] == PROBE_ROWS:
            kind = "probabilities" if looks_like_probabilities(scores.float(), task) else "logits"
            blocks.append((f"output: {{select: {show_path(path)}, kind: {kind}}}", scores.shape[1]))
    return blocks


def _proposals(returned: Any, labels: Sequence[str], task: str) -> str:
    """The `output:` blocks that would fit the member's labels, as the end of an error message."""
    fits = [block for block, count in output_blocks(returned, task) if count == len(labels)]
    if not fits:
        return (
            f"; no part of its output has the shape [N, {len(labels)}] its labels need "
            "(labels: names the member's own outputs)"
        )
    return f"; each of these fits its {len(labels)} labels:\n  " + "\n  ".join(fits)
