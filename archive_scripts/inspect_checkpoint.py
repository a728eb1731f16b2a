"""Show a checkpoint file's layout and the `state_dict:` block that loads it strictly into an architecture.

Usage: python -m archive_scripts.inspect_checkpoint FILE --arch ARCH [--kwargs JSON]
       (or make inspect FILE=... ARCH=... KWARGS='{"num_classes": 14}')

ARCH is written as in ensembles.yaml (`torchvision:<builder>`, `timm:<model>`, `<package.module>:<Name>`,
`<path/to/file.py>:<Class>` relative to the current folder). With --input C,H,W it also shows what the
forward returns and proposes the `output:` blocks that select scores from a structure. The file is read exactly
as the build reads it (weights_only=True or safetensors); nothing is downloaded and nothing pickled is run.
Exit status 0 when a block that fits every tensor was found, 1 when something is still missing, 2 when the file
or architecture is unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import cast

import torch

from handlers.config.specs import MemberSpec, StateDictRules
from handlers.errors import MemberLoadError
from handlers.execution.outputs import PROBE_ROWS, describe, output_blocks
from handlers.weights.checkpoints import (
    CheckpointError,
    Target,
    compare,
    forgiven_note,
    is_state_dict,
    read_checkpoint,
    remap_keys,
    saved_versions,
)
from handlers.weights.diagnosis import SHAPE_HINT, layout, propose
from handlers.weights.loading import build_member, sha256_of


def inspect(path: Path, arch: str, kwargs: dict, input_shape: tuple[int, ...] | None = None) -> tuple[str, bool]:
    """The report, and whether a block that loads every tensor strictly was found; with `input_shape`, also what
    the forward returns for a probe of that shape, and the `output:` blocks that select scores from it."""
    content = read_checkpoint(path)
    module = build_member(MemberSpec(name="inspected", arch=arch, weights=str(path), kwargs=kwargs), Path.cwd())
    report, fits = _weights_report(path, content, Target.of(module), arch, kwargs)
    if input_shape is not None:
        report += "\n\n" + _outputs_report(module, input_shape)
    return report, fits


def _outputs_report(module: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """What the forward returns (with random weights: only the structure and shapes count) and the blocks that fit."""
    probe = torch.randn(PROBE_ROWS, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        returned = module.eval()(probe)
    lines = [f"its forward returns {describe(returned)} for a probe of {PROBE_ROWS} rows of {list(input_shape)}"]
    if isinstance(returned, torch.Tensor):
        lines.append("  a tensor: no output: block is needed when its last dimension is one score per label")
        return "\n".join(lines)
    blocks = output_blocks(returned, "multiclass")
    if not blocks:
        lines.append("  no part of it is [N, C] scores (after dropping trailing dimensions of size 1)")
    lines += [f"  {block}   # {count} labels" for block, count in blocks]
    return "\n".join(lines)


def _weights_report(path: Path, content: object, target: Target, arch: str, kwargs: dict) -> tuple[str, bool]:
    lines = [f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(path)}", *layout(content), ""]
    lines.append(f"against {arch} {json.dumps(kwargs)} ({len(target.state)} tensors):")
    if is_state_dict(content):
        state = cast(dict[str, torch.Tensor], content)  # is_state_dict checked it
        as_is = compare(remap_keys(state, StateDictRules()), target, saved_versions(content, None))
        lines.append("  as the file is: " + as_is.summary().replace("\n", "\n  "))
    proposal = propose(content, target)
    if proposal is None:
        lines.append("  no mapping of tensors in this file; there is nothing to load")
        return "\n".join(lines), False
    if proposal.mismatch.fits:
        lines.append("  this state_dict: block loads every tensor strictly (add it to the member in ensembles.yaml):")
        lines.append(proposal.block("    ") if proposal.rules.to_dict() else "    none needed: the file loads as it is")
        forgiven = forgiven_note(proposal.mismatch.filled, proposal.mismatch.discarded)
        if forgiven:
            lines.append(f"  and torch's own loading rules complete it: {forgiven}")
        return "\n".join(lines), True
    lines.append(
        "  no block loads every tensor; the closest one still leaves "
        + proposal.mismatch.summary().replace("\n", "\n  ")
    )
    lines.append(proposal.block("    "))
    if proposal.mismatch.reshaped:
        lines.append("  " + SHAPE_HINT.strip())
    return "\n".join(lines), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument(
        "--arch", required=True, help="torchvision:<builder>, timm:<model> or <path/to/file.py>:<Class>"
    )
    parser.add_argument("--kwargs", default="{}", help="constructor keyword arguments as a JSON object")
    parser.add_argument(
        "--input", default=None, help="one input's shape, e.g. 3,48,48: also show what the forward returns"
    )
    args = parser.parse_args()
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("expected a JSON object")
        shape = None if args.input is None else tuple(int(size) for size in args.input.split(","))
        report, fits = inspect(args.file, args.arch, kwargs, shape)
    except (CheckpointError, MemberLoadError, ValueError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(report)
    raise SystemExit(0 if fits else 1)


if __name__ == "__main__":
    main()
