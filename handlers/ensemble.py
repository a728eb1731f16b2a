"""A loaded ensemble: members on one device, answering a whole TorchServe batch in one pass.

The facade over the concern packages. A request is prepared (`inputs.prepare`: decoded, parameters
resolved) or refused with its own error; the good requests' inputs are flattened and run together
(`execution.runner`), then split back per request and each answer is decided by that request's policy
(`answers.decide`) and rendered (`answers.render`). Nothing here depends on TorchServe: `ensemble_handler` adapts it,
and the bench's Triton, Ray and Flask contenders run it in-process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from handlers.answers.decide import Answer, Decider
from handlers.answers.render import Renderer
from handlers.answers.v2 import output_names, v2_metadata
from handlers.config.files import read_archive_manifest
from handlers.config.policy import PolicySpec, policy_names
from handlers.config.specs import EnsembleSpec, TensorSpec
from handlers.errors import EnsembleError, QuorumNotMet
from handlers.execution.cores import usable_cores
from handlers.execution.engines import archived_exports
from handlers.execution.outputs import label_mapping
from handlers.execution.plan_forwards import Exported
from handlers.execution.plan_store import shared_plans
from handlers.execution.runner import Inputs, MemberRunner
from handlers.inputs.prepare import PreparedRequest, RequestPreparer
from handlers.inputs.v2 import V2Form
from handlers.weights.loading import load_archived_members, load_source_members


@dataclass(frozen=True)
class Reply:
    """What one request gets back: an HTTP status, a JSON body, and how many images or instances it carried.

    For the metrics (`handlers.ensemble_metrics`): an answered request's policy, the members that
    answered, their own votes `[member, image, label]`, the combined choice `[image, label]`, which
    members ran on which images `[member, image]` and how many answers were deferred; a refused one's error type.
    """

    status: int
    body: dict[str, Any]
    images: int = 0
    policy: str | None = None
    members: tuple[str, ...] = ()
    votes: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    error: str | None = None
    ran: torch.Tensor | None = None
    deferred: int = 0
    missing: tuple[dict[str, str], ...] = ()  # per image: member name -> reason it is missing (200 and QuorumNotMet)
    partial: int = 0  # how many of the request's images have a partial answer (200 replies only)


@dataclass(frozen=True)
class BatchAnswer:
    """The replies to one TorchServe batch, in order, and each member's forward seconds spent on it; `stuck` names
    the members whose call has run past `stuck_after_s` (the worker should be replaced once these replies are out)."""

    replies: list[Reply]
    forward_seconds: dict[str, float]
    stuck: tuple[str, ...] = ()


def pick_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_id or 0)
    return torch.device("cpu")


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
        exported: Mapping[str, Exported] | None = None,
    ) -> None:
        """`sources` says which checkpoint each member came from; see MemberRunner for the rest."""
        self.spec = spec
        self.device = device
        self.build = dict(build)
        self.sources = dict(sources)
        self.runner = MemberRunner(
            spec, modules, device, parallelism=parallelism, remembered_plans=remembered_plans, exported=exported
        )
        self.decider = Decider(spec)
        self.renderer = Renderer(spec, build, {name: source["sha256"] for name, source in self.sources.items()})
        self.requests = RequestPreparer(spec, self.output_names())

    @classmethod
    def from_model_dir(cls, model_dir: Path, device: torch.device, *, parallelism: int | None = None) -> Ensemble:
        """Load from an extracted archive: every file's digest is verified before anything is loaded.

        On the CPU the members run side by side on this worker's share of the usable cores (or on `parallelism`
        threads, for a process that shares the cores otherwise); on a GPU they run one after another, since
        each kernel already uses the whole device.
        """
        manifest = read_archive_manifest(model_dir)
        spec = manifest.ensemble
        if parallelism is None:
            parallelism = spec.batching.threads_per_worker(usable_cores()) if device.type == "cpu" else 1
        modules = load_archived_members(manifest, model_dir)
        context = {"torch": torch.__version__, "device": device.type, "member_threads": parallelism}
        with shared_plans(model_dir, context) as plans:
            ensemble = cls(
                spec,
                modules,
                device,
                manifest.build,
                manifest.sources,
                parallelism=parallelism,
                remembered_plans=plans.remembered,
                exported=archived_exports(manifest.engines, model_dir),
            )
            plans.record(ensemble.plan_choices())
        return ensemble

    @classmethod
    def from_spec(cls, spec: EnsembleSpec, device: torch.device, *, parallelism: int = 1) -> Ensemble:
        """Load straight from ensembles.yaml paths (evaluation, in-process reference); checks pinned digests."""
        digested, modules, sources = load_source_members(spec)
        return cls(digested, modules, device, {}, sources, parallelism=parallelism)

    def plan_choices(self) -> dict[str, dict[str, Any]]:
        """Each planned member's execution choice, as `describe` shows it."""
        return self.runner.plan_choices()

    def prepare(self, row: Mapping[str, Any], headers: Mapping[str, Any]) -> PreparedRequest:
        """Parse, validate and decode one request; raises a RequestError naming what is wrong."""
        return self.requests.prepare(row, headers)

    def output_names(self) -> list[str]:
        """The v2 output tensors this ensemble answers with (docs, "Open Inference Protocol v2")."""
        names = [member.name for member in self.spec.members]
        return output_names(self.renderer.labels_key, names, ranked=self.spec.task == "multiclass")

    def probabilities(
        self,
        inputs: Inputs,
        forward_seconds: dict[str, float] | None = None,
        wanted: Sequence[Collection[int]] | None = None,
        settle: Callable[[torch.Tensor], Sequence[Collection[int]]] | None = None,
    ) -> torch.Tensor:
        """probs[member, input, label] as float64 on the CPU (MemberRunner.probabilities says how)."""
        return self.runner.probabilities(inputs, forward_seconds, wanted, settle)

    def answer_batch(
        self, prepared: Sequence[PreparedRequest | EnsembleError], started: float | None = None
    ) -> BatchAnswer:
        """One reply per request, in order; the good requests' inputs run together as one batch.

        A request's `deadline_ms` counts from when a proxy received it (`PreparedRequest.arrived`), else from
        `started` (`time.monotonic()`, when the batch was taken up; default now): the members that have not
        answered it by then are missing from its answer, and a request without its quorum is refused (503
        QuorumNotMet) while the others are answered.
        """
        started = time.monotonic() if started is None else started
        good = [p for p in prepared if isinstance(p, PreparedRequest)]
        everyone = tuple(range(len(self.spec.members)))
        wanted = None
        if any(p.members != everyone for p in good):
            wanted = [set(p.members) for p in good for _ in range(len(p.inputs))]
        forward_seconds = {member.name: 0.0 for member in self.spec.members}
        settle = self._settler(good) if any(p.policy.stops_early for p in good) else None
        deadlines, requests = _deadlines(good, started), _ranges(good)
        flat = _flatten(self.spec, [p.inputs for p in good]) if good else None
        scores = (
            self.runner.run(flat, forward_seconds, wanted, settle, deadlines, requests) if flat is not None else None
        )
        replies, offset = [], 0
        for item in prepared:
            if isinstance(item, EnsembleError):
                replies.append(Reply(item.status, item.to_json(), error=item.kind))
                continue
            assert scores is not None, "a prepared request always carries inputs"
            count = len(item.inputs)
            missing = scores.missing[offset : offset + count]
            offset += count
            refusal = self.decider.quorum(missing, item.members, item.min_members)
            if refusal is not None:
                replies.append(_refusal_reply(refusal, item, missing, self.spec))
                continue
            stages = self.stages() if item.policy.stops_early else None
            answer = self.decider.decide(
                scores.probs[:, offset - count : offset],
                item.policy,
                item.members,
                stages=stages,
                uncertainty=item.uncertainty,
                missing=missing,
            )
            if item.v2 is None:
                body = self.renderer.json_body(answer, item.top_k, item.min_run, defaults_only=item.defaults_only)
            else:
                body = self.renderer.v2_body(answer, item.v2, item.top_k)
            deferred = sum(reason is not None for reason in answer.deferred or ())
            reply = Reply(
                200,
                body,
                count,
                policy=item.policy.name,
                members=answer.names,
                votes=answer.own,
                chosen=answer.decision.chosen,
                ran=answer.ran,
                deferred=deferred,
                missing=tuple(answer.missing),
                partial=sum(answer.partial),
            )
            replies.append(reply)
        return BatchAnswer(replies, forward_seconds, tuple(self.runner.stuck()))

    def stages(self) -> tuple[tuple[int, ...], ...]:
        """Member positions in the order members run when a policy stops early: cheapest first
        (`MemberRunner.stages`)."""
        return tuple(group.indices for group in self.runner.stages)

    def _settler(self, good: Sequence[PreparedRequest]) -> Callable[[torch.Tensor], list[tuple[int, ...]]]:
        """After each stage: the members each input still needs. A request that stops early needs none once its
        image is settled; any other request needs all of its members."""
        stages = self.stages()

        def still_needed(probs: torch.Tensor) -> list[tuple[int, ...]]:
            needed: list[tuple[int, ...]] = []
            offset = 0
            for item in good:
                count = len(item.inputs)
                if item.policy.stops_early:
                    done = self.decider.settled(
                        probs[:, offset : offset + count], item.policy, item.members, stages
                    ).tolist()
                    needed += [() if finished else item.members for finished in done]
                else:
                    needed += [item.members] * count
                offset += count
            return needed

        return still_needed

    def render(
        self, probs: torch.Tensor, policy: PolicySpec, *, members: Sequence[str] | None = None, top_k: int | None = None
    ) -> dict[str, Any]:
        """The response body for one request's probabilities (every member's) under `policy`, from `members`
        (default all).

        `top_k` defaults to the ensemble's, as for a request that does not name it.
        """
        answer = self._decide(probs, policy, members)
        return self.renderer.json_body(answer, top_k or self.spec.top_k)

    def render_v2(
        self, probs: torch.Tensor, policy: PolicySpec, form: V2Form, *, members: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The Open Inference Protocol v2 response body for one request: the same answer as tensors."""
        return self.renderer.v2_body(self._decide(probs, policy, members), form)

    def _decide(self, probs: torch.Tensor, policy: PolicySpec, members: Sequence[str] | None) -> Answer:
        stages = self.stages() if policy.stops_early else None
        return self.decider.decide(probs, policy, self.decider.positions(members), stages=stages)

    def describe(self) -> dict[str, Any]:
        """What `GET /models/<name>?customized=true` shows: members, digests, labels and policies."""
        spec = self.spec.to_dict()
        choices = self.plan_choices()
        tensor = self.spec.input if isinstance(self.spec.input, TensorSpec) else None
        return {
            "ensemble": self.spec.name,
            "version": self.spec.version,
            "task": self.spec.task,
            "labels": list(self.spec.labels),
            "positive_label": self.spec.positive_label,
            "default_policy": {"name": self.spec.policy.name, "params": self.spec.policy.params()},
            "policies": policy_names(),
            "parameters": self.requests.parameters(),
            "v2_outputs": self.output_names(),
            "v2_metadata": v2_metadata(
                self.output_names(), len(self.spec.labels), tensor, multilabel=self.spec.task == "multilabel"
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
                    "outputs": label_mapping(m, self.spec.labels),
                    "requires": m.requires,
                    "required": m.required,
                }
                for m, raw in zip(self.spec.members, spec["members"], strict=True)
            ],
            "input": spec["input"],
            "limits": spec["limits"],
            "batching": spec["batching"],
            "deadline": {**spec["deadline"], "stuck_after_s": self.spec.stuck_after_s},
            "consistency": self.spec.consistency,
            "device": str(self.device),
            "member_threads": self.runner.parallelism,
            "execution": self.runner.describe(),
            "execution_schedule": None if self.runner.schedule is None else self.runner.schedule.describe(),
            "early_exit_stages": self.runner.stage_order(),
            "build": self.build,
        }


def _deadlines(good: Sequence[PreparedRequest], started: float) -> list[float | None] | None:
    """Per input, when its answer is due (`time.monotonic()` seconds; None: no deadline), or None when no request
    has one: `deadline_ms` after a proxy received the request, or after `started` (without a stamp, or an earlier
    start)."""
    if all(p.deadline_ms is None for p in good):
        return None
    due = [None if p.deadline_ms is None else min(started, p.arrived or started) + p.deadline_ms / 1000 for p in good]
    return [when for when, p in zip(due, good, strict=True) for _ in p.inputs]


def _ranges(good: Sequence[PreparedRequest]) -> list[tuple[int, int]]:
    """Each request's inputs in the flattened batch, as [start, end)."""
    ends = list(itertools.accumulate(len(p.inputs) for p in good))
    return [(end - len(p.inputs), end) for end, p in zip(ends, good, strict=True)]


def _flatten(spec: EnsembleSpec, inputs: Sequence[tuple[Image.Image, ...] | torch.Tensor]) -> Inputs:
    """Every request's inputs as one batch: a list of images, or one tensor for a tensor-input ensemble."""
    if isinstance(spec.input, TensorSpec):
        tensors = [instances for instances in inputs if isinstance(instances, torch.Tensor)]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return [image for images in inputs for image in images]


def _refusal_reply(
    refusal: QuorumNotMet, item: PreparedRequest, missing: Sequence[dict[int, str]], spec: EnsembleSpec
) -> Reply:
    """A request without its quorum: 503, in its own form (a v2 request gets a v2 error body)."""
    body = refusal.to_json() if item.v2 is None else {"error": str(refusal), "missing": refusal.missing}
    names = [member.name for member in spec.members]
    per_image = tuple({names[m]: why for m, why in sorted(row.items()) if m in item.members} for row in missing)
    return Reply(refusal.status, body, len(item.inputs), error=refusal.kind, missing=per_image)
