"""One batch's member scores as they come in, and the members missing from each input."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from handlers.config.specs import EnsembleSpec
from handlers.execution.lanes import Job
from handlers.execution.missing import NON_FINITE


class Tally:
    """One batch's scores as they come in: `probs[member, input, label]` (NaN until a member answers an input), and
    per input the members missing from it and why; each member's forward seconds are added to `forward_seconds`."""

    def __init__(
        self, spec: EnsembleSpec, count: int, scored: torch.Tensor, forward_seconds: dict[str, float] | None
    ) -> None:
        """`scored[member, label]`: the labels each member scores (a multilabel member's others are NaN by design)."""
        self.names = [member.name for member in spec.members]
        self.probs = torch.full((len(spec.members), count, len(spec.labels)), math.nan, dtype=torch.float64)
        self.missing: list[dict[int, str]] = [{} for _ in range(count)]
        self._scored = scored
        self._forward_seconds = forward_seconds

    def store(self, job: Job, done: Sequence[tuple[torch.Tensor, float]], late: torch.Tensor | None = None) -> None:
        """A group's scores on its rows (averaged over views), except on the `late` inputs (past their deadline); a
        member's non-finite scores on an input make it missing there (`non_finite`) instead."""
        group, rows, _ = job
        scores = torch.cat([part for part, _ in done], dim=1).to("cpu", torch.float64)
        views = group.spec.views
        if views > 1:
            scores = torch.unflatten(scores, 1, (-1, views)).mean(dim=2)
        members = torch.tensor(group.indices)
        broken = ~(scores.isfinite() | ~self._scored[members][:, None, :]).all(dim=-1)
        if broken.any():
            scores[broken] = math.nan
            for m, row in broken.nonzero().tolist():
                self.missing[row if rows is None else int(rows[row])][group.indices[m]] = NON_FINITE
        if rows is None:
            self.probs[members] = scores
        else:
            self.probs[members[:, None], rows[None, :]] = scores
        if late is not None:
            self.probs[members[:, None], late[None, :]] = math.nan
        if self._forward_seconds is not None:
            seconds = sum(spent for _, spent in done) / len(group.indices)
            for member in group.indices:
                name = self.names[member]
                self._forward_seconds[name] = self._forward_seconds.get(name, 0.0) + seconds
