"""With members missing: what each demo's answers would be, and how often they are partial (`make evaluate`).

Usage: python -m archive_scripts.evaluate_missing [--ensemble shapes] [--count 2000] [--json out.json]
(`make evaluate` runs it as part of archive_scripts/evaluate_demo.py; alone it runs only this part.)

A member can be missing from an answer (deadline, error, busy, non_finite; docs/deadlines.md). For every set of
members taken away (each one, and each pair while one member is left), the held-out probabilities of those members
are set to NaN and the served decider answers with them marked missing (`Decider.decide(..., missing=...)`), as a
worker does when they fail to answer. Each row gives the quality (accuracy; macro F1 for multilabel, as
evaluate_cascade.quality scores it), its change against the full ensemble, the share of images whose answer is
`partial`, and the share whose answer differs from the full ensemble's. `partial` is conservative: an image whose
answer differs is always partial (asserted on every row).

Every demo member is `required` (the default), so as configured each of these answers is refused (503
QuorumNotMet); the rows are what the answer would be if the missing members were `required: false` and
`min_members` at most the members answering (both checked against `Decider.quorum`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy
import torch

from archive_scripts.evaluate_cascade import quality
from handlers.answers.decide import Decider
from handlers.config.policy import POLICY_TABLE, PolicySpec, policy_names, resolve_policy
from handlers.config.specs import EnsembleSpec

REASON = "deadline"
FULL = "full ensemble"
Table = dict[str, dict[str, Any]]


def missing_sets(members: int) -> list[tuple[int, ...]]:
    """The member positions to take away: none, each one, then each pair (only while a member is left)."""
    sets: list[tuple[int, ...]] = [(), *((m,) for m in range(members))]
    if members >= 3:
        sets += list(combinations(range(members), 2))
    return sets


def row_name(spec: EnsembleSpec, absent: tuple[int, ...]) -> str:
    """`full ensemble`, or `without a` / `without a, b`."""
    return "without " + ", ".join(spec.members[m].name for m in absent) if absent else FULL


def policies(spec: EnsembleSpec, k_of_n: int) -> dict[str, PolicySpec]:
    """The demo's default policy first (by its name), then every other policy the evaluation scores (k_of_n at
    `k_of_n`); cascade is left out, as in evaluate_demo.decisions (its answers depend on the members' costs)."""
    n = len(spec.members)
    default = resolve_policy({}, default=spec.policy, task=spec.task, n_members=n)
    out = {default.name + (f" (k={default.k})" if default.name == "k_of_n" else ""): default}
    for name in policy_names():
        if POLICY_TABLE[name].combines == "cascade":
            continue
        requested = {"policy": name, **({"k": str(k_of_n)} if name == "k_of_n" else {})}
        label = name + (f" (k={k_of_n})" if name == "k_of_n" else "")
        out.setdefault(label, resolve_policy(requested, default=None, task=spec.task, n_members=n))
    return out


def soft(spec: EnsembleSpec) -> Decider:
    """A decider for `spec` with every member `required: false`: its quorum is `min_members` alone."""
    return Decider(replace(spec, members=tuple(replace(m, required=False) for m in spec.members)))


def missing_table(
    spec: EnsembleSpec, decider: Decider, probs: torch.Tensor, truth: numpy.ndarray, policy: PolicySpec
) -> Table:
    """One row per set of missing members (`missing_sets`): members answering, quality, delta against the full
    ensemble, share of images partial, share whose answer differs from the full ensemble's, and what the quorum
    says as configured (`refused`: a required member is missing, or fewer than `min_members` answer)."""
    everyone = tuple(range(len(spec.members)))
    full = decider.decide(probs, policy, everyone).decision.chosen
    full_quality = quality(spec, full.numpy(), truth)
    count = probs.shape[1]
    lenient = soft(spec)
    table: Table = {}
    for absent in missing_sets(len(spec.members)):
        missing = [{m: REASON for m in absent} for _ in range(count)]
        left = probs.clone()
        left[list(absent)] = float("nan")
        answer = decider.decide(left, policy, everyone, missing=missing)
        chosen = answer.decision.chosen
        differs = (chosen != full).any(dim=-1)
        partial = torch.tensor(answer.partial, dtype=torch.bool)
        assert not (differs & ~partial).any(), f"{spec.name} {row_name(spec, absent)}: an answer differs, not partial"
        answering = len(everyone) - len(absent)
        if absent:
            assert lenient.quorum(missing, everyone, answering) is None
            assert lenient.quorum(missing, everyone, answering + 1) is not None
        configured = decider.quorum(missing, everyone, spec.deadline.min_members)
        value = quality(spec, chosen.numpy(), truth)
        table[row_name(spec, absent)] = {
            "answering": answering,
            "quality": value,
            "delta": value - full_quality,
            "partial": float(partial.double().mean()),
            "differs": float(differs.double().mean()),
            "quorum as configured": "met" if configured is None else "refused",
        }
    return table


def missing_tables(
    spec: EnsembleSpec, decider: Decider, probs: torch.Tensor, truth: numpy.ndarray, k_of_n: int
) -> dict[str, Any]:
    """`missing_table` for the default policy and every other one (`policies`), and which is the default."""
    chosen = policies(spec, k_of_n)
    return {
        "default": next(iter(chosen)),
        "min_members": spec.deadline.min_members,
        "tables": {label: missing_table(spec, decider, probs, truth, policy) for label, policy in chosen.items()},
    }


def metric_name(spec: EnsembleSpec) -> str:
    """The quality's name: what evaluate_cascade.quality computes for the task."""
    return "macro F1" if spec.task == "multilabel" else "accuracy"


def header(spec: EnsembleSpec, result: dict[str, Any]) -> str:
    """Which policy the table is for, and what the quorum as configured does with these answers."""
    table = result["tables"][result["default"]]
    refused = [row for row, values in table.items() if values["quorum as configured"] == "refused"]
    required = [m.name for m in spec.members if m.required]
    configured = f"min_members={result['min_members']}, required: {', '.join(required) or 'none'}"
    if refused == [row for row in table if row != FULL]:
        quorum = f"as configured ({configured}) every row with a member missing is refused (503 QuorumNotMet)"
    else:
        quorum = f"as configured ({configured}) refused: {', '.join(refused) or 'none'}"
    return (
        f"{spec.name}, policy {result['default']}, with members missing; {quorum}. The rows are the answers if the "
        "missing members were `required: false` and min_members at most the members answering"
    )


def markdown(spec: EnsembleSpec, table: Table) -> str:
    """The default policy's table: one row per set of missing members."""
    metric = metric_name(spec)
    lines = [
        f"| missing | members answering | {metric} | change | partial | differs from full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row, v in table.items():
        lines.append(
            f"| {row} | {v['answering']} | {v['quality']:.3f} | {v['delta']:+.3f} | {v['partial']:.1%} | "
            f"{v['differs']:.1%} |"
        )
    return "\n".join(lines)


def policies_markdown(spec: EnsembleSpec, tables: dict[str, Table]) -> str:
    """Every policy: its quality with each set of members missing, and the share of partial answers."""
    rows = list(next(iter(tables.values())))
    short = ["full" if row == FULL else "-" + row.removeprefix("without ").replace(", ", " -") for row in rows]
    lines = [
        f"| {metric_name(spec)} (partial) | " + " | ".join(short) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for label, table in tables.items():
        cells = [
            f"{table[row]['quality']:.3f}" + ("" if row == FULL else f" ({table[row]['partial']:.1%})") for row in rows
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(spec: EnsembleSpec, result: dict[str, Any]) -> str:
    """What `make evaluate` prints for one demo."""
    tables = result["tables"]
    return (
        header(spec, result)
        + "\n"
        + markdown(spec, tables[result["default"]])
        + "\n\nevery policy, members missing (share of answers partial)\n"
        + policies_markdown(spec, tables)
    )


def main() -> None:
    from archive_scripts.evaluate_demo import DEMOS, K_OF_N, held_out
    from handlers.config.files import load_ensembles
    from handlers.ensemble import Ensemble

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--ensemble", action="append", help=f"default: {', '.join(DEMOS)}")
    parser.add_argument("--count", type=int, default=2000, help="held-out images of each synthetic demo")
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args()
    specs = load_ensembles(args.config)
    results: dict[str, Any] = {}
    for name in args.ensemble or DEMOS:
        spec = specs[name]
        ensemble = Ensemble.from_spec(spec, torch.device("cpu"))
        probs, truth = held_out(ensemble, args.count)
        results[name] = missing_tables(spec, ensemble.decider, probs, truth, K_OF_N)
        print(f"\n{name}: {len(truth)} held-out images\n" + report(spec, results[name]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": args.count, "missing": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
