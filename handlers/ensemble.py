"""A loaded ensemble: members on one device, answering a whole TorchServe batch in one pass.

All images (or tensor instances) of all good requests in a batch are flattened, turned into one
tensor per distinct input spec (an image's test-time views are rows of it), run through every member
a request asked for in slices (on the CPU, side by side on the member threads), averaged over each
image's views, then split back per request, combined by each request's policy and rendered. A
request that failed to parse gets its own error reply.

Under `consistency: batch_invariant` every slice is one row, so an image's scores never depend on
what shares its batch: the kernels run at one size whatever the load.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from handlers.errors import EnsembleError, IntegrityError, InvalidPolicy, MemberLoadError, RequestError
from handlers.execution import Group, PlanContext, plan_groups
from handlers.manifest import EnsembleSpec, TensorSpec, read_archive_manifest
from handlers.members import load_member, source_digest, verify_digests
from handlers.open_inference import TOP_OUTPUTS, V2Form, output_names, render_v2, v2_errors, v2_metadata
from handlers.policies import Decision, PolicySpec, Votes, combine, member_votes, policy_names, resolve_policy
from handlers.preprocess import batch_tensors, decode_image
from handlers.request_inputs import int_parameter, parse_request, parse_tensor_request
from handlers.sequences import read_sequence, summarize

SCORE_DIGITS = 6
PLANS_FILE = "execution-plans.json"
PLANS_LOCK = ".execution-plans.lock"
T = TypeVar("T")
R = TypeVar("R")


Inputs = Sequence[Image.Image] | torch.Tensor
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """A request whose images decoded (or tensor instances parsed) and whose policy resolved: ready to run.

    `members` are the positions of the members it asked for (all by default), in declaration order.
    `v2` is set when the request was an Open Inference Protocol v2 body, and is answered as one.
    """

    inputs: tuple[Image.Image, ...] | torch.Tensor
    policy: PolicySpec
    members: tuple[int, ...]
    v2: V2Form | None = None
    top_k: int | None = None
    min_run: int | None = None


@dataclass(frozen=True)
class Reply:
    """What one request gets back: an HTTP status, a JSON body, and how many images or instances it carried.

    For the metrics (`handlers.ensemble_metrics`): an answered request's policy, the members that
    answered, their own votes `[member, image, label]` and the combined choice `[image, label]`; a
    refused one's error type.
    """

    status: int
    body: dict[str, Any]
    images: int = 0
    policy: str | None = None
    members: tuple[str, ...] = ()
    votes: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    error: str | None = None


@dataclass(frozen=True)
class Answer:
    """One request's answer before rendering: the members that answered, their probabilities and own
    votes `[member, image, label]`, the policy and its decision."""

    names: tuple[str, ...]
    probs: torch.Tensor
    own: torch.Tensor
    decision: Decision
    policy: PolicySpec


@dataclass(frozen=True)
class BatchAnswer:
    """The replies to one TorchServe batch, in order, and each member's forward seconds spent on it."""

    replies: list[Reply]
    forward_seconds: dict[str, float]


def pick_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_id or 0)
    return torch.device("cpu")


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may keep busy: its CPU affinity, capped by a cgroup CPU quota.

    In a container `os.cpu_count()` is the node's core count; a Kubernetes CPU limit is a CFS quota,
    and threads beyond it are throttled. A quota of 1.5 cores counts as 1: a thread throttled in
    every period costs more latency than the half core it would add.
    """
    cores = len(os.sched_getaffinity(0))
    quota = _cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, int(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """The CFS quota in cores from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        return int(quota) / int(period) if int(quota) > 0 else None
    except ValueError:
        return None


class Ensemble:
    """Members of one ensemble, loaded and checked, plus the code that answers requests with them."""

    def __init__(
        self,
        spec: EnsembleSpec,
        modules: Sequence[nn.Module],
        device: torch.device,
        build: Mapping[str, Any],
        sources: Mapping[str, Mapping[str, Any]],
        *,
        parallelism: int = 1,
        remembered_plans: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """`parallelism` > 1 runs (member group, micro-batch) tasks on that many threads at once (the caller's included).

        PyTorch releases the GIL inside its kernels, so with one intra-op thread per task the members
        of one batch spread over the cores: a single image's members run side by side, and a large
        batch is cut into one slice per thread. `sources` says which checkpoint each member came from;
        `remembered_plans` are plan choices another worker made (see `execution_plans.choose`).
        """
        self.spec = spec
        self.device = device
        self.build = dict(build)
        self.sources = dict(sources)
        self._pool = ThreadPoolExecutor(parallelism - 1, thread_name_prefix="member") if parallelism > 1 else None
        self._parallelism = parallelism
        self._weights = torch.tensor([member.weight for member in spec.members], dtype=torch.float64)
        self._digests = {member.name: member.sha256 for member in spec.members}
        self._source_digests = {name: source["sha256"] for name, source in self.sources.items()}
        member_inputs = [spec.member_input(member) for member in spec.members]
        plans = PlanContext(
            executions=[spec.member_execution(member) for member in spec.members],
            sizes=[spec.slice_sizes(parallelism, given.views) for given in member_inputs],
            activation=self._activation,
            remembered=remembered_plans or {},
        )
        self._groups = plan_groups(
            spec.members,
            [module.to(device).eval() for module in modules],
            member_inputs,
            fuse=spec.batching.fuse_members,
            device=device,
            plans=plans,
        )
        self._check_outputs()

    @classmethod
    def from_model_dir(cls, model_dir: Path, device: torch.device) -> Ensemble:
        """Load from an extracted archive: every file's digest is verified before anything is loaded.

        On the CPU the members run side by side on this worker's share of the usable cores; on a GPU they
        run one after another, since each kernel already uses the whole device.
        """
        manifest = read_archive_manifest(model_dir)
        spec = manifest.ensemble
        parallelism = spec.batching.threads_per_worker(usable_cores()) if device.type == "cpu" else 1
        for member in spec.members:
            pinned = {member.weights, *([member.arch_file] if member.arch_file else [])}
            unpinned = sorted(pinned - set(manifest.digests))
            if unpinned:
                raise IntegrityError(f"member {member.name!r}: the manifest pins no digest for {unpinned}")
            if manifest.digests[member.weights] != member.sha256:
                raise IntegrityError(f"member {member.name!r}: the manifest gives two digests for {member.weights}")
        verify_digests(model_dir, manifest.digests, owners={member.weights: member.name for member in spec.members})
        modules = [load_member(m, model_dir)[0] for m in spec.members]
        context = {"torch": torch.__version__, "device": device.type, "member_threads": parallelism}
        with _exclusive(model_dir / PLANS_LOCK):
            remembered = _read_plans(model_dir / PLANS_FILE, context)
            ensemble = cls(spec, modules, device, manifest.build, manifest.sources, parallelism=parallelism, remembered_plans=remembered)
            choices = ensemble.plan_choices()
            if any(choice["measured_by"] == "this worker" for choice in choices.values()):
                _write_plans(model_dir / PLANS_FILE, {"context": context, "members": choices})
        return ensemble

    @classmethod
    def from_spec(cls, spec: EnsembleSpec, device: torch.device, *, parallelism: int = 1) -> Ensemble:
        """Load straight from ensembles.yaml paths (evaluation, in-process reference); checks pinned digests."""
        digested = tuple(replace(m, sha256=source_digest(m, spec.base_dir)) for m in spec.members)
        loaded = [load_member(member, spec.base_dir) for member in spec.members]
        modules = [module for module, _ in loaded]
        sources = {
            m.name: {"file": m.weights, "sha256": m.sha256, "state_dict": m.state_dict.to_dict(), **fitted.record()}
            for m, (_, fitted) in zip(digested, loaded, strict=True)
        }
        return cls(replace(spec, members=digested), modules, device, {}, sources, parallelism=parallelism)

    def plan_choices(self) -> dict[str, dict[str, Any]]:
        """Each planned member's execution choice, as `describe` shows it (fused members run eager under vmap)."""
        names = [member.name for member in self.spec.members]
        return {names[group.indices[0]]: group.choice.describe() for group in self._groups if group.choice is not None}

    def prepare(self, row: Mapping[str, Any], headers: Mapping[str, Any]) -> PreparedRequest:
        """Parse, validate and decode one request; raises a RequestError naming what is wrong."""
        limits, outputs = self.spec.limits, self.output_names()
        if isinstance(self.spec.input, TensorSpec):
            tensors = parse_tensor_request(row, headers, limits, self.spec.input, outputs)
            with self._errors_as(tensors.v2):
                return self._prepared(tensors.instances, tensors.policy_params, tensors.v2)
        request = parse_request(row, headers, limits, outputs)
        with self._errors_as(request.v2):
            images = tuple(decode_image(data, limits) for data in request.images)
            return self._prepared(images, request.policy_params, request.v2)

    def _prepared(self, inputs: tuple[Image.Image, ...] | torch.Tensor, params: Mapping[str, str], v2: V2Form | None) -> PreparedRequest:
        """The request's parameters resolved: its members and policy, and the `top_k` and `sequence` parts of its answer."""
        rest = dict(params)
        members = self._members(rest.pop("members", None), v2)
        top_k = self._top_k(rest.pop("top_k", None), v2)
        min_run = read_sequence(rest.pop("sequence", None), rest.pop("min_run", None), self.spec.limits.max_images_per_request)
        if min_run is not None and v2 is not None:
            raise RequestError("sequence is for our JSON answer; read a v2 answer's label outputs frame by frame")
        return PreparedRequest(inputs, self._policy(rest, members), members, v2, top_k, min_run)

    def _members(self, raw: str | None, v2: V2Form | None) -> tuple[int, ...]:
        """The positions of the members a request named in `members=a,b` (all without it), in declaration order."""
        names = [member.name for member in self.spec.members]
        if raw is None:
            return tuple(range(len(names)))
        asked = [name.strip() for name in raw.split(",")]
        valid = ", ".join(names)
        if not all(asked):
            raise RequestError(f"members must be member names separated by commas, like members={names[0]}; valid: {valid}")
        unknown = [name for name in asked if name not in names]
        if unknown:
            raise RequestError(f"unknown member(s) {unknown}; valid members: {valid}")
        twice = sorted({name for name in asked if asked.count(name) > 1})
        if twice:
            raise RequestError(f"member(s) {twice} named twice in members; name each once")
        positions = tuple(sorted(names.index(name) for name in asked))
        left_out = {f"{name}." for i, name in enumerate(names) if i not in positions}
        dropped = [output for output in (v2.outputs or ()) if output.startswith(tuple(left_out))] if v2 is not None else []
        if dropped:
            raise RequestError(f"outputs {dropped} belong to members this request leaves out (members={','.join(asked)})")
        return positions

    def output_names(self) -> list[str]:
        """The v2 output tensors this ensemble answers with (README, "Open Inference Protocol v2")."""
        return output_names(self._labels_key, [member.name for member in self.spec.members], ranked=self.spec.task == "multiclass")

    def probabilities(
        self,
        inputs: Inputs,
        forward_seconds: dict[str, float] | None = None,
        wanted: Sequence[Collection[int]] | None = None,
    ) -> torch.Tensor:
        """probs[member, input, label] as float64 on the CPU; each image is transformed once per input spec.

        `inputs` are decoded images, or for a tensor-input ensemble one tensor [N, *shape]. A member
        with test-time augmentation scores an image by the mean of its probabilities over the views.
        `wanted[i]`, when given, holds the positions of the members input i needs: a member runs only
        on the inputs that need it (fused members run when any of them is needed), and its scores
        for the others are NaN. Given `forward_seconds`, each member's time in its forward calls is
        added to it (fused members share their group's time equally; on CUDA each call is
        synchronized so the time is the kernels').
        """
        count = len(inputs)
        if isinstance(inputs, torch.Tensor):
            batches = {self.spec.input: inputs}
        else:
            batches = batch_tensors(inputs, [group.spec for group in self._groups])
        probs = torch.full((len(self.spec.members), count, len(self.spec.labels)), math.nan, dtype=torch.float64)
        with torch.inference_mode():
            on_device = {spec: self._to_device(batch) for spec, batch in batches.items()}
            jobs, tasks = [], []
            for group in self._groups:
                rows = _rows_needing(group.indices, wanted, count)
                batch = on_device[group.spec]
                if rows is not None:
                    batch = batch.unflatten(0, (count, group.spec.views))[rows.to(batch.device)].flatten(0, 1)
                chunks = batch.split(self.spec.rows_per_call(len(batch), self._parallelism)) if len(batch) else ()
                jobs.append((group, rows, len(chunks)))
                tasks += [(group, chunk) for chunk in chunks]
            results = iter(self._map(self._run, tasks))
            for group, rows, calls in jobs:
                if not calls:
                    continue
                done = [next(results) for _ in range(calls)]
                scores = torch.cat([part for part, _ in done], dim=1).to("cpu", torch.float64)
                views = group.spec.views
                if views > 1:
                    scores = scores.unflatten(1, (-1, views)).mean(dim=2)
                members = torch.tensor(group.indices)
                if rows is None:
                    probs[members] = scores
                else:
                    probs[members[:, None], rows[None, :]] = scores
                if forward_seconds is not None:
                    seconds = sum(spent for _, spent in done) / len(group.indices)
                    for member in group.indices:
                        name = self.spec.members[member].name
                        forward_seconds[name] = forward_seconds.get(name, 0.0) + seconds
            return probs

    def _map(self, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`work` on every item, in order, on the member threads; the calling thread works too.

        Helpers join only when there is more than one item, so a lone task never pays a hand-off.
        The first item (by position) that raised re-raises here, as a loop would have.
        """
        results: list[Any] = [None] * len(items)
        failures: dict[int, BaseException] = {}
        pending = iter(range(len(items)))
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    results[index] = work(items[index])
                except Exception as e:  # Re-raised below in item order, on the calling thread.
                    failures[index] = e

        helpers = min(self._parallelism - 1, len(items) - 1)
        joined = [self._pool.submit(drain) for _ in range(helpers)] if self._pool else []
        drain()
        for helper in joined:
            helper.result()
        if failures:
            raise failures[min(failures)]
        return results

    def _run(self, task: tuple[Group, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """One group on one slice, and its seconds; inference mode is per thread, so each task enters it itself."""
        group, chunk = task
        began = time.perf_counter()
        with torch.inference_mode():
            probs = self._activation(group.run(chunk))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return probs, time.perf_counter() - began

    def answer_batch(self, prepared: Sequence[PreparedRequest | EnsembleError]) -> BatchAnswer:
        """One reply per request, in order; the good requests' inputs run together as one batch."""
        good = [p for p in prepared if isinstance(p, PreparedRequest)]
        everyone = tuple(range(len(self.spec.members)))
        wanted = None
        if any(p.members != everyone for p in good):
            wanted = [set(p.members) for p in good for _ in range(len(p.inputs))]
        forward_seconds = {member.name: 0.0 for member in self.spec.members}
        probs = self.probabilities(self._flatten([p.inputs for p in good]), forward_seconds, wanted) if good else None
        replies, offset = [], 0
        for item in prepared:
            if isinstance(item, EnsembleError):
                replies.append(Reply(item.status, item.to_json(), error=item.kind))
                continue
            assert probs is not None, "a prepared request always carries inputs"
            count = len(item.inputs)
            answer = self._decide(probs[:, offset : offset + count], item.policy, item.members)
            if item.v2 is None:
                body = self._json_body(answer, item.top_k, item.min_run)
            else:
                body = self._v2_body(answer, item.v2, item.top_k)
            reply = Reply(200, body, count, policy=item.policy.name, members=answer.names, votes=answer.own, chosen=answer.decision.chosen)
            replies.append(reply)
            offset += count
        return BatchAnswer(replies, forward_seconds)

    def render(self, probs: torch.Tensor, policy: PolicySpec, *, members: Sequence[str] | None = None, top_k: int | None = None) -> dict[str, Any]:
        """The response body for one request's probabilities (every member's) under `policy`, from `members` (default all).

        `top_k` defaults to the ensemble's, as for a request that does not name it.
        """
        return self._json_body(self._decide(probs, policy, self._positions(members)), top_k or self.spec.top_k)

    def render_v2(self, probs: torch.Tensor, policy: PolicySpec, form: V2Form, *, members: Sequence[str] | None = None) -> dict[str, Any]:
        """The Open Inference Protocol v2 response body for one request: the same answer as tensors."""
        return self._v2_body(self._decide(probs, policy, self._positions(members)), form)

    def _positions(self, members: Sequence[str] | None) -> tuple[int, ...]:
        names = [member.name for member in self.spec.members]
        return tuple(range(len(names))) if members is None else tuple(sorted(names.index(name) for name in members))

    def _json_body(self, answer: Answer, top_k: int | None = None, min_run: int | None = None) -> dict[str, Any]:
        probs, own, decision, names = answer.probs, answer.own, answer.decision, list(answer.names)
        member_views = {name: self._views(own[m], probs[m]) for m, name in enumerate(names)}
        predictions = self._views(decision.chosen, decision.score)
        if top_k is not None:
            self._add_top(predictions, decision, top_k)
            for m, name in enumerate(names):
                self._add_top(member_views[name], Decision(own[m], probs[m]), top_k)
        for i, entry in enumerate(predictions):
            entry["members"] = {name: views[i] for name, views in member_views.items()}
        per_member = {name: [p["members"][name][self._labels_key] for p in predictions] for name in names}
        body = {
            "ensemble": self.spec.name,
            "version": self.spec.version,
            "policy": {"name": answer.policy.name, "params": answer.policy.params()},
            "answered_by": names,
            "predictions": predictions,
            "members": per_member,
            "provenance": {
                "ensemble_version": self.spec.version,
                "built_at": self.build.get("built_at"),
                "member_sha256": {name: self._digests[name] for name in names},
                "member_source_sha256": {name: self._source_digests[name] for name in names},
            },
        }
        if min_run is not None:
            body["sequence"] = summarize(decision.chosen, self.spec.labels, only=self.spec.positive_index, min_run=min_run)
        return body

    def _v2_body(self, answer: Answer, form: V2Form, top_k: int | None = None) -> dict[str, Any]:
        decision, names = answer.decision, answer.names
        parameters: dict[str, Any] = {"policy": answer.policy.name, **answer.policy.params(), "ensemble_version": self.spec.version}
        parameters["members"] = ",".join(names)
        parameters.update({f"{name}.sha256": self._digests[name] for name in names})
        return render_v2(
            name=self.spec.name,
            version=self.spec.version,
            form=form,
            labels=self.spec.labels,
            multilabel=self.spec.task == "multilabel",
            combined=(decision.chosen, decision.score),
            members={name: (answer.own[m], answer.probs[m]) for m, name in enumerate(names)},
            parameters=parameters,
            digits=SCORE_DIGITS,
            top=None if top_k is None else self._top(decision, top_k),
        )

    def describe(self) -> dict[str, Any]:
        """What `GET /models/<name>?customized=true` shows: members, digests, labels and policies."""
        spec = self.spec.to_dict()
        names = [member.name for member in self.spec.members]
        choices = self.plan_choices()
        return {
            "ensemble": self.spec.name,
            "version": self.spec.version,
            "task": self.spec.task,
            "labels": list(self.spec.labels),
            "positive_label": self.spec.positive_label,
            "default_policy": {"name": self.spec.policy.name, "params": self.spec.policy.params()},
            "policies": policy_names(),
            "parameters": self._parameters(),
            "v2_outputs": self.output_names(),
            "v2_metadata": v2_metadata(
                self.output_names(), len(self.spec.labels), self.spec.input if isinstance(self.spec.input, TensorSpec) else None
            ),
            "members": [
                {
                    "name": m.name,
                    "arch": m.arch,
                    "sha256": m.sha256,
                    "source": self.sources[m.name],
                    "weight": m.weight,
                    "input": raw.get("input", spec["input"]),
                    "execution": choices.get(m.name, {"plan": "eager", "fused": True}),
                }
                for m, raw in zip(self.spec.members, spec["members"], strict=True)
            ],
            "input": spec["input"],
            "limits": spec["limits"],
            "batching": spec["batching"],
            "consistency": self.spec.consistency,
            "device": str(self.device),
            "member_threads": self._parallelism,
            "execution": [group.describe(names) for group in self._groups],
            "build": self.build,
        }

    def _parameters(self) -> dict[str, dict[str, Any]]:
        """Every request parameter this ensemble takes, with its values or range and its default.

        Any of them may come as a query parameter (`/models/<name>/invoke`), an `X-Ensemble-*` header
        (`_` as `-`), a multipart field, a gRPC input, or in a JSON body's `parameters` object.
        """
        default = self.spec.policy
        names = [member.name for member in self.spec.members]
        parameters: dict[str, dict[str, Any]] = {
            "policy": {"values": policy_names(), "default": default.name},
            "k": {"range": [1, len(self.spec.members)], "default": default.k, "for": "k_of_n"},
        }
        if self.spec.task != "multiclass":
            parameters["threshold"] = {"range": [0.0, 1.0], "default": default.threshold}
        else:
            parameters["top_k"] = {"range": [1, len(self.spec.labels)], "default": self.spec.top_k}
        parameters["members"] = {"values": names, "default": names, "format": "comma-separated names"}
        parameters["sequence"] = {"values": [True, False], "default": False}
        parameters["min_run"] = {"range": [1, self.spec.limits.max_images_per_request], "default": 1, "for": "sequence=true"}
        return parameters

    def _decide(self, probs: torch.Tensor, policy: PolicySpec, members: tuple[int, ...]) -> Answer:
        """The answer of `members` (positions) from every member's `probs` [member, image, label], for either response form."""
        mine = probs[list(members)]
        votes = Votes(task=self.spec.task, weights=self._weights[list(members)], positive=self.spec.positive_index, policy=policy)
        names = tuple(self.spec.members[m].name for m in members)
        return Answer(names, mine, member_votes(mine, votes), combine(mine, votes), policy)

    @property
    def _labels_key(self) -> str:
        return "labels" if self.spec.task == "multilabel" else "label"

    @staticmethod
    def _errors_as(v2: V2Form | None) -> AbstractContextManager[None]:
        """A v2 request's later errors (an image that does not decode, a bad policy) get v2 error bodies too."""
        return v2_errors() if v2 is not None else nullcontext()

    def _policy(self, params: Mapping[str, str], members: Sequence[int]) -> PolicySpec:
        """The request's policy; `k` counts the members it asked for."""
        try:
            return resolve_policy(params, default=self.spec.policy, task=self.spec.task, n_members=len(members))
        except InvalidPolicy as e:
            if len(members) == len(self.spec.members):
                raise
            asked = ",".join(self.spec.members[m].name for m in members)
            raise InvalidPolicy(f"{e} (k counts the {len(members)} member(s) this request asked for: members={asked})") from e

    def _flatten(self, inputs: Sequence[tuple[Image.Image, ...] | torch.Tensor]) -> Inputs:
        if isinstance(self.spec.input, TensorSpec):
            tensors = [instances for instances in inputs if isinstance(instances, torch.Tensor)]
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return [image for images in inputs for image in images]

    def _add_top(self, views: list[dict[str, Any]], decision: Decision, k: int) -> None:
        """Each view gets `top`: its k best labels in the decision's order, with their scores."""
        picked, best = self._top(decision, k)
        for view, indices, values in zip(views, picked.tolist(), best.tolist(), strict=True):
            view["top"] = [{"label": self.spec.labels[i], "score": round(v, SCORE_DIGITS)} for i, v in zip(indices, values, strict=True)]

    def _top_k(self, raw: str | None, v2: V2Form | None) -> int | None:
        """The `top_k` a request asked for, validated (multiclass only, 1 to the number of labels), else the ensemble's default.

        A v2 answer carries the ranking (`top_labels`, `top_scores`) only when the request names
        top_k or asks for those outputs.
        """
        if raw is None:
            asks = v2 is None or any(output in TOP_OUTPUTS for output in v2.outputs or ())
            return self.spec.top_k if asks else None
        if self.spec.task != "multiclass":
            raise RequestError(f"top_k applies to multiclass ensembles; this one is {self.spec.task}")
        return int_parameter("top_k", raw, len(self.spec.labels))

    @staticmethod
    def _top(decision: Decision, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best label indices per image in the decision's order, and their scores."""
        picked = decision.order()[:, :k]
        return picked, decision.score.gather(-1, picked)

    def _views(self, chosen: torch.Tensor, scores: torch.Tensor) -> list[dict[str, Any]]:
        """Per input, the chosen label(s) and score(s) from `chosen` and `scores` [inputs, labels].

        Tensors become Python lists once per call, not once per input: rendering 128 inputs stays
        well under a millisecond.
        """
        labels = self.spec.labels
        if self.spec.task == "multilabel":
            return [
                {
                    "labels": [label for label, on in zip(labels, row, strict=True) if on],
                    "scores": {label: round(v, SCORE_DIGITS) for label, v in zip(labels, values, strict=True)},
                }
                for row, values in zip(chosen.tolist(), scores.tolist(), strict=True)
            ]
        first = chosen.to(torch.uint8).argmax(dim=-1, keepdim=True)
        picked = scores.gather(-1, first).squeeze(-1).tolist()
        return [
            {"label": labels[index], "score": round(score, SCORE_DIGITS)} if any_chosen else {"label": None, "score": None}
            for any_chosen, index, score in zip(chosen.any(dim=-1).tolist(), first.squeeze(-1).tolist(), picked, strict=True)
        ]

    def _activation(self, logits: torch.Tensor) -> torch.Tensor:
        if self.spec.task == "multilabel":
            return torch.sigmoid(logits.float())
        return torch.softmax(logits.float(), dim=-1)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def _check_outputs(self) -> None:
        """Run one blank image through every member: each must return one score per label."""
        for group in self._groups:
            blank = torch.zeros(1, *group.spec.instance_shape, device=self.device)
            with torch.inference_mode():
                shape = tuple(group.run(blank).shape[1:])
            if shape != (1, len(self.spec.labels)):
                member = self.spec.members[group.indices[0]]
                raise MemberLoadError(
                    f"member {member.name!r}: outputs shape {shape} for one image; "
                    f"expected (1, {len(self.spec.labels)}) for labels {list(self.spec.labels)}"
                )


def _rows_needing(group: Sequence[int], wanted: Sequence[Collection[int]] | None, count: int) -> torch.Tensor | None:
    """The inputs (positions) that need any member of `group`, or None when all of them do."""
    if wanted is None:
        return None
    rows = [i for i, members in enumerate(wanted) if not set(group).isdisjoint(members)]
    return None if len(rows) == count else torch.tensor(rows, dtype=torch.long)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` across processes: a model's workers choose plans one at a time.

    The first worker measures and records; the others wait, then reuse its choices, so every worker
    of a model runs the same plans and gives the same scores for the same image.
    """
    try:
        handle = path.open("a")
    except OSError:
        logger.warning("cannot open %s; workers choose their plans independently", path, exc_info=True)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_plans(path: Path, context: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Plan choices another worker of this model wrote, if made in the same `context`; else none.

    The file is only a hint: every remembered plan is verified against eager again before use.
    """
    try:
        saved = json.loads(path.read_text())
        if saved["context"] == dict(context) and isinstance(saved["members"], dict):
            return saved["members"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}


def _write_plans(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically, so a worker starting meanwhile reads the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)
    except OSError:
        logger.warning("cannot record the execution plans in %s; the next worker measures them again", path, exc_info=True)
