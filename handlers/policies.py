"""Combination policies: how the members' probabilities become one answer per image.

A policy is one function registered with `@register_policy`. It takes the members' probabilities
`probs[member, image, label]` and a `Votes` context, and returns a `Decision`: a boolean mask of the
chosen labels and a score per label. Multiclass and binary decisions choose at most one label
(none means the ensemble abstains); multilabel decisions choose any number.

Semantics (README "Policies" repeats them with examples):
- A member's vote. multiclass: its argmax label (lowest index on ties). binary / multilabel: every
  label whose probability is >= `threshold` (binary: the positive label, else the negative one).
- `any`, `all`, `majority`, `k_of_n` are k-of-n votes with k = 1, n, floor(n/2)+1 and the given k.
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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches

import torch

from handlers.errors import InvalidPolicy

TASKS = ("multiclass", "binary", "multilabel")
POLICY_PARAMETERS = ("policy", "k", "threshold")
# Every parameter a request may carry, on any channel: the policy's, and what else the answer shows.
REQUEST_PARAMETERS = (*POLICY_PARAMETERS, "members", "top_k", "sequence", "min_run")
# Parameters that are true or false. A JSON body's `parameters` (ours or v2's, whose values are typed)
# gives them as JSON booleans or as the strings every other channel carries (request_inputs.boolean_parameter).
BOOLEAN_PARAMETERS = ("sequence",)
DEFAULT_THRESHOLD = 0.5


def unknown_parameters(names: Sequence[str]) -> str:
    """The message for parameter names we do not know: each with the closest valid name, then every valid name."""
    closest = [f"{name!r} -> {close[0]!r}" for name in names if (close := get_close_matches(name, REQUEST_PARAMETERS, n=1))]
    hint = f" (closest valid: {', '.join(closest)})" if closest else ""
    return f"unknown parameter(s) {sorted(names)}{hint}; valid: {', '.join(REQUEST_PARAMETERS)}"


@dataclass(frozen=True)
class PolicySpec:
    """A policy with its parameters fully resolved: `k` for k_of_n, `threshold` for binary/multilabel."""

    name: str
    k: int | None = None
    threshold: float | None = None

    def params(self) -> dict[str, int | float]:
        """The parameters that apply, as they appear in responses and manifests."""
        out: dict[str, int | float] = {}
        if self.k is not None:
            out["k"] = self.k
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


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


@dataclass(frozen=True)
class _Entry:
    fn: PolicyFn
    takes_k: bool


_REGISTRY: dict[str, _Entry] = {}


def register_policy(name: str, *, takes_k: bool = False) -> Callable[[PolicyFn], PolicyFn]:
    """Add a policy under `name`; `takes_k` says whether it reads the `k` parameter."""

    def add(fn: PolicyFn) -> PolicyFn:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, takes_k)
        return fn

    return add


def policy_names() -> list[str]:
    """Registered policy names, sorted: the list error messages and describe show."""
    return sorted(_REGISTRY)


def combine(probs: torch.Tensor, votes: Votes) -> Decision:
    """Apply `votes.policy` to `probs[member, image, label]`."""
    return _REGISTRY[votes.policy.name].fn(probs, votes)


def resolve_policy(
    requested: Mapping[str, object],
    *,
    default: PolicySpec | None,
    task: str,
    n_members: int,
) -> PolicySpec:
    """Validate a policy choice (from a request or a config) into a PolicySpec, or raise InvalidPolicy.

    Without a `policy` key the default policy is used; parameters given for the default policy
    override its own, and a different policy starts from no parameters.
    """
    unknown = sorted(set(requested) - set(POLICY_PARAMETERS))
    if unknown:
        raise InvalidPolicy(f"unknown policy parameter(s) {unknown}; valid: {', '.join(POLICY_PARAMETERS)}")
    name = requested.get("policy")
    if name is None:
        if default is None:
            raise InvalidPolicy(f"no policy given; valid policies: {', '.join(policy_names())}")
        name = default.name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidPolicy(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")
    inherited = default.params() if default is not None and default.name == name else {}
    params = {**inherited, **{key: requested[key] for key in ("k", "threshold") if key in requested}}

    k = None
    if _REGISTRY[name].takes_k:
        if "k" not in params:
            raise InvalidPolicy(f"policy {name!r} needs parameter k (an integer from 1 to {n_members})")
        k = _parse_k(params["k"], n_members)
    elif "k" in params:
        raise InvalidPolicy(f"policy {name!r} takes no parameter k; only k_of_n does")

    threshold = None
    if task == "multiclass":
        if "threshold" in params:
            raise InvalidPolicy("threshold applies to binary and multilabel ensembles; this one is multiclass")
    else:
        threshold = _parse_threshold(params.get("threshold", DEFAULT_THRESHOLD))
    return PolicySpec(name=name, k=k, threshold=threshold)


def _parse_k(raw: object, n_members: int) -> int:
    if isinstance(raw, bool):
        raise InvalidPolicy(f"k must be an integer from 1 to {n_members}, got {raw!r}")
    try:
        k = int(raw) if isinstance(raw, (int, str)) else None
    except ValueError:
        k = None
    if k is None or not 1 <= k <= n_members:
        raise InvalidPolicy(f"k must be an integer from 1 to {n_members}, got {raw!r}")
    return k


def _parse_threshold(raw: object) -> float:
    if isinstance(raw, bool):
        raise InvalidPolicy(f"threshold must be a number in [0, 1], got {raw!r}")
    try:
        value = float(raw) if isinstance(raw, (int, float, str)) else math.nan
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise InvalidPolicy(f"threshold must be a number in [0, 1], got {raw!r}")
    return value


def member_votes(probs: torch.Tensor, votes: Votes) -> torch.Tensor:
    """Each member's own decision, `[member, image, label]` booleans, by the rules in the module doc."""
    if votes.task == "multiclass":
        picked = probs.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, picked, True)
    threshold = _threshold(votes)
    if votes.task == "binary":
        return _binary_mask(probs[..., _positive(votes)] >= threshold, votes)
    return probs >= threshold


def _k_of_n(probs: torch.Tensor, votes: Votes, k: int) -> Decision:
    n_members = probs.shape[0]
    counts = member_votes(probs, votes).sum(dim=0)
    share = counts.to(probs.dtype) / n_members
    if votes.task == "binary":
        positive = counts[..., _positive(votes)] >= k
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
    return _k_of_n(probs, votes, 1)


@register_policy("all")
def all_members(probs: torch.Tensor, votes: Votes) -> Decision:
    """AND: positive only when every member says so (maximum precision)."""
    return _k_of_n(probs, votes, probs.shape[0])


@register_policy("majority")
def majority(probs: torch.Tensor, votes: Votes) -> Decision:
    """Strict majority: more than half of the members; an even split is not a majority."""
    return _k_of_n(probs, votes, probs.shape[0] // 2 + 1)


@register_policy("k_of_n", takes_k=True)
def k_of_n(probs: torch.Tensor, votes: Votes) -> Decision:
    """At least k members agree."""
    assert votes.policy.k is not None, "resolve_policy guarantees k for k_of_n"
    return _k_of_n(probs, votes, votes.policy.k)


@register_policy("mean")
def mean(probs: torch.Tensor, votes: Votes) -> Decision:
    """Weighted soft vote over the members' probabilities."""
    weights = votes.weights.to(probs.dtype).view(-1, 1, 1)
    avg = (probs * weights).sum(dim=0) / weights.sum()
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
        confidence = torch.maximum(probs, 1 - probs)
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
