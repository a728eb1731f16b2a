"""The demos' weights are the same on every x86-64 CPU with AVX2: training runs under pinned kernels, and what it
trained is checked against the digests committed in archive_scripts/demo_weights.json.

The digest is the sha256 of the tensors (a checkpoint file's own bytes change with every save); its
expected values here are written from its documented layout with `struct`, not from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archive_scripts import demo_weights, pinned_kernels
from handlers.config.files import load_ensembles
from handlers.weights.loading import sha256_of

ROOT = Path(__file__).resolve().parent.parent
TRAINED_DEMOS = ("shapes", "multishape", "digits")
PINNED_DESCRIPTION = {
    "aten_capability": "AVX2",
    "threads": 2,
    "mkldnn": False,
    "nnpack": False,
    "deterministic": True,
    "environment": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "COMPATIBLE",
        "MKL_DYNAMIC": "FALSE",
        "OMP_DYNAMIC": "FALSE",
        "MKL_NUM_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}
# Two kernel choices CPUs make by default: this machine's own, and an old one's (no vector ATen kernels, oneDNN's
# SSE4.1 convolutions, one core).
CPU_CHOICES = {
    "this-cpu": {},
    "sse41-1-core": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1"},
}
# A few AdamW steps of a small convolutional net: convolutions, batch norm, linear layers and their gradients.
TRAIN_A_LITTLE = """
import sys, torch
from archive_scripts import demo_weights, pinned_kernels
from archive_scripts.demo_models import TinyConvNet
if sys.argv[1] == "pinned":
    pinned_kernels.apply()
torch.manual_seed(3)
model = TinyConvNet(num_classes=3, in_channels=1, width=16)
images, targets = torch.randn(64, 1, 24, 24), torch.randint(0, 3, (64,))
optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
for batch in torch.arange(64).split(16):
    optimiser.zero_grad()
    torch.nn.functional.cross_entropy(model(images[batch]), targets[batch]).backward()
    optimiser.step()
print(demo_weights.state_digest(model.state_dict()))
"""


def ambient(**setting: str) -> dict[str, str]:
    """This process's environment without any pinned variable, with `setting` on top."""
    return {key: value for key, value in os.environ.items() if key not in pinned_kernels.ENVIRONMENT} | setting


def test_state_digest_is_the_sha256_of_names_dtypes_shapes_and_bytes_in_name_order() -> None:
    state = {"weight": torch.tensor([1.0, -2.0]), "count": torch.tensor(3)}
    expected = hashlib.sha256(
        b"count\0int64\0[]\0" + struct.pack("<q", 3) + b"weight\0float32\0[2]\0" + struct.pack("<2f", 1.0, -2.0)
    ).hexdigest()
    assert demo_weights.state_digest(state) == expected


def test_one_ulp_changes_the_digest() -> None:
    weight = torch.tensor([0.25, 0.5])
    moved = weight.clone()
    moved[1] = torch.nextafter(moved[1], torch.tensor(1.0))
    assert demo_weights.state_digest({"w": weight}) != demo_weights.state_digest({"w": moved})


def test_the_same_tensors_saved_twice_differ_as_files_but_not_as_digests(tmp_path: Path) -> None:
    """Why the pin is on tensors: torch.save writes a random serialization id into every file."""
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    torch.save(state, first)
    torch.save(state, second)
    assert sha256_of(first) != sha256_of(second)
    read = [torch.load(path, weights_only=True) for path in (first, second)]
    assert demo_weights.state_digest(read[0]) == demo_weights.state_digest(read[1]) == demo_weights.state_digest(state)


@pytest.mark.parametrize(
    ("trained", "expected"),
    [
        pytest.param({"shapes": {"a": "1" * 64}}, [], id="same"),
        pytest.param(
            {"shapes": {"a": "1" * 64, "b": "2" * 64}},
            ["shapes/b: trained 2222222222222222…, pinned 3333333333333333…"],
            id="one-differs",
        ),
        pytest.param(
            {"digits": {"vit": "4" * 64}},
            ["digits/vit: no digest is pinned for it in demo_weights.json"],
            id="not-pinned",
        ),
    ],
)
def test_differences_name_each_member(trained: demo_weights.Digests, expected: list[str]) -> None:
    assert demo_weights.differences(trained, {"shapes": {"a": "1" * 64, "b": "3" * 64}}) == expected


def test_the_mismatch_message_says_which_member_why_it_matters_and_what_to_do() -> None:
    lines = demo_weights.mismatch_message(
        ["shapes/b: trained 2222…, pinned 3333…"], {"aten_capability": "AVX2"}
    ).splitlines()
    assert lines[:3] == [
        "make demo trained weights that differ from the pinned ones (archive_scripts/demo_weights.json):",
        "  shapes/b: trained 2222…, pinned 3333…",
        "Trained under: {'aten_capability': 'AVX2'}",
    ]
    assert "the documented examples (tests/test_doc_examples.py) will print other scores" in " ".join(lines)
    assert lines[-3:-1] == [
        "  .venv/bin/python -m archive_scripts.train_demo --record-digests",
        "and re-record the docs' examples (docs/layout.md, 'Tested examples'). To keep these weights without",
    ]


def test_recorded_digests_merge_over_the_pinned_ones(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    demo_weights.record({"shapes": {"a": "1" * 64}, "digits": {"vit": "2" * 64}}, {"threads": 2}, path)
    demo_weights.record({"digits": {"vit": "3" * 64}}, {"threads": 2}, path)
    assert json.loads(path.read_text()) == {
        "kernels": {"threads": 2},
        "weights": {"digits": {"vit": "3" * 64}, "shapes": {"a": "1" * 64}},
    }


def test_a_process_started_under_another_kernel_choice_trains_under_the_pin() -> None:
    """`python -m archive_scripts.pinned_kernels`, started under a choice that differs from the pin in every library,
    restarts itself under the pin, as train_demo does, and reports it."""
    done = subprocess.run(
        [sys.executable, "-m", "archive_scripts.pinned_kernels"],
        cwd=ROOT,
        env=ambient(**CPU_CHOICES["sse41-1-core"]),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(done.stdout) == PINNED_DESCRIPTION


def test_apply_refuses_a_process_started_without_the_pin() -> None:
    code = (
        "from archive_scripts import pinned_kernels\n"
        "try:\n"
        "    pinned_kernels.apply()\n"
        "except pinned_kernels.PinUnavailable as e:\n"
        "    print(e)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ambient(), capture_output=True, text=True, check=True, timeout=120
    )
    differs = {key: None for key in pinned_kernels.ENVIRONMENT}
    assert done.stdout == f"started without the pinned environment (differs: {differs}); run through reexec_pinned\n"


@pytest.mark.slow
def test_two_cpus_kernel_choices_train_other_weights_unpinned_and_the_same_pinned() -> None:
    digests = {}
    for pin in ("unpinned", "pinned"):
        for choice, setting in CPU_CHOICES.items():
            environ = ambient(**setting) | (dict(pinned_kernels.ENVIRONMENT) if pin == "pinned" else {})
            done = subprocess.run(
                [sys.executable, "-c", TRAIN_A_LITTLE, pin],
                cwd=ROOT,
                env=environ,
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            digests[pin, choice] = done.stdout.strip()
    assert digests["unpinned", "this-cpu"] != digests["unpinned", "sse41-1-core"]
    assert digests["pinned", "this-cpu"] == digests["pinned", "sse41-1-core"]


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", TRAINED_DEMOS)
def test_the_trained_demos_are_the_pinned_weights(ensemble: str) -> None:
    """What `make demo` trained here reads back, under each member's rules, to the committed digests."""
    assert (ROOT / "artifacts" / "weights" / ".trained").exists(), (
        "the demos are not trained: run `make demo` (`make test` does)"
    )
    spec = load_ensembles(ROOT / "ensembles.yaml")[ensemble]
    assert demo_weights.read_back(spec) == demo_weights.pinned()[ensemble]
