"""The demo members' trained weights, pinned by digest: `make demo` checks what it trained against them.

The docs show answers of the demos as trained here; they hold wherever training gives the same
tensors. A checkpoint file's own sha256 cannot pin that: `torch.save` writes a random serialization id
into every file, so the same tensors saved twice differ byte for byte. The pin is the sha256 of the
tensors themselves, as the member's loading rules read them back from its file (names, dtypes, shapes
and bytes, in name order): the same digest means the server loads the same weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from handlers.config.specs import EnsembleSpec
from handlers.weights.loading import build_member, member_weights

PINNED = Path(__file__).with_name("demo_weights.json")

Digests = dict[str, dict[str, str]]


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a state_dict's tensors: each name, dtype, shape and little-endian bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_back(spec: EnsembleSpec) -> dict[str, str]:
    """Each member's digest as its `weights:` file reads back under its ensembles.yaml rules (what a server loads)."""
    return {
        member.name: state_digest(member_weights(member, spec.base_dir, build_member(member, spec.base_dir)).state)
        for member in spec.members
    }


def pinned(path: Path = PINNED) -> Digests:
    """The committed digests, by ensemble and member."""
    return json.loads(path.read_text())["weights"]


def record(digests: Digests, kernels: Mapping[str, object], path: Path = PINNED) -> None:
    """Write `digests` (merged over the ones already pinned) with the kernel settings that trained them."""
    merged = {**(pinned(path) if path.exists() else {}), **digests}
    path.write_text(json.dumps({"kernels": dict(kernels), "weights": merged}, indent=2, sort_keys=True) + "\n")


def differences(trained: Digests, expected: Digests) -> list[str]:
    """One line per trained member whose digest is not the pinned one (or that nothing pins)."""
    found = []
    for ensemble, members in trained.items():
        for member, digest in members.items():
            want = expected.get(ensemble, {}).get(member)
            if want is None:
                found.append(f"{ensemble}/{member}: no digest is pinned for it in {PINNED.name}")
            elif want != digest:
                found.append(f"{ensemble}/{member}: trained {digest[:16]}…, pinned {want[:16]}…")
    return found


def mismatch_message(lines: list[str], kernels: Mapping[str, object]) -> str:
    """What a user reads when training gave other weights: which members, why it matters, what to do."""
    return "\n".join(
        [
            f"make demo trained weights that differ from the pinned ones ({PINNED.relative_to(PINNED.parent.parent)}):",
            *(f"  {line}" for line in lines),
            f"Trained under: {dict(kernels)}",
            "Why it matters: the answers shown in README.md and docs/ were recorded from the pinned weights, so the",
            "documented examples (tests/test_doc_examples.py) will print other scores, and the demo tables in",
            "docs/demos.md will not be this machine's. The weights themselves are usable: `make serve` serves them.",
            "If you changed the demo data or a training recipe on purpose, record the new weights with",
            "  .venv/bin/python -m archive_scripts.train_demo --record-digests",
            "and re-record the docs' examples (docs/layout.md, 'Tested examples'). To keep these weights without",
            "recording them, run `make demo ACCEPT_OTHER_WEIGHTS=1`.",
        ]
    )
