"""Deciding one request's answer: its members' probabilities combined by its policy.

`Decider` knows the ensemble's members (weights, which labels each scores) and gives an `Answer`,
which `answers.render.Renderer` turns into our JSON or v2 tensors. Early exit asks the decider, after
each stage, which images are settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from handlers.answers.policies import Decision, Votes, combine, member_votes, settled
from handlers.answers.uncertainty import Uncertainty, deferrals, measure
from handlers.config.policy import PolicySpec
from handlers.config.specs import EnsembleSpec


@dataclass(frozen=True)
class Answer:
    """One request's answer before rendering: the members that answered, their probabilities and own
    votes `[member, image, label]`, the policy and its decision; which members ran on each image
    `[member, image]` (all of them unless the policy stops early), the uncertainty when asked for, and
    why each image's answer is deferred (None where it is not) when the ensemble defers."""

    names: tuple[str, ...]
    probs: torch.Tensor
    own: torch.Tensor
    decision: Decision
    policy: PolicySpec
    ran: torch.Tensor
    uncertainty: Uncertainty | None = None
    deferred: list[str | None] | None = None


class Decider:
    """Decides answers for one ensemble's members, by each request's policy."""

    def __init__(self, spec: EnsembleSpec) -> None:
        self.spec = spec
        self._weights = torch.tensor([member.weight for member in spec.members], dtype=torch.float64)
        scored = [member.labels or spec.labels for member in spec.members]
        self._scoring = torch.tensor([[label in own for label in spec.labels] for own in scored], dtype=torch.long)
        self._contexts: dict[
            tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, ...], ...] | None]
        ] = {}

    def positions(self, members: Sequence[str] | None) -> tuple[int, ...]:
        """The declaration positions of the named members (all of them for None)."""
        names = [member.name for member in self.spec.members]
        return tuple(range(len(names))) if members is None else tuple(sorted(names.index(name) for name in members))

    def decide(
        self,
        probs: torch.Tensor,
        policy: PolicySpec,
        members: tuple[int, ...],
        *,
        stages: Sequence[Sequence[int]] | None = None,
        uncertainty: bool = False,
    ) -> Answer:
        """The answer of `members` (positions) from every member's `probs` [member, image, label], for either form.

        `stages` (member positions, in the order early exit runs them) are what cascade simulates; NaN marks a member
        that did not run on an image. `uncertainty` measures how sure the answer is; a `defer:` always does.
        """
        mine = probs[list(members)]
        votes = self.votes(policy, members, stages)
        own = member_votes(mine, votes)
        measured = deferred = None
        if uncertainty or self.spec.defer:
            measured = measure(mine, own, votes.weights, multilabel=self.spec.task == "multilabel")
            deferred = deferrals(measured, self.spec.defer, self.spec.labels) if self.spec.defer else None
        names = tuple(self.spec.members[m].name for m in members)
        ran = ~mine.isnan().all(dim=-1)
        return Answer(names, mine, own, combine(mine, votes), policy, ran, measured if uncertainty else None, deferred)

    def settled(
        self, probs: torch.Tensor, policy: PolicySpec, members: tuple[int, ...], stages: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Per image, whether the members that ran so far (`probs` NaN for the others) settle its answer under
        `policy`."""
        return settled(probs[list(members)], self.votes(policy, members, stages))

    def votes(
        self, policy: PolicySpec, members: tuple[int, ...], stages: Sequence[Sequence[int]] | None = None
    ) -> Votes:
        """The policy's context for `members`: their weights, how many score each label, and their stages renumbered
        to their positions among `members`."""
        weights, scoring, within = self._context(members, None if stages is None else tuple(map(tuple, stages)))
        return Votes(self.spec.task, weights, self.spec.positive_index, policy, scoring=scoring, stages=within)

    def _context(
        self, members: tuple[int, ...], stages: tuple[tuple[int, ...], ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, ...], ...] | None]:
        """`members`' weights, how many of them score each label, and `stages` among them: the same for every request
        that names the same members, so computed once (early exit asks after every stage)."""
        known = self._contexts.get((members, stages))
        if known is not None:
            return known
        mine = list(members)
        within = None
        if stages is not None:
            where = {m: i for i, m in enumerate(mine)}
            within = tuple(kept for stage in stages if (kept := tuple(where[m] for m in stage if m in where)))
        context = self._weights[mine], self._scoring[mine].sum(dim=0), within
        self._contexts[members, stages] = context
        return context
