"""Rendering one request's decided answer (`answers.decide`) as our JSON or as v2 tensors.

The JSON answer (docs "The answer") carries per prediction the combined label(s) and score(s) with
every answering member's own, the members' labels side by side, and provenance: the ensemble version
and the answering members' archived and source digests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from handlers.answers.decide import Answer
from handlers.answers.policies import Decision
from handlers.answers.sequences import summarize
from handlers.answers.uncertainty import Uncertainty
from handlers.answers.v2 import render_v2
from handlers.config.specs import EnsembleSpec
from handlers.inputs.v2 import V2Form

SCORE_DIGITS = 6
# The answer format's version (docs/contract.md): the major number changes only with a change that can break a client.
ANSWER_FORMAT = "2.2"
# Said in an answer no request parameter reached: TorchServe drops the query string of /predictions/<name> unseen.
DEFAULTS_WARNING = (
    "no request parameter reached the ensemble, so its defaults answered ({policy}); TorchServe drops the query"
    " string of /predictions/<name> before the ensemble sees it: send parameters as X-Ensemble-* headers, in a JSON"
    " body's \"parameters\", on /models/<name>/invoke, or through the gateway's /predictions"
)


class Renderer:
    """Renders decided answers for one ensemble; `build` and `source_digests` go into the provenance."""

    def __init__(self, spec: EnsembleSpec, build: Mapping[str, Any], source_digests: Mapping[str, str]) -> None:
        self.spec = spec
        self.build = dict(build)
        self._digests = {member.name: member.sha256 for member in spec.members}
        self._source_digests = dict(source_digests)
        self.labels_key = "labels" if spec.task == "multilabel" else "label"

    def json_body(
        self, answer: Answer, top_k: int | None = None, min_run: int | None = None, *, defaults_only: bool = False
    ) -> dict[str, Any]:
        """Our JSON answer; `top_k` adds each prediction's ranking, `min_run` the `sequence` summary, and
        `defaults_only` (no parameter reached the request) a `warning` saying which policy answered and why."""
        probs, own, decision, names = answer.probs, answer.own, answer.decision, list(answer.names)
        member_views = {name: self._views(own[m], probs[m]) for m, name in enumerate(names)}
        predictions = self._views(decision.chosen, decision.score)
        if top_k is not None:
            self._add_top(predictions, decision, top_k)
            for m, name in enumerate(names):
                self._add_top(member_views[name], Decision(own[m], probs[m]), top_k)
        ran = answer.ran.tolist()
        skipped = answer.skipped() if answer.policy.stops_early else None
        for i, entry in enumerate(predictions):
            entry["members"] = {name: views[i] for m, (name, views) in enumerate(member_views.items()) if ran[m][i]}
            if skipped is not None:
                entry["skipped"] = skipped[i]
                entry["early_exit"] = True
            entry["missing"] = answer.missing[i]
            entry["partial"] = answer.partial[i]
        per_member = {
            name: [view[self.labels_key] if ran[m][i] else None for i, view in enumerate(views)]
            for m, (name, views) in enumerate(member_views.items())
        }
        if answer.uncertainty is not None:
            for entry, measured in zip(predictions, self._uncertainty_views(answer.uncertainty), strict=True):
                entry["uncertainty"] = measured
        if answer.deferred is not None:
            score_key = "scores" if self.spec.task == "multilabel" else "score"
            for entry, reason in zip(predictions, answer.deferred, strict=True):
                entry["deferred"] = reason is not None
                if reason is not None:
                    entry[self.labels_key] = entry[score_key] = None
                    entry["reason"] = reason
        body: dict[str, Any] = {
            "format": ANSWER_FORMAT,
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
        if defaults_only:
            applied = " ".join(
                [f"policy={answer.policy.name}", *(f"{k}={v}" for k, v in answer.policy.params().items())]
            )
            body["warning"] = DEFAULTS_WARNING.format(policy=applied)
        if min_run is not None:
            body["sequence"] = summarize(
                decision.chosen, self.spec.labels, only=self.spec.positive_index, min_run=min_run
            )
        return body

    def v2_body(self, answer: Answer, form: V2Form, top_k: int | None = None) -> dict[str, Any]:
        """The Open Inference Protocol v2 answer: the same decision as tensors, provenance as parameters.

        Besides the labels and scores: `missing` (per image, the JSON object of missing members and why) and
        `partial`; `skipped` when the policy stops early, the uncertainty measures when asked for, and `deferred`
        when the ensemble defers (a deferred image's label is "", no labels).
        """
        decision, names = answer.decision, answer.names
        parameters: dict[str, Any] = {
            "policy": answer.policy.name,
            **answer.policy.params(),
            "ensemble_version": self.spec.version,
        }
        parameters["members"] = ",".join(names)
        parameters["format"] = ANSWER_FORMAT
        parameters.update({f"{name}.sha256": self._digests[name] for name in names})
        chosen = decision.chosen
        skipped = [",".join(spared) for spared in answer.skipped()]
        deferred = [reason is not None for reason in answer.deferred or [None] * chosen.shape[0]]
        if any(deferred):
            chosen = chosen & ~torch.tensor(deferred)[:, None]
        extra: dict[str, tuple[str, torch.Tensor | list[Any]]] = {
            "missing": ("BYTES", [json.dumps(row, sort_keys=True) for row in answer.missing]),
            "partial": ("BOOL", answer.partial),
            "skipped": ("BYTES", skipped),
            "deferred": ("BOOL", deferred),
        }
        if answer.uncertainty is not None:
            extra.update({name: ("FP64", values) for name, values in answer.uncertainty.measures().items()})
        default = [
            "missing",
            "partial",
            *(["skipped"] if answer.policy.stops_early else []),
            *(["deferred"] if answer.deferred is not None else []),
        ]
        default += [name for name in extra if name not in ("missing", "partial", "skipped", "deferred")]
        return render_v2(
            name=self.spec.name,
            version=self.spec.version,
            form=form,
            labels=self.spec.labels,
            multilabel=self.spec.task == "multilabel",
            combined=(chosen, decision.score),
            members={name: (answer.own[m], answer.probs[m]) for m, name in enumerate(names)},
            parameters=parameters,
            digits=SCORE_DIGITS,
            top=None if top_k is None else _top(decision, top_k),
            extra=extra,
            default_extra=default,
        )

    def _uncertainty_views(self, uncertainty: Uncertainty) -> list[dict[str, Any]]:
        """Per image, each measure rounded (multilabel: per label, leaving out a label no member that ran scores)."""
        values = {name: tensor.tolist() for name, tensor in uncertainty.measures().items()}
        count = len(uncertainty.entropy)
        if self.spec.task != "multilabel":
            return [{name: round(v[i], SCORE_DIGITS) for name, v in values.items()} for i in range(count)]
        return [
            {
                name: {label: round(x, SCORE_DIGITS) for label, x in zip(self.spec.labels, v[i], strict=True) if x == x}
                for name, v in values.items()
            }
            for i in range(count)
        ]

    def _add_top(self, views: list[dict[str, Any]], decision: Decision, k: int) -> None:
        """Each view gets `top`: its k best labels in the decision's order, with their scores."""
        picked, best = _top(decision, k)
        for view, indices, values in zip(views, picked.tolist(), best.tolist(), strict=True):
            view["top"] = [
                {"label": self.spec.labels[i], "score": round(v, SCORE_DIGITS)}
                for i, v in zip(indices, values, strict=True)
            ]

    def _views(self, chosen: torch.Tensor, scores: torch.Tensor) -> list[dict[str, Any]]:
        """Per input, the chosen label(s) and score(s) from `chosen` and `scores` [inputs, labels].

        Tensors become Python lists once per call, not once per input: rendering 128 inputs stays
        well under a millisecond. A multilabel member's scores leave out the labels it does not score (NaN).
        """
        labels = self.spec.labels
        if self.spec.task == "multilabel":
            return [
                {
                    "labels": [label for label, on in zip(labels, row, strict=True) if on],
                    "scores": {
                        label: round(v, SCORE_DIGITS) for label, v in zip(labels, values, strict=True) if v == v
                    },
                }
                for row, values in zip(chosen.tolist(), scores.tolist(), strict=True)
            ]
        first = chosen.to(torch.uint8).argmax(dim=-1, keepdim=True)
        picked = scores.gather(-1, first).squeeze(-1).tolist()
        return [
            {"label": labels[index], "score": round(score, SCORE_DIGITS)}
            if any_chosen
            else {"label": None, "score": None}
            for any_chosen, index, score in zip(
                chosen.any(dim=-1).tolist(), first.squeeze(-1).tolist(), picked, strict=True
            )
        ]


def _top(decision: Decision, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best label indices per image in the decision's order, and their scores."""
    picked = decision.order()[:, :k]
    return picked, decision.score.gather(-1, picked)
