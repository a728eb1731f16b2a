"""Measure each member and each policy of the demo ensembles on held-out images; print tables, draw one picture.

Usage: python -m archive_scripts.evaluate_demo [--count 2000] [--json out.json] [--plot docs/demo_precision_recall.png] [--tta]

The held-out images come from a seed the trainer never uses, are encoded to PNG and decoded by the
serving code, so the figures are those of the served ensembles. Metrics come from scikit-learn:
- `shapes` (binary, positive label `present`): accuracy, precision and recall;
- `multishape` (multilabel): per-label AUROC of each member and of the mean policy's score (as CheXNet
  reports it), and macro precision, recall and F1 of each member's and each policy's decisions.
The picture puts every member and policy of both demos on precision against recall, so the OR / AND /
vote trade-off shows at a glance. `--tta` also scores `multishape` with each test-time augmentation
on every member (macro AUROC and F1 of each member and of the mean policy), to show what the views buy. scikit-learn and matplotlib are evaluation-only dependencies
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
from handlers.answers.policies import Votes, combine, member_votes
from handlers.config.files import load_ensembles
from handlers.config.policy import policy_names, resolve_policy
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

HELD_OUT_SEED = 7_000_001
TTA_MODES = ("none", "hflip", "five_crop", "ten_crop")
K_OF_N = 2
Table = dict[str, dict[str, float]]


def held_out(ensemble: Ensemble, count: int) -> tuple[torch.Tensor, numpy.ndarray]:
    """probs[member, image, label] of `count` held-out images through the serving decode, and their true labels."""
    spec = ensemble.spec
    multilabel = spec.task == "multilabel"
    samples = make_multilabel_split(count, HELD_OUT_SEED) if multilabel else make_split(count, HELD_OUT_SEED)
    images = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        images.append(decode_image(buffer.getvalue(), spec.limits))
    truth = numpy.array([s.labels for s in samples] if multilabel else [s.label for s in samples])
    return ensemble.probabilities(images), truth


def decisions(spec: EnsembleSpec, probs: torch.Tensor) -> dict[str, numpy.ndarray]:
    """Each member's own decisions and each policy's (k_of_n at k=2), as chosen[image, label] at threshold 0.5."""
    weights = torch.tensor([m.weight for m in spec.members], dtype=torch.float64)
    n = len(spec.members)
    default = resolve_policy({}, default=spec.policy, task=spec.task, n_members=n)
    own = member_votes(probs, Votes(spec.task, weights, spec.positive_index, default))
    rows = {f"member {m.name}": own[i].numpy().astype(int) for i, m in enumerate(spec.members)}
    for name in policy_names():
        requested = {"policy": name, **({"k": str(K_OF_N)} if name == "k_of_n" else {})}
        policy = resolve_policy(requested, default=None, task=spec.task, n_members=n)
        label = name + (f" (k={K_OF_N})" if name == "k_of_n" else "")
        rows[f"policy {label}"] = combine(probs, Votes(spec.task, weights, spec.positive_index, policy)).chosen.numpy().astype(int)
    return rows


def binary_table(spec: EnsembleSpec, probs: torch.Tensor, truth: numpy.ndarray) -> Table:
    """Accuracy, precision and recall of the positive label for every member and policy."""
    table = {}
    for row, chosen in decisions(spec, probs).items():
        predicted = chosen[:, spec.positive_index]
        precision, recall, _, _ = precision_recall_fscore_support(truth, predicted, average="binary", zero_division=0)
        table[row] = {"accuracy": accuracy_score(truth, predicted), "precision": precision, "recall": recall}
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
    """Macro AUROC and macro F1 of each member and of the mean policy, with each test-time augmentation on every member."""
    table = {}
    for tta in TTA_MODES:
        views = spec.with_views(tta)
        probs, truth = held_out(Ensemble.from_spec(views, torch.device("cpu")), count)
        auroc, macro = multilabel_tables(views, probs, truth)
        for who, row in [*((m.name, f"member {m.name}") for m in spec.members), ("policy mean", "policy mean")]:
            table[f"{tta}: {row}"] = {"macro AUROC": float(numpy.mean([auroc[label][who] for label in spec.labels])), "macro F1": macro[row]["f1"]}
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
            spots.setdefault((round(values["recall"], 3), round(values["precision"], 3), row.startswith("member ")), []).append(row.split(" ", 1)[1])
        for index, ((recall, precision, member), names) in enumerate(sorted(spots.items())):
            axis.scatter(recall, precision, marker="o" if member else "s", s=60, color="tab:grey" if member else "tab:blue", zorder=3)
            axis.annotate(" = ".join(names), (recall, precision), textcoords="offset points",
                          xytext=(6, 5 if index % 2 else -11), fontsize=8)  # fmt: skip
        axis.set(title=title, xlabel="recall", ylabel="precision", xlim=(0.4, 1.02), ylim=(0.4, 1.02))
        axis.grid(alpha=0.3)
    axes[0][0].legend(
        handles=[Line2D([], [], marker="o", ls="", color="tab:grey", label="member"),
                 Line2D([], [], marker="s", ls="", color="tab:blue", label="policy")],  # fmt: skip
        loc="lower left",
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def evaluate(specs: Sequence[EnsembleSpec], count: int) -> dict[str, Any]:
    """Every table for every demo ensemble in `specs`, keyed by ensemble name."""
    results: dict[str, Any] = {}
    for spec in specs:
        probs, truth = held_out(Ensemble.from_spec(spec, torch.device("cpu")), count)
        if spec.task == "multilabel":
            auroc, macro = multilabel_tables(spec, probs, truth)
            results[spec.name] = {"task": spec.task, "auroc": auroc, "macro": macro}
        else:
            results[spec.name] = {"task": spec.task, "scores": binary_table(spec, probs, truth)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--ensemble", action="append", help="default: shapes and multishape")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", type=Path, help="draw precision against recall for every member and policy here")
    parser.add_argument("--tta", action="store_true", help="also score multishape with each test-time augmentation")
    args = parser.parse_args()
    specs = load_ensembles(args.config)
    results = evaluate([specs[name] for name in args.ensemble or ["shapes", "multishape"]], args.count)
    if args.tta and "multishape" in results:
        results["multishape"]["tta"] = tta_table(specs["multishape"], args.count)
    for name, result in results.items():
        print(f"\n{name}: {args.count} held-out images")
        if result["task"] == "multilabel":
            print(markdown(result["auroc"], "AUROC by label") + "\n\n" + markdown(result["macro"], "macro average"))
            if "tta" in result:
                print("\n" + markdown(result["tta"], "test-time augmentation: who"))
        else:
            print(markdown(result["scores"], f"held-out ({args.count} images)"))
    if args.plot:
        panels = {
            f"{name}: " + ("macro precision / recall" if r["task"] == "multilabel" else "precision / recall of the positive label"):
            r["macro"] if r["task"] == "multilabel" else r["scores"]
            for name, r in results.items()
        }  # fmt: skip
        plot(panels, args.plot)
        print(f"\nwrote {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": args.count, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
