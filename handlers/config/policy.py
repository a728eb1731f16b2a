"""The policy vocabulary: which policies exist, the parameters they take, and resolving a choice into a PolicySpec.

Config and requests both name policies; answers/policies.py implements each one declared here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from handlers.errors import InvalidPolicy, RequestError

TASKS = ("multiclass", "binary", "multilabel")
POLICY_PARAMETERS = ("policy", "k", "threshold", "confidence", "early_exit")
DEFAULT_THRESHOLD = 0.5
DEFAULT_CONFIDENCE = 0.9
# Every policy, and whether it reads the `k` parameter.
POLICIES = {"all": False, "any": False, "cascade": False, "k_of_n": True, "majority": False, "max": False, "mean": False}
# The votes whose answer can be settled before every member has voted: early exit is exact for them.
VOTE_POLICIES = ("any", "all", "majority", "k_of_n")
# How unsure an answer is (answers/uncertainty.py computes them); `defer:` thresholds name them.
UNCERTAINTY_MEASURES = ("entropy", "expected_entropy", "mutual_information", "vote_margin")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def policy_names() -> list[str]:
    """Policy names, sorted: the list error messages and describe show."""
    return sorted(POLICIES)


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
        return self.early_exit or self.name == "cascade"

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
    if not isinstance(name, str) or name not in POLICIES:
        raise InvalidPolicy(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")
    inherited = default.params() if default is not None and default.name == name else {}
    params = {**inherited, **{key: requested[key] for key in POLICY_PARAMETERS[1:] if key in requested}}

    k = None
    if POLICIES[name]:
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
    if name == "cascade":
        confidence = _parse_unit("confidence", params.get("confidence", DEFAULT_CONFIDENCE))
    elif "confidence" in params:
        raise InvalidPolicy(f"policy {name!r} takes no parameter confidence; only cascade does")

    early_exit = parse_boolean("early_exit", params.get("early_exit", False))
    if early_exit and name not in VOTE_POLICIES:
        raise InvalidPolicy(EARLY_EXIT_REFUSED.get(name, f"early_exit applies to {', '.join(VOTE_POLICIES)}"))
    return PolicySpec(name=name, k=k, threshold=threshold, confidence=confidence, early_exit=early_exit)


# Why early exit cannot be exact for the policies that are not votes: the request's 400 says it.
EARLY_EXIT_REFUSED = {
    "mean": (
        "early_exit cannot be exact for policy 'mean': the weighted mean moves with every member's probability, so no"
        " subset of members settles it; use a vote policy (any, all, majority, k_of_n) with early_exit, or policy=cascade"
        " to stop at a confidence you choose"
    ),
    "max": (
        "early_exit cannot be exact for policy 'max': any member not yet run may be the most confident and decide the"
        " answer; use a vote policy (any, all, majority, k_of_n) with early_exit, or policy=cascade"
    ),
    "cascade": "cascade always runs members cheapest first and stops at its confidence; it takes no early_exit",
}


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
