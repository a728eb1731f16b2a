"""An independent reference for the combined answers, written from docs/policies.md and docs/http/answer.md alone.

It imports nothing from handlers/ or bench/: the tests compare what the server answers with what the docs say
it should answer, so a bug in the serving code's policies or rendering cannot also be in the expectation.

Input, per image: each member's probabilities, in the order the members were declared (and asked for):
a vector over the labels (multiclass), a vector of per-label probabilities (multilabel), or one number, the
positive label's probability (binary). Output: the prediction's JSON fields (`label`/`score` or
`labels`/`scores`, `top`, each member's view, `uncertainty`), scores not rounded.

Rules the docs leave open, and the one taken here (each checked by hand in tests/test_policy_reference.py):
- A vote policy's multiclass tie on votes is broken by "the higher mean probability (the plain mean over the
  members that voted ...)": weights do not enter a vote (case `multiclass-vote-tie-plain-mean`).
- A binary member's (and the binary answer's) `score` is the probability of the label it chose: p when
  positive, 1 - p when negative, as the docs' examples show (`"strided": {"label": "absent", "score": 0.80301}`);
  the same for `mean` (the mean of the chosen label's probability) and `max` (the deciding member's).
- Binary `max`: a member's confidence is max(p, 1 - p) whatever `threshold` is; the decider's label then
  follows the threshold rule of the member votes.
- `top` rankings: a member's and `mean`'s by probability, `max`'s by the decider's probabilities, equal
  values in label order (lowest index first, as for argmax).
- `vote_margin` of a binary answer: |share voting positive - share voting negative|.
- Entropies use the natural logarithm with 0 log 0 = 0; a binary member's distribution is [1 - p, p].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy

VOTE_POLICIES = ("any", "all", "majority", "k_of_n")
POLICIES = (*VOTE_POLICIES, "mean", "max", "cascade")


@dataclass(frozen=True)
class Task:
    """What the ensemble answers: `kind` (multiclass, binary, multilabel), its labels, the binary positive label."""

    kind: str
    labels: tuple[str, ...]
    positive: str | None = None

    @property
    def negative(self) -> str:
        return next(label for label in self.labels if label != self.positive)


@dataclass(frozen=True)
class Policy:
    """A policy and its parameters, as a request resolves them."""

    name: str
    k: int | None = None
    threshold: float = 0.5
    confidence: float = 0.9
    top_k: int = 1
    uncertainty: bool = False


def required_k(policy: Policy, n: int) -> int:
    """k of k-of-n: any 1, all n, majority floor(n/2) + 1 (strict), k_of_n its own k (1..n)."""
    if policy.name == "any":
        return 1
    if policy.name == "all":
        return n
    if policy.name == "majority":
        return n // 2 + 1
    if policy.k is None or not 1 <= policy.k <= n:
        raise ValueError(f"k_of_n needs k in 1..{n}, got {policy.k}")
    return policy.k


def weighted_mean(probs: numpy.ndarray, weights: numpy.ndarray) -> numpy.ndarray:
    """sum(w_m p_m) / sum(w_m) over the members (axis 0)."""
    return numpy.tensordot(weights, probs, axes=1) / weights.sum()


def ranking(values: numpy.ndarray) -> list[int]:
    """Label indices, highest value first, equal values in label order."""
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def entropy(p: numpy.ndarray) -> float:
    """Entropy in nats of a distribution (0 log 0 = 0)."""
    nonzero = p[p > 0]
    return float(-(nonzero * numpy.log(nonzero)).sum())


def member_view(task: Task, p: numpy.ndarray, policy: Policy) -> dict[str, Any]:
    """A member's own vote: multiclass argmax (lowest index on a tie), binary and multilabel `>= threshold`."""
    if task.kind == "multiclass":
        order = ranking(p)
        top = [{"label": task.labels[j], "score": float(p[j])} for j in order[: policy.top_k]]
        return {"label": task.labels[order[0]], "score": float(p[order[0]]), "top": top}
    if task.kind == "binary":
        positive = bool(p >= policy.threshold)
        return {"label": task.positive if positive else task.negative, "score": float(p if positive else 1 - p)}
    return {
        "labels": [label for label, q in zip(task.labels, p, strict=True) if q >= policy.threshold],
        "scores": dict(zip(task.labels, map(float, p), strict=True)),
    }


def vote(task: Task, probs: numpy.ndarray, weights: numpy.ndarray, policy: Policy) -> dict[str, Any]:
    """any / all / majority / k_of_n; the score is the share of members that voted for the chosen label."""
    n = len(probs)
    k = required_k(policy, n)
    if task.kind == "binary":
        yes = int((probs >= policy.threshold).sum())
        positive = yes >= k  # Binary never abstains: fewer than k positive votes answer the negative label.
        return {"label": task.positive if positive else task.negative, "score": (yes if positive else n - yes) / n}
    if task.kind == "multilabel":
        yes = (probs >= policy.threshold).sum(axis=0)
        return {
            "labels": [label for label, count in zip(task.labels, yes, strict=True) if count >= k],
            "scores": {label: int(count) / n for label, count in zip(task.labels, yes, strict=True)},
        }
    counts = numpy.bincount(probs.argmax(axis=1), minlength=len(task.labels))
    mean = probs.mean(axis=0)
    order = sorted(range(len(task.labels)), key=lambda j: (-counts[j], -mean[j], j))
    top = [{"label": task.labels[j], "score": int(counts[j]) / n} for j in order[: policy.top_k]]
    best = order[0]
    if counts[best] < k:
        return {"label": None, "score": None, "top": top}
    return {"label": task.labels[best], "score": int(counts[best]) / n, "top": top}


def soft(task: Task, mean: numpy.ndarray, policy: Policy) -> dict[str, Any]:
    """`mean`'s decision from the (weighted) mean probabilities: argmax, or `>= threshold`."""
    if task.kind == "multiclass":
        order = ranking(mean)
        top = [{"label": task.labels[j], "score": float(mean[j])} for j in order[: policy.top_k]]
        return {"label": task.labels[order[0]], "score": float(mean[order[0]]), "top": top}
    if task.kind == "binary":
        positive = bool(mean >= policy.threshold)
        return {"label": task.positive if positive else task.negative, "score": float(mean if positive else 1 - mean)}
    return {
        "labels": [label for label, q in zip(task.labels, mean, strict=True) if q >= policy.threshold],
        "scores": dict(zip(task.labels, map(float, mean), strict=True)),
    }


def most_confident(task: Task, probs: numpy.ndarray, policy: Policy) -> dict[str, Any]:
    """`max`: the most confident member decides (per label for multilabel); the member declared first wins ties."""
    if task.kind == "multilabel":
        confidence = numpy.maximum(probs, 1 - probs)
        deciders = confidence.argmax(axis=0)  # argmax returns the first of equal maxima: the member declared first.
        chosen = numpy.array([probs[m, j] for j, m in enumerate(deciders)])
        return soft(task, chosen, policy)
    confidence = probs.max(axis=1) if task.kind == "multiclass" else numpy.maximum(probs, 1 - probs)
    return soft(task, probs[int(confidence.argmax())], policy)


def settled(task: Task, mean: numpy.ndarray, confidence: float) -> bool:
    """cascade's stop rule: the running mean's top probability reaches `confidence` (multilabel: each label settled)."""
    if task.kind == "multiclass":
        return bool(mean.max() >= confidence)
    if task.kind == "binary":
        return bool(max(mean, 1 - mean) >= confidence)
    return bool(((mean >= confidence) | (mean <= 1 - confidence)).all())


def uncertainty(task: Task, probs: numpy.ndarray, weights: numpy.ndarray, policy: Policy) -> dict[str, Any]:
    """entropy, expected_entropy, mutual_information, vote_margin; weights normalised to sum to 1."""
    w = weights / weights.sum()
    n = len(probs)
    if task.kind == "multilabel":
        per_label = [
            uncertainty(Task("binary", ("no", "yes"), "yes"), probs[:, j], weights, policy)
            for j in range(len(task.labels))
        ]
        return {
            measure: {label: values[measure] for label, values in zip(task.labels, per_label, strict=True)}
            for measure in per_label[0]
        }
    if task.kind == "binary":
        distributions = numpy.stack([1 - probs, probs], axis=1)
        yes = int((probs >= policy.threshold).sum())
        margin = abs(yes - (n - yes)) / n
    else:
        distributions = probs
        counts = sorted(numpy.bincount(probs.argmax(axis=1), minlength=len(task.labels)), reverse=True)
        margin = (counts[0] - counts[1]) / n
    total = entropy(weighted_mean(distributions, w))
    expected = float(sum(wm * entropy(d) for wm, d in zip(w, distributions, strict=True)))
    return {
        "entropy": total,
        "expected_entropy": expected,
        "mutual_information": total - expected,
        "vote_margin": margin,
    }


def predict(
    task: Task,
    members: dict[str, Any],
    weights: dict[str, float],
    policy: Policy,
    *,
    cheapest_first: list[str] | None = None,
) -> dict[str, Any]:
    """One image's prediction from {member: probabilities} (every member that answered, in declaration order).

    `weights` are the members' `weight` (1.0 unless declared). `cheapest_first` is cascade's member order (the
    server measures it; the caller passes the order it expects).
    """
    if policy.name not in POLICIES:
        raise ValueError(f"unknown policy {policy.name!r}")
    names = list(members)
    if policy.name == "cascade":
        order = cheapest_first or names
        ran: list[str] = []
        for name in order:
            ran.append(name)
            probs = numpy.array([numpy.asarray(members[m], dtype=numpy.float64) for m in ran])
            if settled(task, weighted_mean(probs, numpy.array([weights[m] for m in ran])), policy.confidence):
                break
        names = [m for m in names if m in ran]
        skipped = [m for m in order if m not in ran]
    probs = numpy.array([numpy.asarray(members[m], dtype=numpy.float64) for m in names])
    w = numpy.array([weights[m] for m in names], dtype=numpy.float64)
    if policy.name in VOTE_POLICIES:
        prediction = vote(task, probs, w, policy)
    elif policy.name == "max":
        prediction = most_confident(task, probs, policy)
    else:
        prediction = soft(task, weighted_mean(probs, w), policy)
    prediction["members"] = {m: member_view(task, p, policy) for m, p in zip(names, probs, strict=True)}
    if policy.name == "cascade":
        prediction.update(skipped=skipped, early_exit=True)
    if policy.uncertainty:
        prediction["uncertainty"] = uncertainty(task, probs, w, policy)
    return prediction
