"""What a deadline buys when one member straggles: p50/p99 and the accuracy it costs, `shapes` served by TorchServe.

Usage: python -m bench.deadline [--quick] [--out FILE]   (`make bench-deadline`; needs `make demo`)

One member of `shapes` (`strided`) is slowed: a subclass of its model class, written into a copy of its model file,
sleeps 200 ms in its forward when the batch holds one of the bench's chosen images (10% of the held-out images, by
the smallest digests of the member's input rows; the member computes the same digest from its input tensor). It runs
eager (a traced plan would bake the branch in) and is soft (`required: false`); the other members are as shipped.
One archive, one private TorchServe on 127.0.0.1 (token on) with the demo's shipped batching. Two configurations of
the same requests: without a deadline, and with the header `X-Ensemble-Deadline-Ms: 50`; every request carries the
`X-Request-Start` stamp a proxy in front would add, so the deadline counts from when it was sent. At 1 and at 8
closed-loop clients of single images (bench/loadgen.py), alternating rounds: each round sends every image once per
configuration, in the round's own shuffled order, the configurations' order rotated each round.

Per (clients, configuration): requests sent, answered (200), refused with 503 QuorumNotMet, lost (no HTTP response,
or any other status); p50 and p99 latency, the median over rounds with its 95% bootstrap interval
(bench/intervals.py); accuracy of the answered images against their true labels; the share of answers with the
slowed member missing (and why) and the share partial; every answer's label against the in-process one of the
members that answered. Verdict per client count: p99 with the deadline <= 50 + 15 ms by the whole interval, with 0
lost. Writes bench/results/deadline.json.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import requests
import torch

from archive_scripts.build_archives import build_archive
from archive_scripts.demo_data import make_split
from archive_scripts.torchserve_ctl import private_server, register, start, stop
from bench.contenders import CORES, TIMEOUT_S, thread_session
from bench.intervals import ratio_interval
from bench.loadgen import Send, percentiles_ms, rotated, run_load
from bench.workloads import demo
from handlers.config.specs import EnsembleSpec, InputSpec
from handlers.ensemble import Ensemble
from handlers.inputs.images import batch_tensors, decode_image

RESULTS = Path(__file__).parent / "results" / "deadline.json"
SEED = 4242  # bench/workloads.py demo(): the held-out images every shapes benchmark sends
SLOWED = "strided"
SLOWED_CLASS = "SlowedStridedDilatedNet"
SLOW_SECONDS = 0.2
SLOW_SHARE = 0.1
DEADLINE_MS = 50
SLACK_MS = 15
LIMIT_MS = DEADLINE_MS + SLACK_MS
NO_DEADLINE, WITH_DEADLINE = "no deadline", f"deadline {DEADLINE_MS} ms"
CONFIGS: dict[str, dict[str, str]] = {NO_DEADLINE: {}, WITH_DEADLINE: {"X-Ensemble-Deadline-Ms": str(DEADLINE_MS)}}
CLIENTS = (1, 8)
MODES = {"quick": (128, 2), "full": (256, 10)}  # images, rounds (a round: every image once per configuration)
WARM_REQUESTS = 32
SETTLE_S = 0.5  # between runs: a slowed call a deadline left running ends before the next configuration starts
PORT_OFFSET = 30700
ANSWERED, QUORUM, LOST = "answered", "quorum", "lost"


def input_digest(row: torch.Tensor) -> str:
    """One member input row's identity: sha256 of its values rounded to 1/64 (as int16), 16 hex digits.

    The slowed member's model file carries this function's source, so the worker and the bench compute it alike."""
    quantised = torch.round(row.detach().float() * 64).to(torch.int16).contiguous()
    return hashlib.sha256(quantised.cpu().numpy().tobytes()).hexdigest()[:16]


def slow_digests(digests: Sequence[str], share: float) -> frozenset[str]:
    """The digests of the slowed images: the smallest `share` of the distinct ones (at least one), a fixed choice
    spread over the images like a hash."""
    distinct = sorted(set(digests))
    return frozenset(distinct[: max(1, round(len(distinct) * share))])


def slowed_model_file(base_source: str, base_class: str, digests: frozenset[str], seconds: float) -> str:
    """`base_source` (a model file) plus SLOWED_CLASS: `base_class` sleeping `seconds` in its forward when a row of its
    batch has one of `digests`, except while an exporter traces it (the archive's ONNX file is then the plain
    member's, unused: the slowed member runs eager)."""
    return (
        base_source.rstrip()
        + "\n\n\n# Added by bench/deadline.py: the member slowed on chosen inputs.\n"
        + "import hashlib  # noqa: E402\nimport time  # noqa: E402\n\n"
        + f"SLOW_DIGESTS = frozenset({sorted(digests)!r})\nSLOW_SECONDS = {seconds!r}\n\n\n"
        + inspect.getsource(input_digest)
        + f"\n\nclass {SLOWED_CLASS}({base_class}):\n"
        + f'    """{base_class}, sleeping SLOW_SECONDS on a batch with a row whose digest is in SLOW_DIGESTS."""\n\n'
        + "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        + "        out = super().forward(x)\n"
        + "        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():\n"
        + "            return out\n"
        + "        if any(input_digest(row) in SLOW_DIGESTS for row in x):\n"
        + "            time.sleep(SLOW_SECONDS)\n"
        + "        return out\n"
    )


def slowed_spec(spec: EnsembleSpec, folder: Path, digests: frozenset[str]) -> EnsembleSpec:
    """`spec` with SLOWED replaced by its slowed subclass (model file written to `folder`): eager and soft."""
    member = next(m for m in spec.members if m.name == SLOWED)
    source, base_class = member.arch.rsplit(":", 1)
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "slowed_models.py"
    model_file.write_text(slowed_model_file((spec.base_dir / source).read_text(), base_class, digests, SLOW_SECONDS))
    slowed = replace(
        member,
        arch=f"{model_file.resolve()}:{SLOWED_CLASS}",
        execution=replace(spec.member_execution(member), plan="eager"),
        required=False,
    )
    return replace(spec, members=tuple(slowed if m.name == SLOWED else m for m in spec.members))


@dataclass(frozen=True)
class Reference:
    """What the bench knows of each image in-process: its true label, whether it is slowed, and the combined label
    of every member and of the members without SLOWED (eager, the ensemble's default policy)."""

    truth: tuple[str, ...]
    slow: frozenset[int]
    digests: frozenset[str]
    full: tuple[str, ...]
    without_slowed: tuple[str, ...]


def reference(spec: EnsembleSpec, images: Sequence[bytes], seed: int) -> Reference:
    """The slowed images (by their SLOWED input rows, made by the worker's own transform) and the labels."""
    truth = tuple(spec.labels[sample.label] for sample in make_split(len(images), seed))
    ensemble = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))
    decoded = [decode_image(data, spec.limits) for data in images]
    given = spec.member_input(next(m for m in spec.members if m.name == SLOWED))
    assert isinstance(given, InputSpec), "shapes takes images"
    digests = [input_digest(row) for row in batch_tensors(decoded, [given])[given]]
    chosen = slow_digests(digests, SLOW_SHARE)
    probs = ensemble.probabilities(decoded)
    policy = ensemble.prepare({"body": images[0]}, {}).policy
    others = [m.name for m in spec.members if m.name != SLOWED]
    full = [p["label"] for p in ensemble.render(probs, policy)["predictions"]]
    without = [p["label"] for p in ensemble.render(probs, policy, members=others)["predictions"]]
    slow = frozenset(i for i, digest in enumerate(digests) if digest in chosen)
    return Reference(truth, slow, chosen, tuple(full), tuple(without))


@dataclass(frozen=True)
class Record:
    """One single-image request: how it ended, its latency (None when lost), the answer's prediction (label,
    missing, partial) when answered, and why it was lost."""

    outcome: str
    image: int
    latency_s: float | None = None
    prediction: Mapping[str, Any] | None = None
    error: str = ""


def classify(status: int, body: Any) -> str:
    """ANSWERED for a 200 with predictions, QUORUM for an explicit 503 QuorumNotMet, LOST for anything else."""
    if status == 200 and isinstance(body, dict) and isinstance(body.get("predictions"), list) and body["predictions"]:
        return ANSWERED
    if status == 503 and isinstance(body, dict) and body.get("type") == "QuorumNotMet":
        return QUORUM
    return LOST


class Collector:
    """The records of one run, from every client thread."""

    def __init__(self) -> None:
        self._records: list[Record] = []
        self._lock = threading.Lock()

    def add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def take(self) -> list[Record]:
        """The records so far, and a fresh start."""
        with self._lock:
            taken, self._records = self._records, []
        return taken


def sender(url: str, headers: Mapping[str, str], images: Sequence[bytes], collector: Collector) -> Send:
    """Posts one image with the configuration's headers and records how it ended; a lost request raises (run_load
    counts it as an error), a 503 QuorumNotMet is an answer."""

    def send(indices: list[int]) -> list[Mapping[str, Any]]:
        [image] = indices
        began = time.perf_counter()
        try:
            response = thread_session().post(
                url,
                data=images[image],
                # Stamped as a proxy in front stamps it (the gateway does; nginx: `t=${msec}`): the deadline counts
                # TorchServe's queue too.
                headers={
                    **headers,
                    "Content-Type": "application/octet-stream",
                    "X-Request-Start": f"t={time.time():.6f}",
                },
                timeout=TIMEOUT_S,
            )
            elapsed = time.perf_counter() - began
            body = response.json()
        except (requests.RequestException, ValueError) as e:
            collector.add(Record(LOST, image, error=f"{type(e).__name__}: {e}"[:300]))
            raise
        outcome = classify(response.status_code, body)
        if outcome == LOST:
            why = f"HTTP {response.status_code}: {response.text[:200]}"
            collector.add(Record(LOST, image, error=why))
            raise RuntimeError(why)
        if outcome == QUORUM:
            collector.add(Record(QUORUM, image, elapsed))
            return []
        entry = body["predictions"][0]
        prediction = {"label": entry["label"], "missing": entry.get("missing", {}), "partial": entry.get("partial")}
        collector.add(Record(ANSWERED, image, elapsed, prediction))
        return [prediction]

    return send


def round_summary(records: Sequence[Record], known: Reference) -> dict[str, Any]:
    """One run's counts, latency percentiles (of every request answered with 200 or 503), accuracy, missing and
    partial shares, and the answers whose label differs from the in-process label of the members that answered."""
    answered = [r for r in records if r.outcome == ANSWERED and r.prediction is not None]
    timed = [r.latency_s for r in records if r.latency_s is not None]
    p50, p90, p99 = percentiles_ms(timed)
    reasons: Counter[str] = Counter()
    others_missing = partial = correct = mismatches = unchecked = 0
    for record in answered:
        assert record.prediction is not None
        missing: Mapping[str, str] = record.prediction["missing"] or {}
        if SLOWED in missing:
            reasons[str(missing[SLOWED]).split(":", 1)[0]] += 1
        others_missing += any(name != SLOWED for name in missing)
        partial += bool(record.prediction["partial"])
        correct += record.prediction["label"] == known.truth[record.image]
        if set(missing) <= {SLOWED}:
            expected = known.without_slowed if missing else known.full
            mismatches += record.prediction["label"] != expected[record.image]
        else:
            unchecked += 1
    slow = [r for r in answered if r.image in known.slow]
    slow_latency = [r.latency_s for r in records if r.latency_s is not None and r.image in known.slow]
    other_latency = [r.latency_s for r in records if r.latency_s is not None and r.image not in known.slow]
    count = len(answered)
    return {
        "sent": len(records),
        "answered": count,
        "quorum_503": sum(r.outcome == QUORUM for r in records),
        "lost": sum(r.outcome == LOST for r in records),
        "p50_ms": round(p50, 2),
        "p90_ms": round(p90, 2),
        "p99_ms": round(p99, 2),
        "latency_samples": len(timed),
        "accuracy": round(correct / count, 4) if count else float("nan"),
        "slowed_missing_share": round(sum(reasons.values()) / count, 4) if count else float("nan"),
        "slowed_missing_by_reason": dict(sorted(reasons.items())),
        "slowed_missing_share_on_slow_images": (
            round(sum(SLOWED in (r.prediction or {}).get("missing", {}) for r in slow) / len(slow), 4)
            if slow
            else float("nan")
        ),
        "others_missing": others_missing,
        "partial_share": round(partial / count, 4) if count else float("nan"),
        "label_mismatches": mismatches,
        "labels_unchecked": unchecked,
        "slow_images_p50_ms": round(percentiles_ms(slow_latency)[0], 2),
        "other_images_p50_ms": round(percentiles_ms(other_latency)[0], 2),
        "first_lost": next((r.error for r in records if r.outcome == LOST), ""),
    }


def interval(values: Sequence[float]) -> dict[str, Any]:
    """The median of per-round values with its 95% bootstrap interval (bench/intervals.py), without a verdict."""
    found = ratio_interval(values, 1.0)
    return {
        "median": found["ratio"],
        "ci_low": found["ci_low"],
        "ci_high": found["ci_high"],
        "rounds": found["rounds"],
    }


def p99_verdict(p99: Mapping[str, float], lost: int, limit_ms: float) -> str:
    """`met` when the whole p99 interval is at or under `limit_ms` and nothing was lost; `missed` when anything was
    lost or the whole interval is above; otherwise `inconclusive`."""
    if lost:
        return "missed: lost requests"
    if p99["ci_high"] <= limit_ms:
        return "met"
    if p99["ci_low"] > limit_ms:
        return "missed"
    return "inconclusive"


def summarize(rounds: Mapping[str, Sequence[Mapping[str, Any]]], pooled: Mapping[str, Sequence[float]]) -> dict:
    """One client count: per configuration its totals, p50/p99 intervals over rounds, percentiles of every round's
    latencies together (`pooled`, seconds), accuracy and shares; the deadline's p99 and p50 gain and accuracy cost,
    round by round; the verdict."""
    found: dict[str, Any] = {"configs": {}}
    for name, per_round in rounds.items():
        answered = sum(r["answered"] for r in per_round)
        p50, _, p99 = percentiles_ms(pooled[name])
        reasons: Counter[str] = Counter()
        for r in per_round:
            reasons.update(r["slowed_missing_by_reason"])
        weighted = {
            key: round(sum(r[key] * r["answered"] for r in per_round) / answered, 4) if answered else float("nan")
            for key in ("accuracy", "slowed_missing_share", "partial_share")
        }
        found["configs"][name] = {
            **{key: sum(r[key] for r in per_round) for key in ("sent", "answered", "quorum_503", "lost")},
            "p50_ms": interval([r["p50_ms"] for r in per_round]),
            "p99_ms": interval([r["p99_ms"] for r in per_round]),
            "pooled_p50_ms": round(p50, 2),
            "pooled_p99_ms": round(p99, 2),
            "latency_samples": len(pooled[name]),
            "images_per_s": round(statistics.median(r["images_per_s"] for r in per_round), 1),
            **weighted,
            "slowed_missing_by_reason": dict(sorted(reasons.items())),
            "others_missing": sum(r["others_missing"] for r in per_round),
            "label_mismatches": sum(r["label_mismatches"] for r in per_round),
            "slow_images_p50_ms": round(statistics.median(r["slow_images_p50_ms"] for r in per_round), 2),
            "other_images_p50_ms": round(statistics.median(r["other_images_p50_ms"] for r in per_round), 2),
            "first_lost": next((r["first_lost"] for r in per_round if r["first_lost"]), ""),
        }
    without, with_deadline = rounds[NO_DEADLINE], rounds[WITH_DEADLINE]
    pairs = list(zip(without, with_deadline, strict=True))
    found["p99_no_deadline_over_deadline"] = ratio_interval([a["p99_ms"] / b["p99_ms"] for a, b in pairs], 1.0)
    found["p50_no_deadline_over_deadline"] = ratio_interval([a["p50_ms"] / b["p50_ms"] for a, b in pairs], 1.0)
    found["accuracy_cost_points"] = interval([round(100 * (a["accuracy"] - b["accuracy"]), 2) for a, b in pairs])
    deadline = found["configs"][WITH_DEADLINE]
    found["verdict"] = p99_verdict(deadline["p99_ms"], deadline["lost"], LIMIT_MS)
    return found


def run_clients(
    senders: Mapping[str, Send],
    collectors: Mapping[str, Collector],
    known: Reference,
    clients: int,
    rounds: int,
    count: int,
) -> dict[str, Any]:
    """Alternating rounds at `clients`: every image once per configuration per round, in the round's order."""
    ignore = lambda indices, answers: 0  # noqa: E731  The answers are judged from the records.
    for name, send in senders.items():  # Warm both (lanes, caches) at this load; nothing of it is kept.
        run_load(send, [[i] for i in range(WARM_REQUESTS)], ignore, clients=clients, deadline_s=120)
        time.sleep(SETTLE_S)
        collectors[name].take()
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in senders}
    pooled: dict[str, list[float]] = {name: [] for name in senders}
    for r in range(rounds):
        order = random.Random(r).sample(range(count), count)
        for name in rotated(list(senders), r):
            time.sleep(SETTLE_S)
            point = run_load(senders[name], [[i] for i in order], ignore, clients=clients, deadline_s=600)
            records = collectors[name].take()
            summary = round_summary(records, known)
            summary["images_per_s"] = round(summary["answered"] / point.wall_s, 1) if point.wall_s else 0.0
            summary["client_cpu_share"] = round(point.client_cpu_s / max(point.wall_s, 1e-9) / CORES, 3)
            per_round[name].append(summary)
            pooled[name] += [rec.latency_s for rec in records if rec.latency_s is not None]
            print(
                f"c{clients} round {r + 1} {name}: p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms, "
                f"answered {summary['answered']}/{summary['sent']}, 503 {summary['quorum_503']}, "
                f"lost {summary['lost']}, accuracy {summary['accuracy']:.3f}, "
                f"{SLOWED} missing {summary['slowed_missing_share']:.1%}",
                flush=True,
            )
    summary = summarize(per_round, pooled)
    return {**summary, "rounds": per_round}


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: per client count and configuration, the counts, latencies, accuracy and shares."""
    lines = [
        f"| clients | configuration | sent | answered | 503 QuorumNotMet | lost | p50 ms [95% CI] | p99 ms [95% CI] | "
        f"images/s | accuracy | {SLOWED} missing | partial | verdict (p99 <= {LIMIT_MS} ms, 0 lost) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for clients, found in results.items():
        for name, row in found["configs"].items():
            p50, p99 = row["p50_ms"], row["p99_ms"]
            lines.append(
                f"| {clients} | {name} | {row['sent']} | {row['answered']} | {row['quorum_503']} | {row['lost']} | "
                f"{p50['median']:.1f} [{p50['ci_low']:.1f}-{p50['ci_high']:.1f}] | "
                f"{p99['median']:.1f} [{p99['ci_low']:.1f}-{p99['ci_high']:.1f}] | {row['images_per_s']:.1f} | "
                f"{row['accuracy']:.3f} | {row['slowed_missing_share']:.1%} | {row['partial_share']:.1%} | "
                f"{found['verdict'] if name == WITH_DEADLINE else ''} |"
            )
    return "\n".join(lines)


def context(argv: Sequence[str], mode: str) -> dict[str, Any]:
    """The command, commit, machine and versions a results file came from (read-only git calls)."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *a], capture_output=True, text=True, check=False
        ).stdout.strip()

    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "")
    return {
        "command": "python -m bench.deadline " + shlex.join(argv),
        "mode": mode,
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"cpu": model or platform.processor(), "cores": CORES, "python": platform.python_version()},
        "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision", "torchserve", "onnxruntime", "scipy")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 images, 2 rounds (default: 256 images, 10 rounds)")
    parser.add_argument("--rounds", type=int, help="rounds per client count")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    count, rounds = MODES[mode]
    rounds = args.rounds or rounds
    began = time.perf_counter()
    workload = demo(count, SEED)
    known = reference(workload.spec, workload.images, SEED)
    print(f"{len(known.slow)} of {count} images slowed by {SLOW_SECONDS * 1000:.0f} ms in {SLOWED}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-deadline-") as folder:
        spec = slowed_spec(workload.spec, Path(folder) / "code", known.digests)
        store = Path(folder) / "model_store"
        build_archive(spec, store)
        server = private_server(Path(folder) / "server", store, port_offset=PORT_OFFSET)
        try:
            start(server, store)
            register(server, spec.name, spec.batching.workers)
            url = f"{server.inference}/predictions/{spec.name}"
            collectors = {name: Collector() for name in CONFIGS}
            senders = {
                name: sender(url, {**server.headers("inference"), **extra}, workload.images, collectors[name])
                for name, extra in CONFIGS.items()
            }
            for clients in CLIENTS:
                results[str(clients)] = run_clients(senders, collectors, known, clients, rounds, count)
        finally:
            stop(server)
    report = {
        **context(sys.argv[1:], mode),
        "seconds": round(time.perf_counter() - began, 1),
        "setup": {
            "ensemble": "shapes",
            "slowed_member": SLOWED,
            "slowed_by_ms": SLOW_SECONDS * 1000,
            "slowed_images": len(known.slow),
            "images": count,
            "held_out_seed": SEED,
            "rounds": rounds,
            "batching": {
                "workers": spec.batching.workers,
                "batch_size": spec.batching.batch_size,
                "max_batch_delay_ms": spec.batching.max_batch_delay_ms,
            },
            "plans": {m.name: spec.member_execution(m).plan for m in spec.members},
            "required": {m.name: m.required for m in spec.members},
            "configs": CONFIGS,
            "in_process_accuracy": {
                "every member": round(sum(a == b for a, b in zip(known.full, known.truth, strict=True)) / count, 4),
                f"without {SLOWED}": round(
                    sum(a == b for a, b in zip(known.without_slowed, known.truth, strict=True)) / count, 4
                ),
            },
        },
        "target": f"p99 with deadline_ms={DEADLINE_MS} <= {LIMIT_MS} ms (whole 95% interval) and 0 lost requests",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    for load, found in results.items():
        cost, gain = found["accuracy_cost_points"], found["p99_no_deadline_over_deadline"]
        print(
            f"c{load}: verdict {found['verdict']}; p99 no deadline / deadline {gain['ratio']:.2f}x "
            f"[{gain['ci_low']:.2f}-{gain['ci_high']:.2f}]; accuracy cost {cost['median']:+.2f} points "
            f"[{cost['ci_low']:+.2f}-{cost['ci_high']:+.2f}]"
        )
    print(f"wrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
