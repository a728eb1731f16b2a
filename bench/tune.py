"""Choose an ensemble's workers, batch size and batch delay by measuring them: `make tune NAME=<ensemble>`.

Usage: python -m bench.tune NAME [--quick] [--write] [--ensembles ensembles.yaml]   (after `make demo`)

In the spirit of Triton's Model Analyzer: measure what the members cost, derive a few candidate
configurations from that cost, serve each one from a real TorchServe and keep the best by a fixed rule.

1. Member cost, in this process, the way a worker runs them (one intra-op thread, members side by side
   on member threads): milliseconds for all members on one image and per image at batch 8, both on
   `cores` member threads (one worker) and on one (each of `cores` workers); and the handler's own
   per-request work (parse, decode, render, JSON). TorchServe's round trip (`transport_ms`) is measured
   on the server: the median of requests it refuses at once (a truncated PNG), HTTP and worker protocol
   with no model.
2. Sweep. A private TorchServe on 127.0.0.1 (shifted ports, its own folder). Each candidate is built as
   its own archive with its `batching` replaced, registered, warmed, driven at the benchmark's load points
   (`bench.points.POINTS`: 1 client x 1 image, 8 clients x 1 image, 2 clients x 16 images) with
   `bench.loadgen.run_load`, and unregistered. Every answer is checked against each member's label
   computed in-process. The first candidate is the reference (1 worker, batch 1): its c1 p50 sizes the
   delays of the grid. The current batching is measured once more at the end: how far its two geometric
   means lie apart is this run's noise. Each point sends at least the benchmark's number of requests
   (`--quick`: its quick number), more where the member cost says that would take under 5 s (`--quick`: 2 s),
   at most 10x.
3. Candidate grid (`candidate_grid`), `cores` = this machine's CPUs, `clients` = most clients of a load point:
   - workers 1, and `cores` unless the cost model says `cores` workers cannot serve single images faster:
     at saturation one worker spends `overhead + per_image(cores threads)` ms per image on one Python
     thread, while each of `cores` workers spends `overhead + per_image(1 thread)` but `cores` run at once;
     `cores` workers are swept when `cores / (overhead + per_image_1) >= 1 / (overhead + per_image_cores)`;
   - per worker count W: batch size 1 (no delay; TorchServe does not wait at batch 1), and batch size
     `max(2, clients // W)` (the most requests one worker can find queued) with each max batch delay of
     (1, 2, 5) ms that is at most SLACK x the reference's c1 p50, the smallest always kept. A delay costs
     up to its full length to a lone request, so a longer one could not pass the latency bound below.
     A delay of 0 is never swept: TorchServe then holds a lone request about 100 ms;
   - the ensemble's current `batching` from ensembles.yaml, always, to compare against.
4. Pick (`pick`):
   - disqualified: any error or mismatched label at any point, fewer answers than requests sent (the
     5-minute deadline of a point), or a failed build or registration;
   - eligible: c1 p50 at most (1 + SLACK) x the lowest c1 p50 among the qualified candidates, SLACK = 0.5;
   - best: the eligible candidate with the highest geometric mean of images/s over the load points;
     ties by lower c1 p50, then fewer workers, smaller batch, shorter delay;
   - recommended: the best, unless the current batching is eligible and the best's geometric mean is
     less than max(MIN_GAIN = 10%, the run's noise) above the current's: then the current is kept.
   Why: the geometric mean weighs each load point by its ratio, so a 2x gain on one point cannot hide a
   2x loss on another (a 16-image request on two workers halved the torchvision trio's throughput), and
   no point's absolute scale dominates. Throughput at c1 is already 1 / latency, but one third of a
   geometric mean lets a configuration trade a lone client's latency away; the explicit bound stops that
   at half as long again as the fastest. Not tighter: the lowest c1 p50 is nearly always the unbatched
   single worker's (no batch wait, every member thread on one image), every batched candidate pays its
   delay and TorchServe's batch assembly on top, and the lowest of several noisy measurements is itself
   biased low. With tiny members (c1 about 10 ms) the 25% first tried left only that unbatched worker
   eligible, the shipped default (1 worker, batch 8, 2 ms) excluded, and recommended half the default's
   throughput at 8 clients. The 10% margin for replacing the current batching is the run-to-run spread
   of this 2-core machine (about +-10%), or the spread this run measured when larger: within it, two
   runs can order the top candidates either way, and a recommendation should not flip the file back
   and forth.

Prints a markdown table of every candidate and the recommendation; writes bench/results/tune-<NAME>.json
(all rows, the member cost, the rule, the recommendation). With --write, sets the ensemble's
`batching: workers / batch_size / max_batch_delay_ms` in the ensembles file with ruamel.yaml round-trip
editing: every other line stays as it was (checked, or nothing is written) and the result must load.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import requests
import torch
from PIL import Image

from archive_scripts.build_archives import build_archive
from archive_scripts.demo_data import make_split
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop, unregister
from bench.contenders import ensemble_sender, members_view
from bench.loadgen import requests_for, run_load
from bench.points import POINTS, Point
from bench.workloads import Workload
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec, InputSpec
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image

SLACK = 0.5
MIN_GAIN = 0.10
DELAYS_MS = (1, 2, 5)
MIN_POINT_S = {False: 5.0, True: 2.0}  # by --quick
MAX_COUNT_FACTOR = 10
POINT_DEADLINE_S = 300
PORT_OFFSET = 22100
IMAGES = 64
IMAGE_SEED = 4242
TUNED_KEYS = ("workers", "batch_size", "max_batch_delay_ms")
RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True, order=True)
class Candidate:
    workers: int
    batch_size: int
    max_batch_delay_ms: int

    @property
    def label(self) -> str:
        return f"w{self.workers}-b{self.batch_size}-d{self.max_batch_delay_ms}"


REFERENCE = Candidate(1, 1, 0)


@dataclass(frozen=True)
class MemberCost:
    """What serving one ensemble costs, in milliseconds, measured in-process (and `transport_ms` on a server)."""

    cores: int
    members_ms_b1: float  # all members, one image, `cores` member threads: one worker's lone request
    members_ms_b1_one_thread: float  # the same on one member thread: each of `cores` workers
    per_image_ms_b8: float  # all members, per image at batch 8, `cores` member threads
    per_image_ms_b8_one_thread: float
    request_ms: float  # the handler's own work per request: parse, decode, render, JSON
    transport_ms: float = 0.0  # TorchServe's round trip for a request refused at once

    @property
    def overhead_ms(self) -> float:
        """Per-request work outside the members, on the worker's one Python thread or in TorchServe."""
        return self.request_ms + self.transport_ms

    def single_request_ms(self, workers: int) -> float:
        """A lone one-image request's latency, estimated."""
        members = self.members_ms_b1 if workers == 1 else self.members_ms_b1_one_thread
        return self.overhead_ms + members

    def saturated_images_per_s(self, workers: int) -> float:
        """Single images at saturation: `workers` processes, each paying overhead + members per image."""
        per_image = self.per_image_ms_b8 if workers == 1 else self.per_image_ms_b8_one_thread
        return workers * 1000.0 / (self.overhead_ms + per_image)

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "overhead_ms": self.overhead_ms}


@dataclass(frozen=True)
class Grid:
    candidates: tuple[Candidate, ...]
    notes: tuple[str, ...]  # why each worker count and delay is in or out


def candidate_grid(cost: MemberCost, clients: int, c1_ms: float | None = None) -> Grid:
    """The candidates the rule sweeps for this cost; `c1_ms` is the reference's measured c1 p50 (else estimated)."""
    notes = []
    workers = [1]
    if cost.cores > 1:
        one, many = cost.saturated_images_per_s(1), cost.saturated_images_per_s(cost.cores)
        verdict = "swept" if many >= one else "not swept"
        notes.append(
            f"{cost.cores} workers {verdict}: estimated {many:.0f} against {one:.0f} images/s "
            "for single images at saturation"
        )
        if many >= one:
            workers.append(cost.cores)
    latency = c1_ms if c1_ms is not None else cost.single_request_ms(1)
    allowed = [d for d in DELAYS_MS if d <= SLACK * latency] or [DELAYS_MS[0]]
    notes.append(
        f"delays {', '.join(map(str, allowed))} ms: at most {SLACK:.0%} of c1 {latency:.1f} ms"
        f" ({'measured' if c1_ms is not None else 'estimated'}), the shortest always"
    )
    candidates = []
    for w in workers:
        candidates.append(Candidate(w, 1, 0))
        candidates.extend(Candidate(w, max(2, clients // w), d) for d in allowed)
    return Grid(tuple(candidates), tuple(notes))


@dataclass(frozen=True)
class Row:
    """One candidate's measurement: per load point a bench.loadgen.LoadPoint as JSON, and the requests sent."""

    candidate: Candidate
    points: Mapping[str, Mapping[str, float]]
    sent: Mapping[str, int]
    failure: str | None = None

    def problem(self) -> str | None:
        """Why this row is disqualified, or None."""
        if self.failure:
            return self.failure
        for name, sent in self.sent.items():
            point = self.points.get(name)
            if point is None:
                return f"{name} not measured"
            if point["errors"] or point["mismatches"]:
                return f"{name}: {point['errors']} errors, {point['mismatches']} mismatches"
            if point["requests"] < sent:
                return f"{name}: {point['requests']} of {sent} requests answered"
        return None

    def geomean(self) -> float:
        """Geometric mean of images/s over the measured points (0 if any point served nothing)."""
        rates = [p["images_per_s"] for p in self.points.values()]
        return math.exp(statistics.fmean(math.log(r) for r in rates)) if rates and min(rates) > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.candidate), "points": dict(self.points), "sent": dict(self.sent), "failure": self.failure}


@dataclass(frozen=True)
class Pick:
    recommended: Row | None
    best_c1_ms: float | None
    verdicts: Mapping[Candidate, str]
    margin: float  # the gain over the current batching that replaces it


def pick(
    rows: Sequence[Row],
    c1: str,
    current: Candidate | None = None,
    *,
    noise: float = 0.0,
    slack: float = SLACK,
    min_gain: float = MIN_GAIN,
) -> Pick:
    """The recommendation by the rule in the module docstring; `c1` names the single-client load point.

    `current` (the ensemble's batching now) is kept when it is eligible and the best beats its
    geometric mean by less than max(`min_gain`, `noise`), `noise` being the run's measured spread.
    """
    verdicts: dict[Candidate, str] = {}
    qualified = []
    for row in rows:
        problem = row.problem()
        if problem:
            verdicts[row.candidate] = f"disqualified: {problem}"
        else:
            qualified.append(row)
    margin = max(min_gain, noise)
    if not qualified:
        return Pick(None, None, verdicts, margin)
    best_c1 = min(row.points[c1]["p50_ms"] for row in qualified)
    bound = (1 + slack) * best_c1
    eligible = []
    for row in qualified:
        if row.points[c1]["p50_ms"] > bound:
            verdicts[row.candidate] = f"c1 p50 {row.points[c1]['p50_ms']:.1f} > {bound:.1f} ms"
        else:
            eligible.append(row)
    best = min(eligible, key=lambda r: (-r.geomean(), r.points[c1]["p50_ms"], r.candidate))
    chosen = best
    kept = next((r for r in eligible if r.candidate == current), None)
    if kept is not None and best.geomean() < (1 + margin) * kept.geomean():
        chosen = kept
    for row in eligible:
        ratio = row.geomean() / chosen.geomean()
        if row is chosen:
            verdicts[row.candidate] = "**recommended**"
        elif row is best:
            verdicts[row.candidate] = f"best, {ratio:.2f}x: under the {1 + margin:.2f}x that replaces the current"
        else:
            verdicts[row.candidate] = f"eligible, {ratio:.2f}x"
    return Pick(chosen, best_c1, verdicts, margin)


def c1_point(points: Sequence[Point] = POINTS) -> str:
    return next(p.name for p in points if p.clients == 1 and p.images == 1)


def markdown(rows: Sequence[Row], result: Pick, current: Candidate, repeat: Row | None = None) -> str:
    names = [p.name for p in POINTS]
    baseline = next((r for r in rows if r.candidate == current and not r.problem()), None)
    head = "| workers | batch | delay | " + " | ".join(f"{n} images/s | {n} p50 ms" for n in names)
    head += " | geomean images/s | vs current | errors, mismatches | verdict |"
    lines = [head, "|" + "---:|" * (3 + 2 * len(names) + 3) + "---|"]
    for row in [*rows, *([repeat] if repeat else [])]:
        c = row.candidate
        cells = [str(c.workers), str(c.batch_size), f"{c.max_batch_delay_ms} ms"]
        for n in names:
            p = row.points.get(n)
            cells += [f"{p['images_per_s']:.1f}", f"{p['p50_ms']:.1f}"] if p else ["", ""]
        done = len(row.points) == len(names)
        cells.append(f"{row.geomean():.1f}" if done else "")
        cells.append(f"{row.geomean() / baseline.geomean():.2f}x" if done and baseline and baseline.geomean() else "")
        cells.append(
            f"{sum(p['errors'] for p in row.points.values())}, {sum(p['mismatches'] for p in row.points.values())}"
        )
        if row is repeat:
            cells.append(
                "current, measured again"
                + (
                    f": {row.geomean() / baseline.geomean():.2f}x the first"
                    if done and baseline and baseline.geomean()
                    else ""
                )
            )
        else:
            cells.append(result.verdicts.get(c, "") + (" (current)" if c == current else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- measuring ------------------------------------------------------------------------------------


def tune_workload(name: str, config: Path) -> Workload:
    """Ensemble `name` of `config`, demo images at its largest input size (PNG), each member's label per image.

    The labels come from the members as given (eager, one image at a time); the served plans are verified
    against eager at load, so any label that differs is a mismatch that disqualifies the candidate.
    """
    spec = load_ensembles(config)[name]
    if not isinstance(spec.input, InputSpec):
        raise SystemExit(f"{name}: tune sends images; this ensemble takes tensors")
    # The members of an image ensemble take images (the config refuses a tensor input there).
    member_inputs = [i for i in map(spec.member_input, spec.members) if isinstance(i, InputSpec)]
    sizes = [i.size for i in member_inputs] + [spec.input.size]
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = []
    for sample in make_split(IMAGES, IMAGE_SEED):
        image = (
            sample.image
            if sample.image.size == (width, height)
            else sample.image.resize((width, height), Image.Resampling.BILINEAR)
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    reference = Ensemble.from_spec(spec.with_plan("eager"), torch.device("cpu"))  # members as given, as bench.workloads
    expected = tuple(
        members_view(reference.render(reference.probabilities([decode_image(data, spec.limits)]), spec.policy))[0]
        for data in images
    )
    return Workload(name=name, config=config.resolve(), spec=spec, images=tuple(images), expected=expected)


def _median_ms(fn: Callable[[], object], repeats: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return 1000 * statistics.median(times)


def member_cost(workload: Workload, cores: int) -> MemberCost:
    """Time the members and the handler's per-request work in-process, one intra-op thread as in a worker.

    The members run on the plans their `execution` keys give (`auto` chooses by measurement, as a worker does).
    """
    torch.set_num_threads(1)
    spec = workload.spec
    decoded = [decode_image(data, spec.limits) for data in workload.images[:8]]
    timings = {}
    for threads in sorted({cores, 1}, reverse=True):
        ensemble = Ensemble.from_spec(spec, torch.device("cpu"), parallelism=threads)
        timings[threads] = (
            _median_ms(partial(ensemble.probabilities, decoded[:1]), 25),
            _median_ms(partial(ensemble.probabilities, decoded), 8) / len(decoded),
        )
        if threads == cores:
            probs = ensemble.probabilities(decoded[:1])

            def one_request(ensemble: Ensemble = ensemble, probs: torch.Tensor = probs) -> None:
                prepared = ensemble.prepare({"body": workload.images[0]}, {})
                json.dumps(ensemble.render(probs, prepared.policy))

            request_ms = _median_ms(one_request, 25)
    return MemberCost(
        cores=cores,
        members_ms_b1=timings[cores][0],
        members_ms_b1_one_thread=timings[1][0],
        per_image_ms_b8=timings[cores][1],
        per_image_ms_b8_one_thread=timings[1][1],
        request_ms=request_ms,
    )


def transport_ms(server: Server, name: str, count: int = 60) -> float:
    """Median round trip of a request TorchServe's worker refuses at once: HTTP and the worker protocol, no model."""
    session = requests.Session()
    headers = {**server.headers("inference"), "Content-Type": "image/png"}
    url = f"{server.inference}/predictions/{name}"
    times = []
    for _ in range(count):
        begin = time.perf_counter()
        response = session.post(url, data=b"\x89PNG", headers=headers, timeout=30)
        times.append(time.perf_counter() - begin)
        if response.status_code < 400:
            raise RuntimeError(f"a truncated PNG was answered {response.status_code}")
    return 1000 * statistics.median(times[5:])


def request_counts(cost: MemberCost, quick: bool, max_images: int) -> dict[str, tuple[int, int]]:
    """Per load point (requests, images per request): the benchmark's count.

    Raised to last MIN_POINT_S by the estimate.
    """
    counts = {}
    fastest = max(cost.saturated_images_per_s(w) for w in {1, cost.cores})
    for point in POINTS:
        images = min(point.images, max_images)
        base = point.quick_requests if quick else point.requests
        rate = 1000.0 / cost.single_request_ms(1) if point.clients == 1 else fastest / images
        counts[point.name] = (min(max(base, math.ceil(MIN_POINT_S[quick] * rate)), MAX_COUNT_FACTOR * base), images)
    return counts


class CandidateFailed(Exception):
    """A candidate that could not be built or registered: a disqualified row, not the end of the sweep."""


@contextmanager
def registered(server: Server, store: Path, spec: EnsembleSpec, candidate: Candidate) -> Iterator[str]:
    """Build `spec` with the candidate's batching as its own archive, register it, yield its name, unregister it."""
    name = f"{spec.name}-tune-{candidate.label}"
    batching = replace(
        spec.batching,
        workers=candidate.workers,
        batch_size=candidate.batch_size,
        max_batch_delay_ms=candidate.max_batch_delay_ms,
    )
    try:
        build_archive(replace(spec, name=name, batching=batching), store)
        register(server, name, candidate.workers)
    except (Exception, SystemExit) as e:  # register() raises SystemExit with TorchServe's message.
        (store / f"{name}.mar").unlink(missing_ok=True)
        raise CandidateFailed(f"build or register failed: {e}") from e
    try:
        yield name
    finally:
        unregister(server, name)
        (store / f"{name}.mar").unlink(missing_ok=True)


def drive(
    server: Server, name: str, workload: Workload, counts: Mapping[str, tuple[int, int]], label: str
) -> dict[str, dict]:
    """Warm, then drive every load point; each point's bench.loadgen.LoadPoint as JSON."""
    send = ensemble_sender(server, name, workload.images)
    points = {}
    for point in POINTS:
        count, images = counts[point.name]
        batches = requests_for(count, images, len(workload.images))
        run_load(send, batches[: 2 * point.clients], workload.expected, clients=point.clients, deadline_s=60)
        measured = run_load(send, batches, workload.expected, clients=point.clients, deadline_s=POINT_DEADLINE_S)
        points[point.name] = measured.to_json()
        print(
            f"  {label} / {point.name}: {measured.images_per_s:.1f} images/s, p50 {measured.p50_ms:.1f} ms", flush=True
        )
    return points


@dataclass(frozen=True)
class Sweep:
    rows: list[Row]
    repeat: Row | None  # the current batching measured again at the end, for the run's noise
    grid: Grid
    cost: MemberCost
    counts: dict[str, tuple[int, int]]


def sweep(workload: Workload, cost: MemberCost, current: Candidate, quick: bool) -> Sweep:
    """The reference first (it measures transport and sizes the delays), the grid and the current batching.

    Then the current again.
    """
    clients = max(p.clients for p in POINTS)
    max_images = workload.spec.limits.max_images_per_request
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tune-") as folder:
        store = Path(folder) / "model_store"
        store.mkdir()
        server = private_server(Path(folder) / "server", store, port_offset=PORT_OFFSET)

        def measure(candidate: Candidate, label: str) -> Row:
            try:
                with registered(server, store, workload.spec, candidate) as name:
                    return Row(candidate, drive(server, name, workload, counts, label), _sent(counts))
            except CandidateFailed as e:
                return Row(candidate, {}, _sent(counts), failure=str(e))

        try:
            start(server, store)
            counts = request_counts(cost, quick, max_images)
            try:
                with registered(server, store, workload.spec, REFERENCE) as name:
                    cost = replace(cost, transport_ms=transport_ms(server, name))
                    counts = request_counts(cost, quick, max_images)
                    print(f"  transport {cost.transport_ms:.2f} ms; requests per point {counts}", flush=True)
                    rows.append(Row(REFERENCE, drive(server, name, workload, counts, REFERENCE.label), _sent(counts)))
            except CandidateFailed as e:
                rows.append(Row(REFERENCE, {}, _sent(counts), failure=str(e)))
            c1_ms = None if rows[0].problem() else rows[0].points[c1_point()]["p50_ms"]
            grid = candidate_grid(cost, clients, c1_ms)
            todo = [c for c in dict.fromkeys([*grid.candidates, current]) if c != REFERENCE]
            print(
                "  grid: " + "; ".join(grid.notes) + f"; {len(todo) + 1} candidates, then the current again", flush=True
            )
            rows.extend(measure(candidate, candidate.label) for candidate in todo)
            first = next(r for r in rows if r.candidate == current)
            repeat = None if first.problem() else measure(current, f"{current.label} again")
        finally:
            stop(server)
    return Sweep(rows, repeat, grid, cost, counts)


def noise(first: Row, again: Row | None) -> float:
    """How far apart two measurements of one configuration are: larger geometric mean / smaller - 1.

    0 if either failed.
    """
    if again is None or first.problem() or again.problem() or not first.geomean() or not again.geomean():
        return 0.0
    return max(first.geomean(), again.geomean()) / min(first.geomean(), again.geomean()) - 1


def _sent(counts: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    return {name: count for name, (count, _) in counts.items()}


# --- writing ensembles.yaml -----------------------------------------------------------------------

_BATCHING_LINE = re.compile(r"^\s*(batching|workers|batch_size|max_batch_delay_ms)\s*:")


def update_batching(text: str, name: str, values: Mapping[str, int]) -> str:
    """`text` (an ensembles.yaml) with ensemble `name`'s batching keys set to `values`, every other line as it was.

    Round-trip editing with ruamel.yaml keeps comments, quoting, flow style and key order; the
    indentation is read from the file. Raises ValueError if anything but batching lines would change.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.util import load_yaml_guess_indent

    _, sequence_indent, offset = load_yaml_guess_indent(text)  # ruamel's own recipe: mapping indent = offset
    offset = 2 if offset is None else offset
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=offset, sequence=sequence_indent or offset + 2, offset=offset)
    data = yaml.load(text)
    ensembles = data.get("ensembles") if isinstance(data, dict) else None
    if not isinstance(ensembles, dict) or name not in ensembles:
        raise ValueError(f"no ensemble {name!r} under ensembles:")
    entry = ensembles[name]
    if "batching" not in entry:
        keys = list(entry)
        entry.insert(keys.index("members") if "members" in keys else len(keys), "batching", CommentedMap())
    for key in TUNED_KEYS:
        entry["batching"][key] = int(values[key])
    out = io.StringIO()
    yaml.dump(data, out)
    updated = out.getvalue()
    old_lines, new_lines = text.splitlines(), updated.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False).get_opcodes():
        changed = old_lines[i1:i2] + new_lines[j1:j2]
        if tag != "equal" and not all(_BATCHING_LINE.match(line) for line in changed):
            raise ValueError("round-trip editing would change other lines too:\n" + "\n".join(changed))
    return updated


def write_batching(path: Path, name: str, values: Mapping[str, int]) -> str:
    """Update `path` in place (atomically) after checking that the result loads and only `name`'s batching changed.

    Returns a unified diff of the change.
    """
    text = path.read_text()
    updated = update_batching(text, name, values)
    before = load_ensembles(path, check_files=False)
    staged = path.with_name(f".{path.name}.tune-{os.getpid()}")
    try:
        staged.write_text(updated)
        after = load_ensembles(staged, check_files=False)
        expected = dict(before)
        expected[name] = replace(
            before[name],
            # TUNED_KEYS are int fields; mypy checks a ** dict's values against every field (fuse_members: bool too).
            batching=replace(before[name].batching, **{k: int(values[k]) for k in TUNED_KEYS}),  # type: ignore[arg-type]
        )
        if after != expected:
            raise ValueError(f"{path}: the edited file does not load back as only {name}'s batching changed")
        os.chmod(staged, path.stat().st_mode)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return "".join(difflib.unified_diff(text.splitlines(True), updated.splitlines(True), str(path), str(path)))


# --- main -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="ensemble of the ensembles file")
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests per point (2 s or the bench's quick count)"
    )
    parser.add_argument("--write", action="store_true", help="write the recommendation into the ensembles file")
    parser.add_argument("--ensembles", type=Path, default=Path("ensembles.yaml"))
    args = parser.parse_args(argv)
    began = time.perf_counter()
    load_start = os.getloadavg()
    cores = os.cpu_count() or 1
    if load_start[0] >= 1.0:
        print(
            f"load average {load_start[0]:.1f} on {cores} cores before starting: "
            "other work shares the cores, expect noise",
            flush=True,
        )
    workload = tune_workload(args.name, args.ensembles)
    batching = workload.spec.batching
    current = Candidate(batching.workers, batching.batch_size, batching.max_batch_delay_ms)
    cost = member_cost(workload, cores)
    print(
        f"{args.name}: members {cost.members_ms_b1:.2f} ms per image at batch 1 "
        f"({cost.members_ms_b1_one_thread:.2f} on one thread), "
        f"{cost.per_image_ms_b8:.2f} at batch 8 ({cost.per_image_ms_b8_one_thread:.2f}); "
        f"handler {cost.request_ms:.2f} ms per request",
        flush=True,
    )
    swept = sweep(workload, cost, current, args.quick)
    rows, cost, counts = swept.rows, swept.cost, swept.counts
    spread = noise(next(r for r in rows if r.candidate == current), swept.repeat)
    c1 = c1_point()
    result = pick(rows, c1, current, noise=spread)
    table = markdown(rows, result, current, swept.repeat)
    print(table)
    rec = result.recommended
    now = f"workers {current.workers}, batch_size {current.batch_size}, max_batch_delay_ms {current.max_batch_delay_ms}"
    if rec is None:
        print(f"recommended for {args.name}: none, every candidate was disqualified (current: {now})")
    elif rec.candidate == current:
        print(f"recommended for {args.name}: keep the current {now}")
    else:
        c = rec.candidate
        print(
            f"recommended for {args.name}: workers {c.workers}, batch_size {c.batch_size}, "
            f"max_batch_delay_ms {c.max_batch_delay_ms} (current: {now})"
        )
    if spread > MIN_GAIN:
        print(
            f"the current batching measured {spread:.0%} apart at the start and the end of the sweep: "
            "differences under that are noise here; the recommendation had to beat the current by as much "
            "(rerun without --quick, on idle cores)"
        )
    wall = time.perf_counter() - began
    print(f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    report = {
        "ensemble": args.name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "wall_s": round(wall, 1),
        "machine": {
            "cpus": cores,
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_1m": {"start": load_start[0], "end": os.getloadavg()[0]},
        },
        "member_cost": cost.to_json(),
        "rule": {
            "slack": SLACK,
            "delays_ms": list(DELAYS_MS),
            "grid_notes": list(swept.grid.notes),
            "min_gain": MIN_GAIN,
            "noise": spread,
            "margin": result.margin,
            "text": "disqualify any errors, mismatches or unanswered requests; keep c1 p50 <= (1 + slack) x best "
            "qualified c1 p50; best = highest geometric mean of images/s over the load points "
            "(ties: lower c1 p50, fewer workers, smaller batch, shorter delay); recommend the best unless the "
            "current batching is eligible and the best beats its geometric mean by less than "
            "margin = max(min_gain, noise), "
            "noise = the spread of the current batching measured at the start and at the end of the sweep",
        },
        "points": [
            {"name": p.name, "clients": p.clients, "requests": counts[p.name][0], "images": counts[p.name][1]}
            for p in POINTS
        ],
        "current": asdict(current),
        "best_c1_p50_ms": result.best_c1_ms,
        "rows": [
            {
                **row.to_json(),
                "geomean_images_per_s": row.geomean() if len(row.points) == len(POINTS) else None,
                "verdict": result.verdicts.get(row.candidate, ""),
            }
            for row in rows
        ],
        "current_again": swept.repeat.to_json() if swept.repeat else None,
        "recommendation": asdict(rec.candidate) if rec else None,
        "table": table,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"tune-{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {wall:.0f} s")
    if rec is None:
        return 1
    if args.write:
        diff = write_batching(args.ensembles, args.name, asdict(rec.candidate))
        print(diff or f"{args.ensembles}: {args.name} already has this batching")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
