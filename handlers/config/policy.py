"""The policy table: every policy as one record, and resolving a choice into a PolicySpec.

Config and requests both name policies; `answers/policies.py` decides by the record's `combines`.
Adding a policy is one `Policy` in `POLICY_TABLE` (and a docs/policies.md section); a new way of
combining is also one function in `answers/policies.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from handlers.errors import InvalidPolicy, RequestError

TASKS = ("multiclass", "binary", "multilabel")
POLICY_PARAMETERS = ("policy", "k", "threshold", "confidence", "early_exit")
DEFAULT_THRESHOLD = 0.5
DEFAULT_CONFIDENCE = 0.9
# How unsure an answer is (answers/uncertainty.py computes them); `defer:` thresholds name them.
UNCERTAINTY_MEASURES = ("entropy", "expected_entropy", "mutual_information", "vote_margin")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")

# n is the number of members that score a label: an int, or a tensor of them per image and label.
KRule = Callable[[Any, "int | None"], Any]


@dataclass(frozen=True)
class Policy:
    """One policy: how it combines the members, how a vote derives k, and whether early exit is exact for it.

    `combines` names the decision (answers/policies.py): `vote` counts the members' own votes against k and
    scores the share that voted for a label; `mean` and `cascade` threshold or take the argmax of a weighted
    mean and score it; `max` lets the most confident member decide with its own probability. `k` derives k
    from n and the request's `k` (votes only). `early_exit_refused` is None where early exit is exact (every
    vote: a subset of members can settle it), else the reason a request asking for it is refused.
    """

    name: str
    combines: Literal["vote", "mean", "cascade", "max"]
    scores: str
    k: KRule | None = None
    takes_k: bool = False
    takes_confidence: bool = False
    early_exit_refused: str | None = None

    @property
    def votes(self) -> bool:
        """Whether the members vote: only then is early exit exact."""
        return self.combines == "vote"


def _given(n: Any, k: int | None) -> Any:
    assert k is not None, "resolve_policy guarantees k for k_of_n"
    return n * 0 + k


_NOT_A_VOTE = "use a vote policy (any, all, majority, k_of_n) with early_exit"
POLICY_TABLE: Mapping[str, Policy] = {
    policy.name: policy
    for policy in (
        Policy("any", "vote", "share of members voting for the label", k=lambda n, _: n * 0 + 1),
        Policy("all", "vote", "share of members voting for the label", k=lambda n, _: n),
        Policy("majority", "vote", "share of members voting for the label", k=lambda n, _: n // 2 + 1),
        Policy("k_of_n", "vote", "share of members voting for the label", k=_given, takes_k=True),
        Policy(
            "mean",
            "mean",
            "the weighted mean probability",
            early_exit_refused=(
                "early_exit cannot be exact for policy 'mean': the weighted mean moves with every member's"
                f" probability, so no subset of members settles it; {_NOT_A_VOTE}, or policy=cascade to stop at a"
                " confidence you choose"
            ),
        ),
        Policy(
            "max",
            "max",
            "the deciding member's probability",
            early_exit_refused=(
                "early_exit cannot be exact for policy 'max': any member not yet run may be the most confident and"
                f" decide the answer; {_NOT_A_VOTE}, or policy=cascade"
            ),
        ),
        Policy(
            "cascade",
            "cascade",
            "the weighted mean probability of the members that ran",
            takes_confidence=True,
            early_exit_refused="cascade always runs members cheapest first and stops at its confidence; "
            "it takes no early_exit",
        ),
    )
}
# The votes, in the table's order: their answer can be settled before every member has voted.
VOTE_POLICIES = tuple(name for name, policy in POLICY_TABLE.items() if policy.votes)


def policy_names() -> list[str]:
    """Policy names, sorted: the list error messages and describe show."""
    return sorted(POLICY_TABLE)


@dataclass(frozen=True)
class PolicySpec:
    """A policy with its parameters fully resolved: `k` for k_of_n, `threshold` for binary/multilabel,
    `confidence` for cascade, and `early_exit` for the vote policies."""

    name: str
    k: int | None = None
    threshold: float | None = None
    confidence: float | None = None
    early_exit: bool = False

    @property
    def stops_early(self) -> bool:
        """Whether members run in stages, cheapest first, and an image stops once its answer is settled."""
        return self.early_exit or POLICY_TABLE[self.name].combines == "cascade"

    def params(self) -> dict[str, int | float | bool]:
        """The parameters that apply, as they appear in responses and manifests (`early_exit` only when on)."""
        out: dict[str, int | float | bool] = {}
        if self.k is not None:
            out["k"] = self.k
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.confidence is not None:
            out["confidence"] = self.confidence
        if self.early_exit:
            out["early_exit"] = True
        return out


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
    if not isinstance(name, str) or name not in POLICY_TABLE:
        raise InvalidPolicy(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")
    inherited = default.params() if default is not None and default.name == name else {}
    params = {**inherited, **{key: requested[key] for key in POLICY_PARAMETERS[1:] if key in requested}}

    policy = POLICY_TABLE[name]
    k = None
    if policy.takes_k:
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
        threshold = _parse_unit("threshold", params.get("threshold", DEFAULT_THRESHOLD))

    confidence = None
    if policy.takes_confidence:
        confidence = _parse_unit("confidence", params.get("confidence", DEFAULT_CONFIDENCE))
    elif "confidence" in params:
        raise InvalidPolicy(f"policy {name!r} takes no parameter confidence; only cascade does")

    early_exit = parse_boolean("early_exit", params.get("early_exit", False))
    if early_exit and policy.early_exit_refused is not None:
        raise InvalidPolicy(policy.early_exit_refused)
    return PolicySpec(name=name, k=k, threshold=threshold, confidence=confidence, early_exit=early_exit)


def parse_boolean(name: str, raw: object, error: type[RequestError] = InvalidPolicy) -> bool:
    """A true-or-false parameter: a bool (from a config file) or one of the words every request channel carries."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, (str, int)) else ""
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise error(f"{name} must be true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}), got {raw!r}")


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


def _parse_unit(name: str, raw: object) -> float:
    """A parameter that must be a number in [0, 1], or InvalidPolicy naming it."""
    if isinstance(raw, bool):
        raise InvalidPolicy(f"{name} must be a number in [0, 1], got {raw!r}")
    try:
        value = float(raw) if isinstance(raw, (int, float, str)) else math.nan
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise InvalidPolicy(f"{name} must be a number in [0, 1], got {raw!r}")
    return value
