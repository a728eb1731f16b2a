"""Execution plans shared by a model's workers: the first measures and records, the others reuse its choices.

So every worker of a model runs the same plans and gives the same scores for the same image. The file
is only a hint: every remembered plan is verified against eager again before use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLANS_FILE = "execution-plans.json"
PLANS_LOCK = ".execution-plans.lock"
logger = logging.getLogger(__name__)


@dataclass
class SharedPlans:
    """The choices other workers recorded in the same `context` (`remembered`), and `record` for this worker's."""

    path: Path
    context: Mapping[str, Any]
    remembered: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def record(self, choices: Mapping[str, Mapping[str, Any]]) -> None:
        """Write this worker's choices when it measured any itself; reused choices need no write."""
        if any(choice["measured_by"] == "this worker" for choice in choices.values()):
            _write_plans(self.path, {"context": dict(self.context), "members": dict(choices)})


@contextmanager
def shared_plans(model_dir: Path, context: Mapping[str, Any]) -> Iterator[SharedPlans]:
    """Hold the model's plan lock while a worker chooses its plans: workers of one model choose one at a time."""
    with _exclusive(model_dir / PLANS_LOCK):
        path = model_dir / PLANS_FILE
        yield SharedPlans(path, context, _read_plans(path, context))


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` across processes; without a lock file, workers choose independently."""
    try:
        handle = path.open("a")
    except OSError:
        logger.warning("cannot open %s; workers choose their plans independently", path, exc_info=True)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_plans(path: Path, context: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Plan choices another worker of this model wrote, if made in the same `context`; else none."""
    try:
        saved = json.loads(path.read_text())
        if saved["context"] == dict(context) and isinstance(saved["members"], dict):
            return saved["members"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}


def _write_plans(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically, so a worker starting meanwhile reads the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)
    except OSError:
        logger.warning(
            "cannot record the execution plans in %s; the next worker measures them again", path, exc_info=True
        )
