"""Combination policies: how the members' probabilities become one answer per image.

A policy is one function registered with `@register_policy`. It takes the members' probabilities
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from handlers.config.policy import POLICIES, PolicySpec


@dataclass(frozen=True)
class Votes:
    """What a policy needs besides the probabilities: the task, member weights and the threshold."""

    task: str
    weights: torch.Tensor
    positive: int | None
    policy: PolicySpec


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
        return torch.sort(self.rank if self.rank is not None else self.score, dim=-1, descending=True, stable=True).indices


PolicyFn = Callable[[torch.Tensor, Votes], Decision]


_REGISTRY: dict[str, PolicyFn] = {}


def register_policy(name: str) -> Callable[[PolicyFn], PolicyFn]:
    """Implement the policy `name`, which config.policy.POLICIES declares with its parameters."""

    def add(fn: PolicyFn) -> PolicyFn:
        if name not in POLICIES:
            raise ValueError(f"policy {name!r} is not declared in config.policy.POLICIES")
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def combine(probs: torch.Tensor, votes: Votes) -> Decision:
    """Apply `votes.policy` to `probs[member, image, label]`."""
    return _REGISTRY[votes.policy.name](probs, votes)


def member_votes(probs: torch.Tensor, votes: Votes) -> torch.Tensor:
    """Each member's own decision, `[member, image, label]` booleans, by the rules in the module doc."""
    if votes.task == "multiclass":
        picked = probs.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, picked, True)
    threshold = _threshold(votes)
    if votes.task == "binary":
        return _binary_mask(probs[..., _positive(votes)] >= threshold, votes)
    return probs >= threshold


def _k_of_n(probs: torch.Tensor, votes: Votes, k_of: Callable[[torch.Tensor], torch.Tensor | int]) -> Decision:
    """A k-of-n vote; `k_of` gives k from n, the members that score each label (multilabel members may score some)."""
    scoring = (~probs.isnan()).sum(dim=0)
    k = k_of(scoring) + torch.zeros_like(scoring)
    counts = member_votes(probs, votes).sum(dim=0)
    share = counts.to(probs.dtype) / scoring
    if votes.task == "binary":
        positive = counts[..., _positive(votes)] >= k[..., _positive(votes)]
        return Decision(_binary_mask(positive, votes), share)
    if votes.task == "multilabel":
        return Decision(counts >= k, share)
    # Vote counts are integers and mean probabilities lie in [0, 1], so counts + mean / 2 orders
    # labels by votes first and mean probability second; argmax then breaks exact ties by index.
    rank = counts.to(probs.dtype) + probs.mean(dim=0) / 2
    winner = rank.argmax(dim=-1, keepdim=True)
    chosen = torch.zeros_like(counts, dtype=torch.bool).scatter_(-1, winner, True)
    return Decision(chosen & (counts >= k), share, rank)


@register_policy("any")
def any_member(probs: torch.Tensor, votes: Votes) -> Decision:
    """OR: positive when at least one member says so (maximum sensitivity)."""
    return _k_of_n(probs, votes, lambda n: 1)


@register_policy("all")
def all_members(probs: torch.Tensor, votes: Votes) -> Decision:
    """AND: positive only when every member says so (maximum precision)."""
    return _k_of_n(probs, votes, lambda n: n)


@register_policy("majority")
def majority(probs: torch.Tensor, votes: Votes) -> Decision:
    """Strict majority: more than half of the members; an even split is not a majority."""
    return _k_of_n(probs, votes, lambda n: n // 2 + 1)


@register_policy("k_of_n")
def k_of_n(probs: torch.Tensor, votes: Votes) -> Decision:
    """At least k members agree."""
    k = votes.policy.k
    assert k is not None, "resolve_policy guarantees k for k_of_n"
    return _k_of_n(probs, votes, lambda n: k)


@register_policy("mean")
def mean(probs: torch.Tensor, votes: Votes) -> Decision:
    """Weighted soft vote over the members' probabilities."""
    weights = votes.weights.to(probs.dtype).view(-1, 1, 1) * ~probs.isnan()
    avg = (probs.nan_to_num(0.0) * weights).sum(dim=0) / weights.sum(dim=0)
    if votes.task == "multiclass":
        picked = avg.argmax(dim=-1, keepdim=True)
        return Decision(torch.zeros_like(avg, dtype=torch.bool).scatter_(-1, picked, True), avg)
    threshold = _threshold(votes)
    if votes.task == "binary":
        return Decision(_binary_mask(avg[..., _positive(votes)] >= threshold, votes), avg)
    return Decision(avg >= threshold, avg)


@register_policy("max")
def most_confident(probs: torch.Tensor, votes: Votes) -> Decision:
    """The most confident member decides; the first declared member wins ties."""
    own = member_votes(probs, votes)
    if votes.task == "multilabel":
        confidence = torch.maximum(probs, 1 - probs).nan_to_num(-1.0)
        best = confidence.argmax(dim=0, keepdim=True)
        return Decision(own.gather(0, best)[0], probs.gather(0, best)[0])
    confidence = probs.max(dim=-1).values
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
