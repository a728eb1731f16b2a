"""What the demos' answers cost, and how well their uncertainty ranks them: the figures `make evaluate` adds.

- Accuracy (macro F1 for multilabel) against member-forward cost per image: every member alone, `mean`,
  `cascade` at confidences from 0.5 to 0.99, and the ensemble's own vote with and without early exit.
  A member's cost is its measured ms per call for one image on this machine (the order early exit runs
  members in); an answer's cost is the sum over the members that ran on the image.
- Risk–coverage of the ensemble's own policy: answers ordered from most to least certain by
  `mutual_information` and by `entropy`; the error rate of the answers kept at each coverage, and its
  area (AURC, the mean risk over every coverage k/N). In a multilabel ensemble each label of each image is an
  answer (yes or no) with its own uncertainty, so the risk at full coverage is the label error rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy
import torch
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, f1_score

from handlers.answers.policies import Votes, combine, member_votes, simulate_stages
from handlers.answers.uncertainty import measure
from handlers.config.policy import VOTE_POLICIES, resolve_policy
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import Ensemble

CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
COVERAGES = (1.0, 0.95, 0.9, 0.8)
ORDERINGS = ("mutual_information", "entropy")


def quality(spec: EnsembleSpec, chosen: numpy.ndarray, truth: numpy.ndarray) -> float:
    """Accuracy of the decisions (an abstention is wrong); macro F1 for multilabel."""
    if spec.task == "multilabel":
        return float(f1_score(truth, chosen, average="macro", zero_division=0))
    if spec.task == "binary":
        return float(accuracy_score(truth, chosen[:, spec.positive_index]))
    return float((chosen.any(axis=1) & (chosen.argmax(axis=1) == truth)).mean())


def cost_table(
    spec: EnsembleSpec, ensemble: Ensemble, probs: torch.Tensor, truth: numpy.ndarray
) -> dict[str, dict[str, float]]:
    """Quality and mean member-forward ms per image.

    For the members, the mean, the cascade by confidence, and the default vote.
    """
    stages = ensemble.stages()
    costs = torch.tensor([0.0] * len(spec.members), dtype=torch.float64)
    for stage in ensemble.runner.stage_order():
        for name in stage["members"]:
            costs[[m.name for m in spec.members].index(name)] = stage["ms_per_input"] / len(stage["members"])
    everyone = tuple(range(len(spec.members)))

    def votes(requested: Mapping[str, Any]) -> Votes:
        policy = resolve_policy(requested, default=spec.policy, task=spec.task, n_members=len(spec.members))
        return ensemble.decider.votes(policy, everyone, stages)

    def spent(ran: torch.Tensor) -> float:
        """Mean member-forward ms per image: each member's cost where it ran (its probabilities are not NaN)."""
        return float(((~ran.isnan().all(dim=-1)).to(torch.float64).T @ costs).mean())

    table: dict[str, dict[str, float]] = {}
    own = member_votes(probs, votes({}))
    for i, member in enumerate(spec.members):
        table[f"member {member.name}"] = {"quality": quality(spec, own[i].numpy(), truth), "ms": float(costs[i])}
    full = float(costs.sum())
    table["mean"] = {
        "quality": quality(spec, combine(probs, votes({"policy": "mean"})).chosen.numpy(), truth),
        "ms": full,
    }
    for confidence in CONFIDENCES:
        asked = votes({"policy": "cascade", "confidence": confidence})
        ran = simulate_stages(probs, asked)
        table[f"cascade {confidence:g}"] = {
            "quality": quality(spec, combine(ran, asked).chosen.numpy(), truth),
            "ms": spent(ran),
        }
    if spec.policy.name in VOTE_POLICIES:
        name = spec.policy.name
        early = votes({"policy": name, "early_exit": True})
        ran = simulate_stages(probs, early)
        table[name] = {
            "quality": quality(spec, combine(probs, votes({"policy": name})).chosen.numpy(), truth),
            "ms": full,
        }
        table[f"{name} early_exit"] = {
            "quality": quality(spec, combine(ran, early).chosen.numpy(), truth),
            "ms": spent(ran),
        }
    return table


def risk_coverage(spec: EnsembleSpec, probs: torch.Tensor, truth: numpy.ndarray) -> dict[str, dict[str, Any]]:
    """For each ordering: the risk at each of COVERAGES, the AURC, and the whole curve (coverage, risk) to draw."""
    policy = resolve_policy({}, default=spec.policy, task=spec.task, n_members=len(spec.members))
    weights = torch.tensor([m.weight for m in spec.members], dtype=torch.float64)
    votes = Votes(spec.task, weights, spec.positive_index, policy)
    chosen = combine(probs, votes).chosen.numpy()
    if spec.task == "multilabel":
        wrong = (chosen != truth.astype(bool)).flatten()
    elif spec.task == "binary":
        wrong = chosen[:, spec.positive_index] != truth.astype(bool)
    else:
        wrong = ~(chosen.any(axis=1) & (chosen.argmax(axis=1) == truth))
    measured = measure(probs, member_votes(probs, votes), weights, multilabel=spec.task == "multilabel").measures()
    out: dict[str, dict[str, Any]] = {}
    for ordering in ORDERINGS:
        values = measured[ordering]
        uncertainty = values.flatten().numpy()
        order = numpy.argsort(uncertainty, kind="stable")
        kept_wrong = numpy.cumsum(wrong[order])
        counts = numpy.arange(1, len(order) + 1)
        risks = kept_wrong / counts
        at = {f"{c:.0%}": float(risks[max(1, round(c * len(order))) - 1]) for c in COVERAGES}
        out[ordering] = {"risk": at, "aurc": float(risks.mean()), "curve": (counts / len(order), risks)}
    return out


def risk_markdown(results: Mapping[str, Mapping[str, dict[str, Any]]]) -> str:
    """One row per demo and ordering: risk at each coverage and the AURC."""
    columns = [f"{c:.0%}" for c in COVERAGES]
    lines = [
        "| demo | ordered by | " + " | ".join(f"risk at {c}" for c in columns) + " | AURC |",
        "|---|---|" + "---:|" * (len(columns) + 1),
    ]
    for demo, orderings in results.items():
        for ordering, values in orderings.items():
            lines.append(
                f"| {demo} | {ordering} | "
                + " | ".join(f"{values['risk'][c]:.4f}" for c in columns)
                + f" | {values['aurc']:.4f} |"
            )
    return "\n".join(lines)


def plot_costs(tables: Mapping[str, Mapping[str, Mapping[str, float]]], path: Any) -> None:
    """Quality against member-forward ms per image, one panel per demo: members as dots, the cascade as a line."""
    figure = Figure(figsize=(4.4 * len(tables), 4.2))
    axes = figure.subplots(1, len(tables), squeeze=False)[0]
    for axis, (demo, table) in zip(axes, tables.items(), strict=True):
        cascade = [(v["ms"], v["quality"], row.split()[1]) for row, v in table.items() if row.startswith("cascade ")]
        axis.plot(
            [c[0] for c in cascade],
            [c[1] for c in cascade],
            "-o",
            color="tab:blue",
            label="cascade (confidence)",
            zorder=2,
        )
        for ms, value, confidence in cascade[:: max(1, len(cascade) // 4)]:
            axis.annotate(
                confidence, (ms, value), textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue"
            )
        for row, v in table.items():
            if row.startswith("cascade "):
                continue
            member = row.startswith("member ")
            axis.scatter(
                v["ms"],
                v["quality"],
                marker="o" if member else "s",
                color="tab:grey" if member else "tab:orange",
                zorder=3,
            )
            axis.annotate(
                row.removeprefix("member "),
                (v["ms"], v["quality"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        axis.set(
            title=demo, xlabel="member-forward ms per image", ylabel="macro F1" if "multishape" in demo else "accuracy"
        )
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_risk(results: Mapping[str, Mapping[str, dict[str, Any]]], path: Any) -> None:
    """Risk against coverage per demo, one line per ordering; a demo without a wrong answer has no curve to draw."""
    results = {
        demo: orderings for demo, orderings in results.items() if any(v["risk"]["100%"] for v in orderings.values())
    }
    figure = Figure(figsize=(4.2 * len(results), 3.8))
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for axis, (demo, orderings) in zip(axes, results.items(), strict=True):
        for ordering, values in orderings.items():
            coverage, risks = values["curve"]
            axis.plot(coverage, risks, label=f"{ordering} (AURC {values['aurc']:.3f})")
        axis.set(title=demo, xlabel="coverage", ylabel="error rate of the answers kept", xlim=(0, 1.0))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def without_curves(orderings: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """One demo's risk–coverage results as JSON: the curves left out."""
    return {ordering: {k: v for k, v in values.items() if k != "curve"} for ordering, values in orderings.items()}
