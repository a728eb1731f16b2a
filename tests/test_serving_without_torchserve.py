"""docs/serving-without-torchserve.md: its example serves a built archive in-process, with TorchServe unimportable.

The example is read out of the page and run as it is, so a wrong example fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import image_bytes
from tests.fixture_reference import assert_answers, expected_answers

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "serving-without-torchserve.md"
# The keys of our JSON answer, in order, as the page names them.
ANSWER_KEYS = [
    "format",
    "ensemble",
    "version",
    "policy",
    "answered_by",
    "predictions",
    "members",
    "provenance",
    "warning",
]
RUN_TIMEOUT_S = 300


def example() -> str:
    """The page's one Python block: the code a reader copies."""
    [block] = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    return block


def test_the_documented_example_answers_as_torchserve_would(test_store: Path, tmp_path: Path) -> None:
    script = tmp_path / "serve_archive.py"
    script.write_text(example())
    # A `ts` package that cannot be imported, ahead of the real one: the example must not need TorchServe.
    blocker = tmp_path / "no-torchserve" / "ts"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("serving without TorchServe imported it")\n')
    images = [image_bytes(seed) for seed in (1201, 1202)]
    paths = [tmp_path / f"{seed}.png" for seed in (1201, 1202)]
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    # As the page says: saved in the repository root, so `handlers` imports.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, str(script), str(test_store / "trio.mar"), *map(str, paths)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = [line.split(" ", 1) for line in run.stdout.splitlines()]
    assert [status for status, _ in lines] == ["200", "200"]
    for (_, printed), data in zip(lines, images, strict=True):
        body = json.loads(printed)
        assert list(body) == ANSWER_KEYS
        assert (body["ensemble"], body["version"], body["answered_by"]) == (
            "trio",
            "2.1",
            ["mobile", "pool_rgb", "pool_gray"],
        )
        assert_answers(body["predictions"], expected_answers(test_store, "trio", [data]))


def test_the_page_names_the_answers_keys() -> None:
    text = DOC.read_text()
    assert [key for key in ANSWER_KEYS if f"`{key}`" not in text] == []


def test_extracting_a_zip_slip_entry_keeps_it_inside(tmp_path: Path) -> None:
    """The example unpacks with zipfile.extractall, which the page says drops `..` (CVE-2023-48299 hit TorchServe's own
    unzip)."""
    archive = tmp_path / "slip.mar"
    with zipfile.ZipFile(archive, "w") as slip:
        slip.writestr("../escaped.txt", "escaped")
    with zipfile.ZipFile(archive) as slip:
        slip.extractall(tmp_path / "folder")
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "folder",
        "folder/escaped.txt",
        "slip.mar",
    ]
