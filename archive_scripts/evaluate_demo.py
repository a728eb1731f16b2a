"""Measure each member and each policy of the demo ensembles on held-out images; print tables, draw one picture.

Usage: python -m archive_scripts.evaluate_demo [--count 2000] [--json out.json]
           [--plot docs/demo_precision_recall.png] [--tta]

The held-out images come from a seed the trainer never uses, are encoded to PNG and decoded by the
serving code, so the figures are those of the served ensembles. Metrics come from scikit-learn:
- `shapes` (binary, positive label `present`): accuracy, precision and recall;
- `multishape` (multilabel): per-label AUROC of each member and of the mean policy's score (as CheXNet
  reports it), and macro precision, recall and F1 of each member's and each policy's decisions.
The picture puts every member and policy of both demos on precision against recall, so the OR / AND /
vote trade-off shows at a glance. `--tta` also scores `multishape` with each test-time augmentation
on every member (macro AUROC and F1 of each member and of the mean policy), to show what the views buy.
Every demo also gets what its answers cost (the cascade against mean and the members, early exit against
the full vote) and its risk–coverage table (archive_scripts/evaluate_cascade.py), drawn with `--cascade-plot`
and `--risk-plot`, and its answers with each member and each pair of members missing: quality, how often partial
(archive_scripts/evaluate_missing.py). scikit-learn and matplotlib are evaluation-only dependencies
(archive_scripts/requirements-eval.txt).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from archive_scripts.demo_data import make_multilabel_split, make_split
from archive_scripts.digits_demo import split as digits_split
from archive_scripts.evaluate_cascade import (
    cost_table,
    plot_costs,
    plot_risk,
    risk_coverage,
    risk_markdown,
    without_curves,
)
from archive_scripts.evaluate_missing import missing_tables
from archive_scripts.evaluate_missing import report as missing_report
from archive_scripts.faces_demo import CORRUPTIONS, corrupted
from archive_scripts.faces_demo import crops as face_crops
from handlers.answers.policies import Decision, Votes, combine, member_votes
from handlers.config.files import load_ensembles
from handlers.config.policy import policy_names, resolve_policy
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

HELD_OUT_SEED = 7_000_001
TTA_MODES = ("none", "hflip", "five_crop", "ten_crop")
K_OF_N = 2
DEMOS = ("shapes", "multishape", "faces", "digits")
Table = dict[str, dict[str, float]]


def held_out_samples(spec: EnsembleSpec, count: int) -> Sequence[Any]:
    """The demo's held-out images with their truth: generated from an unused seed (`count` of them) for the
    synthetic demos, the fixed held-out split for `digits`, and lfw_subset's 200 crops for `faces`."""
    if spec.name == "digits":
        return digits_split()[1]
    if spec.name == "faces":
        return face_crops()
    return (
        make_multilabel_split(count, HELD_OUT_SEED) if spec.task == "multilabel" else make_split(count, HELD_OUT_SEED)
    )


def held_out(
    ensemble: Ensemble, count: int, samples: Sequence[Any] | None = None
) -> tuple[torch.Tensor, numpy.ndarray]:
    """probs[member, image, label] of the held-out images (or `samples`), each sent as a PNG through the serving
    decode, and their true labels."""
    spec = ensemble.spec
    samples = held_out_samples(spec, count) if samples is None else samples
    images = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        images.append(decode_image(buffer.getvalue(), spec.limits))
    truth = numpy.array([s.labels for s in samples] if spec.task == "multilabel" else [s.label for s in samples])
    return ensemble.probabilities(images), truth


def decisions(spec: EnsembleSpec, probs: torch.Tensor, *, scores: bool = False, ranks: bool = False) -> dict[str, Any]:
    """Each member's own decisions and each policy's (k_of_n at k=2), as chosen[image, label]; with `scores`, paired
    with the score[image, label] each ranks by, with `ranks` with label indices best first."""
    weights = torch.tensor([m.weight for m in spec.members], dtype=torch.float64)
    n = len(spec.members)
    default = resolve_policy({}, default=spec.policy, task=spec.task, n_members=n)
    votes = Votes(spec.task, weights, spec.positive_index, default)
    own = member_votes(probs, votes)
    made = {f"member {m.name}": Decision(own[i], probs[i]) for i, m in enumerate(spec.members)}
    for name in policy_names():
        if name == "cascade":  # Its answers depend on the members' costs: the cost table (evaluate_cascade) has them.
            continue
        requested = {"policy": name, **({"k": str(K_OF_N)} if name == "k_of_n" else {})}
        policy = resolve_policy(requested, default=None, task=spec.task, n_members=n)
        label = name + (f" (k={K_OF_N})" if name == "k_of_n" else "")
        made[f"policy {label}"] = combine(probs, Votes(spec.task, weights, spec.positive_index, policy))
    if scores:
        return {row: (d.chosen.numpy().astype(int), d.score.numpy()) for row, d in made.items()}
    if ranks:
        return {row: (d.chosen.numpy(), d.order().numpy()) for row, d in made.items()}
    return {row: d.chosen.numpy().astype(int) for row, d in made.items()}


def binary_table(spec: EnsembleSpec, probs: torch.Tensor, truth: numpy.ndarray) -> Table:
    """Accuracy, precision, recall and AUROC of the positive label for every member and policy; a policy's AUROC
    ranks images by its own score (a vote's share of positive votes, the mean probability, the deciding member's)."""
    table = {}
    for row, (chosen, score) in decisions(spec, probs, scores=True).items():
        predicted = chosen[:, spec.positive_index]
        precision, recall, _, _ = precision_recall_fscore_support(truth, predicted, average="binary", zero_division=0)
        auroc = roc_auc_score(truth, score[:, spec.positive_index])
        table[row] = {
            "accuracy": accuracy_score(truth, predicted),
            "precision": precision,
            "recall": recall,
            "auroc": auroc,
        }
    return table


def multiclass_table(spec: EnsembleSpec, probs: torch.Tensor, truth: numpy.ndarray) -> Table:
    """Accuracy (an abstaining vote counts as wrong) and top-1/2/3 accuracy, ranked by each member's probabilities
    or each policy's own order, for every member and policy."""
    table = {}
    for row, (chosen, ranked) in decisions(spec, probs, ranks=True).items():
        answered = chosen.any(axis=1)
        correct = answered & (chosen.argmax(axis=1) == truth)
        table[row] = {"accuracy": float(correct.mean())} | {
            f"top-{k}": float((ranked[:, :k] == truth[:, None]).any(axis=1).mean()) for k in (1, 2, 3)
        }
    return table


def multilabel_tables(spec: EnsembleSpec, probs: torch.Tensor, truth: numpy.ndarray) -> tuple[Table, Table]:
    """(per-label AUROC by member and mean policy, macro precision / recall / F1 by member and policy)."""
    weights = torch.tensor([m.weight for m in spec.members], dtype=torch.float64).view(-1, 1, 1)
    scorers = {m.name: probs[i].numpy() for i, m in enumerate(spec.members)}
    scorers["policy mean"] = ((probs * weights).sum(dim=0) / weights.sum()).numpy()
    auroc = {
        label: {who: roc_auc_score(truth[:, j], scores[:, j]) for who, scores in scorers.items()}
        for j, label in enumerate(spec.labels)
    }
    macro = {}
    for row, chosen in decisions(spec, probs).items():
        precision, recall, f1, _ = precision_recall_fscore_support(truth, chosen, average="macro", zero_division=0)
        macro[row] = {"precision": precision, "recall": recall, "f1": f1}
    return auroc, macro


def tta_table(spec: EnsembleSpec, count: int) -> Table:
    """Macro AUROC and macro F1 of each member and of the mean policy.

    With each test-time augmentation on every member.
    """
    table = {}
    for tta in TTA_MODES:
        views = spec.with_views(tta)
        probs, truth = held_out(Ensemble.from_spec(views, torch.device("cpu")), count)
        auroc, macro = multilabel_tables(views, probs, truth)
        for who, row in [*((m.name, f"member {m.name}") for m in spec.members), ("policy mean", "policy mean")]:
            table[f"{tta}: {row}"] = {
                "macro AUROC": float(numpy.mean([auroc[label][who] for label in spec.labels])),
                "macro F1": macro[row]["f1"],
            }
    return table


def markdown(table: Table, first: str) -> str:
    """A markdown table: one row per key, one column per metric, three decimals."""
    columns = list(next(iter(table.values())))
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |" for row, values in table.items()]
    return "\n".join(lines)


def plot(points: dict[str, Table], path: Path) -> None:
    """Precision against recall for every member and policy, one panel per demo; coinciding points share a label."""
    figure = Figure(figsize=(6 * len(points), 5.2))
    axes = figure.subplots(1, len(points), squeeze=False)
    for axis, (title, table) in zip(axes[0], points.items(), strict=True):
        spots: dict[tuple[float, float, bool], list[str]] = {}
        for row, values in table.items():
            spots.setdefault(
                (round(values["recall"], 3), round(values["precision"], 3), row.startswith("member ")), []
            ).append(row.split(" ", 1)[1])
        for index, ((recall, precision, member), names) in enumerate(sorted(spots.items())):
            axis.scatter(
                recall,
                precision,
                marker="o" if member else "s",
                s=60,
                color="tab:grey" if member else "tab:blue",
                zorder=3,
            )
            axis.annotate(
                " = ".join(names),
                (recall, precision),
                textcoords="offset points",
                xytext=(6, 5 if index % 2 else -11),
                fontsize=8,
            )
        axis.set(title=title, xlabel="recall", ylabel="precision", xlim=(0.4, 1.02), ylim=(0.4, 1.02))
        axis.grid(alpha=0.3)
    axes[0][0].legend(
        handles=[
            Line2D([], [], marker="o", ls="", color="tab:grey", label="member"),
            Line2D([], [], marker="s", ls="", color="tab:blue", label="policy"),
        ],
        loc="lower left",
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def corruption_table(spec: EnsembleSpec, ensemble: Ensemble, metric: str) -> Table:
    """`faces` under each corruption at each strength: one row per (corruption, strength), one column per member and
    policy, the `metric` of the positive label."""
    table = {}
    for name, (_, _, strengths) in CORRUPTIONS.items():
        for strength in strengths:
            probs, truth = held_out(ensemble, 0, corrupted(name, strength))
            scores = binary_table(spec, probs, truth)
            table[f"{name} {strength:g}"] = {row.split(" ", 1)[1]: values[metric] for row, values in scores.items()}
    return table


def evaluate(specs: Sequence[EnsembleSpec], count: int) -> dict[str, Any]:
    """Every table for every demo ensemble in `specs`, keyed by ensemble name."""
    results: dict[str, Any] = {}
    for spec in specs:
        ensemble = Ensemble.from_spec(spec, torch.device("cpu"))
        probs, truth = held_out(ensemble, count)
        if spec.task == "multilabel":
            auroc, macro = multilabel_tables(spec, probs, truth)
            results[spec.name] = {"task": spec.task, "auroc": auroc, "macro": macro}
        elif spec.task == "multiclass":
            results[spec.name] = {"task": spec.task, "scores": multiclass_table(spec, probs, truth)}
        else:
            results[spec.name] = {"task": spec.task, "scores": binary_table(spec, probs, truth)}
        results[spec.name]["images"] = len(truth)
        results[spec.name]["cost"] = cost_table(spec, ensemble, probs, truth)
        results[spec.name]["risk_coverage"] = risk_coverage(spec, probs, truth)
        results[spec.name]["missing"] = missing_tables(spec, ensemble.decider, probs, truth, K_OF_N)
        if spec.name == "faces":
            # Clean crops leave nothing to rank: every answer is right. Blurred (radius 2) ones are where faces errs.
            results[spec.name]["risk_coverage_blurred"] = risk_coverage(
                spec, *held_out(ensemble, 0, corrupted("blur", 2.0))
            )
            for metric in ("accuracy", "recall"):
                results[spec.name][f"corrupted {metric}"] = corruption_table(spec, ensemble, metric)
    return results


def plot_corruptions(table: Table, clean: Table, members: Sequence[str], path: Path) -> None:
    """Accuracy against each corruption's strength (clean first), one panel per corruption.

    Members dashed, policies solid.
    """
    figure = Figure(figsize=(4.2 * len(CORRUPTIONS), 4.2))
    axes = figure.subplots(1, len(CORRUPTIONS), squeeze=False)[0]
    for axis, (name, (meaning, _, strengths)) in zip(axes, CORRUPTIONS.items(), strict=True):
        ticks = ["clean", *(f"{s:g}" for s in strengths)]
        for who in next(iter(table.values())):
            if who.startswith("k_of_n"):
                continue
            member = who in members
            values = [clean[("member " if member else "policy ") + who]["accuracy"]]
            values += [table[f"{name} {s:g}"][who] for s in strengths]
            marker = "o^v<>"[members.index(who) % 5] if member else "s"
            axis.plot(
                ticks,
                values,
                ls="--" if member else "-",
                marker=marker,
                label=who,
                color="tab:grey" if member else None,
                alpha=0.7 if member else 1.0,
            )
        axis.set(title=f"faces: {name}", xlabel=meaning, ylabel="accuracy", ylim=(0.45, 1.02))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--ensemble", action="append", help=f"default: {', '.join(DEMOS)}")
    parser.add_argument("--count", type=int, default=2000, help="held-out images of each synthetic demo")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", type=Path, help="draw precision against recall for every member and policy here")
    parser.add_argument("--faces-plot", type=Path, help="draw faces' accuracy under each corruption here")
    parser.add_argument("--tta", action="store_true", help="also score multishape with each test-time augmentation")
    parser.add_argument("--cascade-plot", type=Path, help="draw each demo's quality against member-forward cost here")
    parser.add_argument("--risk-plot", type=Path, help="draw each demo's risk against coverage here")
    args = parser.parse_args()
    specs = load_ensembles(args.config)
    results = evaluate([specs[name] for name in args.ensemble or DEMOS], args.count)
    if args.tta and "multishape" in results:
        results["multishape"]["tta"] = tta_table(specs["multishape"], args.count)
    for name, result in results.items():
        print(f"\n{name}: {result['images']} held-out images")
        if result["task"] == "multilabel":
            print(markdown(result["auroc"], "AUROC by label") + "\n\n" + markdown(result["macro"], "macro average"))
            if "tta" in result:
                print("\n" + markdown(result["tta"], "test-time augmentation: who"))
        else:
            print(markdown(result["scores"], "who"))
        for metric in ("accuracy", "recall"):
            if f"corrupted {metric}" in result:
                print("\n" + markdown(result[f"corrupted {metric}"], f"{metric} under"))
        print(
            "\n"
            + markdown(
                result["cost"], "what it costs (quality: accuracy, multilabel macro F1; ms: member-forward per image)"
            )
        )
        print("\n" + missing_report(specs[name], result["missing"]))
    risks = {name: r["risk_coverage"] for name, r in results.items()}
    if "faces" in results:
        risks["faces, blurred (radius 2)"] = results["faces"]["risk_coverage_blurred"]
    print("\nrisk-coverage of each demo's own policy\n" + risk_markdown(risks))
    if args.cascade_plot:
        plot_costs({name: r["cost"] for name, r in results.items()}, args.cascade_plot)
        print(f"wrote {args.cascade_plot}")
    if args.risk_plot:
        plot_risk(risks, args.risk_plot)
        print(f"wrote {args.risk_plot}")
    for result in results.values():
        for key in ("risk_coverage", "risk_coverage_blurred"):
            if key in result:
                result[key] = without_curves(result[key])
    if args.plot:
        # faces, near perfect on clean crops, has its own picture: accuracy under corruptions (--faces-plot).
        panels = {
            f"{name}: "
            + (
                "macro precision / recall" if r["task"] == "multilabel" else "precision / recall of the positive label"
            ): r["macro"] if r["task"] == "multilabel" else r["scores"]
            for name, r in results.items()
            if r["task"] != "multiclass" and "corrupted accuracy" not in r
        }
        plot(panels, args.plot)
        print(f"\nwrote {args.plot}")
    if args.faces_plot and "faces" in results:
        members = [m.name for m in specs["faces"].members]
        plot_corruptions(results["faces"]["corrupted accuracy"], results["faces"]["scores"], members, args.faces_plot)
        print(f"wrote {args.faces_plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": args.count, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
