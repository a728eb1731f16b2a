"""Measure each member and each policy of the demo ensemble on a held-out split and print a table.

Usage: python -m archive_scripts.evaluate_demo [--ensemble shapes] [--count 2000] [--json out.json]

The held-out images come from a seed the trainer never uses, are encoded to PNG and decoded by the
serving code, so the figures are those of the served ensemble.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from archive_scripts.demo_data import make_split
from handlers.ensemble import Ensemble
from handlers.manifest import load_ensembles
from handlers.policies import PolicySpec, Votes, combine, member_votes, policy_names, resolve_policy
from handlers.preprocess import decode_image

HELD_OUT_SEED = 7_000_001


def scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision and recall of boolean positive predictions."""
    tp = int((predicted & truth).sum())
    positives, actual = int(predicted.sum()), int(truth.sum())
    return {
        "accuracy": float((predicted == truth).float().mean()),
        "precision": tp / positives if positives else 0.0,
        "recall": tp / actual if actual else 0.0,
    }


def evaluate(ensemble: Ensemble, count: int) -> dict[str, dict[str, float]]:
    """Scores for every member and for every policy (k_of_n at k=2) on `count` held-out images."""
    spec = ensemble.spec
    samples = make_split(count, HELD_OUT_SEED)
    images = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        images.append(decode_image(buffer.getvalue(), spec.limits))
    probs = ensemble.probabilities(images)
    truth = torch.tensor([s.label == 1 for s in samples])
    positive = spec.positive_index
    default = resolve_policy({}, default=spec.policy, task=spec.task, n_members=len(spec.members))
    weights = torch.tensor([m.weight for m in spec.members], dtype=torch.float64)
    votes = Votes(task=spec.task, weights=weights, positive=positive, policy=default)
    own = member_votes(probs, votes)
    table = {f"member {m.name}": scores(own[i, :, positive], truth) for i, m in enumerate(spec.members)}
    for name in policy_names():
        requested = {"policy": name, **({"k": "2"} if name == "k_of_n" else {})}
        policy: PolicySpec = resolve_policy(requested, default=None, task=spec.task, n_members=len(spec.members))
        decision = combine(probs, Votes(spec.task, weights, positive, policy))
        label = name + (" (k=2)" if name == "k_of_n" else "")
        table[f"policy {label}"] = scores(decision.chosen[:, positive], truth)
    return table


def markdown(table: dict[str, dict[str, float]], count: int) -> str:
    lines = [
        f"| held-out ({count} images) | accuracy | precision | recall |",
        "|---|---:|---:|---:|",
    ]
    for row, values in table.items():
        lines.append(f"| {row} | {values['accuracy']:.3f} | {values['precision']:.3f} | {values['recall']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--ensemble", default="shapes")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    spec = load_ensembles(args.config)[args.ensemble]
    table = evaluate(Ensemble.from_spec(spec, torch.device("cpu")), args.count)
    print(markdown(table, args.count))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": args.count, "scores": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
