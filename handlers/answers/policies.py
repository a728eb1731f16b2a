"""Combination policies: how the members' probabilities become one answer per image.

A policy is one record in `config.policy.POLICY_TABLE`; its `combines` picks one of the four decisions
here (`vote`, `mean`, `cascade`, `max`). A decision takes the members' probabilities
`probs[member, image, label]` and a `Votes` context, and returns a `Decision`: a boolean mask of the
chosen labels and a score per label. Multiclass and binary decisions choose at most one label
(none means the ensemble abstains); multilabel decisions choose any number.

Semantics (docs/policies.md repeats them with examples):
- A member's vote. multiclass: its argmax label (lowest index on ties). binary / multilabel: every
  label whose probability is >= `threshold` (binary: the positive label, else the negative one).
- `any`, `all`, `majority`, `k_of_n` are k-of-n votes with k = 1, n, floor(n/2)+1 and the given k.
  In multilabel, a member may score only some labels (its own `labels:`); a label it does not score is
  NaN in `probs`, and n, the votes and `mean`'s weights count, per label, only the members that score it.
  binary: positive iff at least k members vote positive. multilabel: each label on iff at least k
  members vote for it. multiclass: the label with the most votes (ties: higher mean probability,
  then lower index) if it has at least k votes, else no label. Score: share of members that voted
  for the label.
- `mean`: weighted soft vote, sum(w_m * p_m) / sum(w_m). multiclass: argmax (lowest index on ties);
  binary / multilabel: labels whose mean probability >= threshold. Score: the mean probability.
- `max`: the most confident member decides (confidence = its highest class probability; per label,
  max(p, 1 - p) for multilabel); ties go to the member declared first. Score: that member's probability.
- `cascade`: the members' stages in cost order (`Votes.stages`), stopping at the first stage after which
  the running weighted mean is confident: its top probability reaches `confidence` (multilabel: every
  label's is at least `confidence` or at most 1 - `confidence`). Then decided as `mean` over the members that ran.

Early exit. A member that did not run on an image has NaN probabilities there: it casts no vote. For
the votes (any, all, majority, k_of_n) k still counts every member of the request (`Votes.scoring`),
so an answer settled early (`settled`) is the one every member would have given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from handlers.config.policy import DEFAULT_CONFIDENCE, POLICY_TABLE, PolicySpec


@dataclass(frozen=True)
class Votes:
    """What a policy needs besides the probabilities: the task, member weights and the threshold."""

    task: str
    weights: torch.Tensor
    positive: int | None
    policy: PolicySpec
    scoring: torch.Tensor | None = None
    stages: tuple[tuple[int, ...], ...] | None = None
    absent: torch.Tensor | None = None

    def members_scoring(self, probs: torch.Tensor) -> torch.Tensor:
        """n per label: the members of the request that score it (`scoring`), else those with a score in `probs`;
        less, per image, those `absent` from it (members missing from an answer: `[image, label]` counts)."""
        n = self.scoring if self.scoring is not None else (~probs.isnan()).sum(dim=0)
        return n if self.absent is None else n - self.absent

    def in_stages(self, members: int) -> tuple[tuple[int, ...], ...]:
        """The order members run in when they run in stages: `stages`, else one member at a time as declared."""
        return self.stages if self.stages is not None else tuple((m,) for m in range(members))


@dataclass(frozen=True)
class Decision:
    """`chosen[image, label]` marks the combined labels; `score[image, label]` is their confidence.

    `rank`, when set, orders labels where `score` ties (multiclass votes: vote share, then mean probability).
    """

    chosen: torch.Tensor
    score: torch.Tensor
    rank: torch.Tensor | None = None

    def order(self) -> torch.Tensor:
        """Label indices per image, best first; exact ties keep the lower index first, as argmax does."""
        return torch.sort(
            self.rank if self.rank is not None else self.score, dim=-1, descending=True, stable=True
        ).indices


PolicyFn = Callable[[torch.Tensor, Votes], Decision]


def combine(probs: torch.Tensor, votes: Votes) -> Decision:
    """Apply `votes.policy` to `probs[member, image, label]`, by its table record's way of combining."""
    return _COMBINERS[POLICY_TABLE[votes.policy.name].combines](probs, votes)


def member_votes(probs: torch.Tensor, votes: Votes) -> torch.Tensor:
    """Each member's own decision, `[member, image, label]` booleans, by the rules in the module doc;
    none where the member has no score (it did not run on that image, or does not score that label)."""
    if votes.task == "multiclass":
        picked = probs.argmax(dim=-1, keepdim=True)
        own = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, picked, True)
    else:
        threshold = _threshold(votes)
        own = (
            _binary_mask(probs[..., _positive(votes)] >= threshold, votes)
            if votes.task == "binary"
            else probs >= threshold
        )
    return own & ~probs.isnan()


def settled(probs: torch.Tensor, votes: Votes) -> torch.Tensor:
    """Per image, whether the members that ran (the others are NaN) settle the answer: members not run yet cannot
    change it.

    For the votes it is exact: settled once k votes are in, or k can no longer be reached (multiclass: the
    leader has k votes and more than any other label could reach). For cascade: the running mean is confident.
    Every image all of whose members ran is settled.
    """
    n = votes.members_scoring(probs)
    remaining = n - (~probs.isnan()).sum(dim=0)
    everyone = (remaining == 0).all(dim=-1)
    if POLICY_TABLE[votes.policy.name].combines == "cascade":
        return everyone | _cascade(probs, votes)[1]
    k = _k(votes, n, probs)
    counts = member_votes(probs, votes).sum(dim=0)
    if votes.task == "binary":
        p = _positive(votes)
        return everyone | (counts[:, p] >= k[:, p]) | (counts[:, p] + remaining[:, p] < k[:, p])
    if votes.task == "multilabel":
        return everyone | ((counts >= k) | (counts + remaining < k)).all(dim=-1)
    top = counts.topk(2, dim=-1).values
    lead, second, left, need = top[:, 0], top[:, 1], remaining[:, 0], k[:, 0]
    return everyone | ((lead >= need) & (lead > second + left)) | (lead + left < need)


def partial(probs: torch.Tensor, votes: Votes, absent: torch.Tensor) -> torch.Tensor:
    """Per image, whether the members `absent` from it (`[member, image]`; their `probs` NaN) could have changed its
    answer: the answer of the members that answered (k counting them: `votes.absent`) may differ from the full
    ensemble's.

    Votes: exact. The full ensemble's answer is settled by the members that answered (`settled`, k counting every
    member) and is the answer given. Cascade: the stages before the first one holding an absent member stopped it (a
    confident running mean). `mean` and `max` depend on every member: an image with one absent is always partial.
    """
    some = absent.any(dim=0)
    full = replace(votes, absent=None)
    combines = POLICY_TABLE[votes.policy.name].combines
    if combines == "vote":
        same = (_vote(probs, full).chosen == _vote(probs, votes).chosen).all(dim=-1)
        return some & ~(settled(probs, full) & same)
    if combines == "cascade":
        order = [m for stage in votes.in_stages(probs.shape[0]) for m in stage]
        position = torch.empty(probs.shape[0], dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(len(order))
        first = torch.where(absent, position[:, None], len(order)).min(dim=0).values
        before = torch.where((position[:, None] < first[None, :])[..., None], probs, math.nan)
        return some & ~_cascade(before, votes)[1]
    return some


def simulate_stages(probs: torch.Tensor, votes: Votes) -> torch.Tensor:
    """What running in `votes.stages` leaves of `probs` (every member's): NaN for each member an image stopped before.

    The runner does this for real (`MemberRunner.probabilities` with `settle`); evaluations use it to count the cost.
    """
    ran = torch.full_like(probs, math.nan)
    going = torch.ones(probs.shape[1], dtype=torch.bool)
    for stage in votes.in_stages(probs.shape[0]):
        for m in stage:
            ran[m, going] = probs[m, going]
        going &= ~settled(ran, votes)
    return ran


def _k(votes: Votes, n: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """k per image and label for a vote over n members (`n` members score that label), shaped like `probs[0]`."""
    rule = POLICY_TABLE[votes.policy.name].k
    assert rule is not None, "only votes count against k"
    # At least one vote: a label no member of the request scores is never chosen, even by `all`.
    k: torch.Tensor = (rule(n, votes.policy.k) + torch.zeros_like(probs[0], dtype=torch.long)).clamp(min=1)
    return k


def _vote(probs: torch.Tensor, votes: Votes) -> Decision:
    """A k-of-n vote (any, all, majority, k_of_n: the table says how k follows from n); k follows from n, the members
    that score each label (multilabel members may score some)."""
    k = _k(votes, votes.members_scoring(probs), probs)
    counts = member_votes(probs, votes).sum(dim=0)
    share = counts.to(probs.dtype) / (~probs.isnan()).sum(dim=0)
    if votes.task == "binary":
        positive = counts[..., _positive(votes)] >= k[..., _positive(votes)]
        return Decision(_binary_mask(positive, votes), share)
    if votes.task == "multilabel":
        return Decision(counts >= k, share)
    # Vote counts are integers and mean probabilities lie in [0, 1], so counts + mean / 2 orders
    # labels by votes first and mean probability second; argmax then breaks exact ties by index.
    rank = counts.to(probs.dtype) + probs.nanmean(dim=0) / 2
    winner = rank.argmax(dim=-1, keepdim=True)
    chosen = torch.zeros_like(counts, dtype=torch.bool).scatter_(-1, winner, True)
    return Decision(chosen & (counts >= k), share, rank)


def mean(probs: torch.Tensor, votes: Votes) -> Decision:
    """Weighted soft vote over the members' probabilities."""
    return _by_mean(weighted_mean(probs, votes.weights), votes)


def cascade(probs: torch.Tensor, votes: Votes) -> Decision:
    """Cheapest stages first, until the running weighted mean is confident; then `mean` over the members that ran."""
    return _by_mean(_cascade(probs, votes)[0], votes)


def weighted_mean(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w_m * p_m) / sum(w_m) per image and label, over the members with a score there (NaN where none has)."""
    present = ~probs.isnan()
    w = weights.to(probs.dtype).view(-1, 1, 1) * present
    return (probs.nan_to_num(0.0) * w).sum(dim=0) / w.sum(dim=0)


def _cascade(probs: torch.Tensor, votes: Votes) -> tuple[torch.Tensor, torch.Tensor]:
    """The running weighted mean where each image stopped, and whether it stopped because it was confident."""
    confidence = DEFAULT_CONFIDENCE if votes.policy.confidence is None else votes.policy.confidence
    weights = votes.weights.to(probs.dtype)
    total = torch.zeros_like(probs[0])
    mass = torch.zeros_like(probs[0])
    stopped = torch.zeros(probs.shape[1], dtype=torch.bool)
    for stage in votes.in_stages(probs.shape[0]):
        going = ~stopped[:, None]
        for m in stage:
            present = going & ~probs[m].isnan()
            total += torch.where(present, probs[m] * weights[m], 0.0)
            mass += torch.where(present, weights[m], 0.0)
        avg = total / mass
        if votes.task == "multilabel":
            sure = ((avg >= confidence) | (avg <= 1 - confidence)).all(dim=-1)
        else:
            sure = avg.max(dim=-1).values >= confidence
        stopped |= sure
    return total / mass, stopped


def _by_mean(avg: torch.Tensor, votes: Votes) -> Decision:
    """The decision of a mean probability per image and label: argmax, or the labels at or above the threshold."""
    if votes.task == "multiclass":
        picked = avg.argmax(dim=-1, keepdim=True)
        return Decision(torch.zeros_like(avg, dtype=torch.bool).scatter_(-1, picked, True), avg)
    threshold = _threshold(votes)
    if votes.task == "binary":
        return Decision(_binary_mask(avg[..., _positive(votes)] >= threshold, votes), avg)
    return Decision(avg >= threshold, avg)


def most_confident(probs: torch.Tensor, votes: Votes) -> Decision:
    """The most confident member decides; the first declared member wins ties."""
    own = member_votes(probs, votes)
    if votes.task == "multilabel":
        confidence = torch.maximum(probs, 1 - probs).nan_to_num(-1.0)
        best = confidence.argmax(dim=0, keepdim=True)
        return Decision(own.gather(0, best)[0], probs.gather(0, best)[0])
    confidence = probs.max(dim=-1).values.nan_to_num(-1.0)  # A member missing from an image has no say there.
    best = confidence.argmax(dim=0)
    images = torch.arange(probs.shape[1])
    return Decision(own[best, images], probs[best, images])


def _threshold(votes: Votes) -> float:
    assert votes.policy.threshold is not None, "resolve_policy sets a threshold for binary and multilabel"
    return votes.policy.threshold


def _positive(votes: Votes) -> int:
    assert votes.positive is not None, "a binary ensemble always has a positive label"
    return votes.positive


def _binary_mask(positive: torch.Tensor, votes: Votes) -> torch.Tensor:
    """Two-label mask with the positive label set where `positive` holds and the other label elsewhere."""
    mask = torch.zeros(*positive.shape, 2, dtype=torch.bool)
    mask[..., _positive(votes)] = positive
    mask[..., 1 - _positive(votes)] = ~positive
    return mask


_COMBINERS: dict[str, PolicyFn] = {"vote": _vote, "mean": mean, "cascade": cascade, "max": most_confident}
