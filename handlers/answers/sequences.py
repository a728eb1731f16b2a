"""A request's images read as frames in time order: when each label was on, and a debounced decision.

FlexServe's camera use case sends chronological batches of frames to infer an object moving
through a sector. With `sequence=true` the answer summarises, per label (binary: the positive
label only), the frames where the combined decision had it on, the first such frame and the
longest run of consecutive frames; `min_run=m` debounces: the label counts as detected only when
at least m consecutive frames have it on, the usual way to drop one-frame false alarms in video.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def summarize(chosen: torch.Tensor, labels: Sequence[str], *, only: int | None, min_run: int) -> dict[str, Any]:
    """The `sequence` part of an answer from `chosen[frame, label]`; `only` limits it to one label (binary)."""
    indices = [only] if only is not None else range(len(labels))
    on_frames = chosen.T.tolist()
    summary = {}
    for index in indices:
        frames = [frame for frame, on in enumerate(on_frames[index]) if on]
        start, length = _longest_run(frames)
        summary[labels[index]] = {
            "frames_on": frames,
            "first": frames[0] if frames else None,
            "longest_run": {"start": start, "length": length},
            "detected": length >= min_run,
        }
    return {"frames": int(chosen.shape[0]), "min_run": min_run, "labels": summary}


def _longest_run(frames: list[int]) -> tuple[int | None, int]:
    """Start and length of the longest run of consecutive frame numbers (the earliest on ties)."""
    best_start, best_length, start, length = None, 0, None, 0
    for i, frame in enumerate(frames):
        if i and frame == frames[i - 1] + 1:
            length += 1
        else:
            start, length = frame, 1
        if length > best_length:
            best_start, best_length = start, length
    return best_start, best_length
