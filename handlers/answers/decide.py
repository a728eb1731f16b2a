"""Deciding one request's answer: its members' probabilities combined by its policy.

`Decider` knows the ensemble's members (weights, which labels each scores) and gives an `Answer`,
which `answers.render.Renderer` turns into our JSON or v2 tensors. Early exit asks the decider, after
each stage, which images are settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from handlers.answers.policies import Decision, Votes, combine, member_votes, partial, settled
from handlers.answers.uncertainty import Uncertainty, deferrals, measure
from handlers.config.policy import PolicySpec
from handlers.config.specs import EnsembleSpec
from handlers.errors import QuorumNotMet


@dataclass(frozen=True)
class Answer:
    """One request's answer before rendering: the members that answered, their probabilities and own
    votes `[member, image, label]`, the policy and its decision; which members ran on each image
    `[member, image]` (all of them unless the policy stops early), the uncertainty when asked for, and
    why each image's answer is deferred (None where it is not) when the ensemble defers; per image, the
    members missing from it and why, and whether they could have changed it (`partial`)."""

    names: tuple[str, ...]
    probs: torch.Tensor
    own: torch.Tensor
    decision: Decision
    policy: PolicySpec
    ran: torch.Tensor
    uncertainty: Uncertainty | None = None
    deferred: list[str | None] | None = None
    missing: list[dict[str, str]] = field(default_factory=list)
    partial: list[bool] = field(default_factory=list)

    def skipped(self) -> list[list[str]]:
        """Per image, the members an early exit spared: they did not run, and are not missing."""
        ran = self.ran.tolist()
        return [
            [name for m, name in enumerate(self.names) if not ran[m][i] and name not in self.missing[i]]
            for i in range(self.ran.shape[1])
        ]


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
        missing: Sequence[dict[int, str]] | None = None,
    ) -> Answer:
        """The answer of `members` (positions) from every member's `probs` [member, image, label], for either form.

        `stages` (member positions, in the order early exit runs them) are what cascade simulates; NaN marks a member
        that did not run on an image. `uncertainty` measures how sure the answer is; a `defer:` always does.
        `missing` (per image, member position -> why) are members that failed to answer: the answer is that of the
        members that did (k counts them), and says whether the missing ones could have changed it.
        """
        mine = probs[list(members)]
        full = self.votes(policy, members, stages)
        count = probs.shape[1]
        gone = [{m: why for m, why in (missing[i] if missing else {}).items() if m in members} for i in range(count)]
        votes, partial_images = full, [False] * count
        if any(gone):
            absent = torch.tensor([[m in gone[i] for i in range(count)] for m in members], dtype=torch.bool)
            scores = self._scoring[list(members)]
            votes = replace(full, absent=(absent[:, :, None] & scores[:, None, :].bool()).sum(dim=0))
            partial_images = partial(mine, votes, absent).tolist()

        own = member_votes(mine, votes)
        measured = deferred = None
        if uncertainty or self.spec.defer:
            measured = measure(mine, own, votes.weights, multilabel=self.spec.task == "multilabel")
            deferred = deferrals(measured, self.spec.defer, self.spec.labels) if self.spec.defer else None
        names = tuple(self.spec.members[m].name for m in members)
        ran = ~mine.isnan().all(dim=-1)
        named = [{self.spec.members[m].name: why for m, why in sorted(row.items())} for row in gone]
        measured = measured if uncertainty else None
        return Answer(names, mine, own, combine(mine, votes), policy, ran, measured, deferred, named, partial_images)

    def quorum(
        self, missing: Sequence[dict[int, str]], members: tuple[int, ...], min_members: int
    ) -> QuorumNotMet | None:
        """The refusal of a request whose image lacks a required member, or has fewer than `min_members` of `members`
        answering (`missing`: per image, member position -> why); None when every image has its quorum."""
        failing = []
        for i, absent in enumerate(missing):
            gone = [m for m in absent if m in members]
            if len(members) - len(gone) < min_members or any(self.spec.members[m].required for m in gone):
                failing.append(i)
        if not failing:
            return None
        named: dict[str, str] = {}
        for i in failing:
            for m, why in sorted(missing[i].items()):
                if m in members:
                    named.setdefault(self.spec.members[m].name, why)
        row = [m for m in missing[failing[0]] if m in members]
        problems = []
        hard = [self.spec.members[m].name for m in row if self.spec.members[m].required]
        if hard:
            problems.append(f"required member(s) {', '.join(hard)} did not answer")
        if len(members) - len(row) < min_members:
            problems.append(
                f"{len(members) - len(row)} of {len(members)} member(s) answered, min_members={min_members}"
            )
        images = f"image {failing[0]}" if len(failing) == 1 else f"images {', '.join(map(str, failing))}"
        reasons = "; ".join(f"{name}: {why}" for name, why in named.items())
        return QuorumNotMet(
            f"{' and '.join(problems)} for {images} ({reasons}); retry, give it a longer deadline_ms, or lower "
            "min_members",
            named,
            failing,
        )

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
