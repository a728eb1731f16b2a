"""The policy vocabulary: which policies exist, the parameters they take, and resolving a choice into a PolicySpec.

Config and requests both name policies; answers/policies.py implements each one declared here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from handlers.errors import InvalidPolicy

TASKS = ("multiclass", "binary", "multilabel")
POLICY_PARAMETERS = ("policy", "k", "threshold")
DEFAULT_THRESHOLD = 0.5
# Every policy, and whether it reads the `k` parameter.
POLICIES = {"all": False, "any": False, "k_of_n": True, "majority": False, "max": False, "mean": False}


def policy_names() -> list[str]:
    """Policy names, sorted: the list error messages and describe show."""
    return sorted(POLICIES)


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
    params = {**inherited, **{key: requested[key] for key in ("k", "threshold") if key in requested}}

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
