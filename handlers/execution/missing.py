"""Why a member is missing from an input's answer, as the answer and the metrics name it.

`deadline`: it had not answered when the input's deadline came. `busy`: it was still running an earlier
batch's call. `error: <type>: <message>`: its forward raised. `non_finite`: it gave a NaN or infinite score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEADLINE, BUSY, NON_FINITE = "deadline", "busy", "non_finite"
REASONS = (DEADLINE, BUSY, "error", NON_FINITE)
ERROR_MESSAGE_CHARS = 200


def mark(missing: list[dict[int, str]], members: Sequence[int], rows: torch.Tensor | None, reason: str) -> None:
    """`members` (positions) are missing from `rows` (every input for None) for `reason`; a reason already given
    stays."""
    for row in range(len(missing)) if rows is None else rows.tolist():
        for member in members:
            missing[row].setdefault(member, reason)


def error_reason(error: BaseException) -> str:
    """`error: <type>: <message>`, the message's first line cut to ERROR_MESSAGE_CHARS."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"error: {type(error).__name__}: {first[:ERROR_MESSAGE_CHARS]}"


def reason_kind(reason: str) -> str:
    """The reason without an error's type and message: one of REASONS (a metric's label)."""
    return reason.split(":", 1)[0]
