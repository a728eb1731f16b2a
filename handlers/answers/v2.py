"""Open Inference Protocol v2 answers: the output tensors, their names and the model metadata.

Output names (docs "Open Inference Protocol v2" lists them): `label` (BYTES [N], "" when the vote abstains)
or `labels` (BOOL [N, L], multilabel), `scores` (FP64 [N, L]), and the same per member as
`<member>.label(s)` and `<member>.scores`; `top_labels` and `top_scores` when a request asks for top_k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from handlers.answers.uncertainty import MEASURES
from handlers.config.specs import TensorSpec
from handlers.inputs.parameters import TOP_OUTPUTS
from handlers.inputs.v2 import V2Form

# Outputs about the answer as a whole: which members are missing and whether that could change it, which members an
# early exit skipped, whether it was deferred, how sure it is.
ANSWER_OUTPUTS = ("missing", "partial", "skipped", "deferred", *MEASURES)


def render_v2(
    *,
    name: str,
    version: str,
    form: V2Form,
    labels: Sequence[str],
    multilabel: bool,
    combined: tuple[torch.Tensor, torch.Tensor],
    members: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    parameters: Mapping[str, Any],
    digits: int,
    top: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: Mapping[str, tuple[str, torch.Tensor | list[Any]]] | None = None,
    default_extra: Sequence[str] = (),
) -> dict[str, Any]:
    """A v2 response. `combined` and each member's entry are (chosen [N, L] bools, scores [N, L]);
    `top`, when a request asked for top_k, is (label indices [N, k] best first, their scores [N, k]).
    `extra` are further outputs by name, (datatype, values [N] or [N, L]), answered when asked for by name;
    those in `default_extra` are answered too when a request names no outputs.

    Scores are rounded to `digits`, as in our JSON answer, so the two forms carry the same numbers. A label a
    multilabel member does not score is null in its scores (JSON has no NaN; numpy clients read it as NaN).
    """
    tensors: dict[str, dict[str, Any]] = {}
    for prefix, (chosen, scores) in (("", combined), *((f"{m}.", pair) for m, pair in members.items())):
        count = chosen.shape[0]
        if multilabel:
            tensors[f"{prefix}labels"] = _tensor(
                f"{prefix}labels", "BOOL", [count, len(labels)], chosen.flatten().tolist()
            )
        else:
            first = chosen.to(torch.uint8).argmax(dim=-1).tolist()
            picked = [labels[i] if any_on else "" for i, any_on in zip(first, chosen.any(dim=-1).tolist(), strict=True)]
            tensors[f"{prefix}label"] = _tensor(f"{prefix}label", "BYTES", [count], picked)
        rounded = [round(v, digits) if v == v else None for v in scores.flatten().tolist()]
        tensors[f"{prefix}scores"] = _tensor(f"{prefix}scores", "FP64", [count, len(labels)], rounded)
        if not prefix and top is not None:
            indices, best = top
            shape = list(indices.shape)
            tensors["top_labels"] = _tensor(
                "top_labels", "BYTES", shape, [labels[i] for i in indices.flatten().tolist()]
            )
            tensors["top_scores"] = _tensor(
                "top_scores", "FP64", shape, [round(v, digits) for v in best.flatten().tolist()]
            )
    defaults = [*tensors, *default_extra]
    for output, (datatype, values) in (extra or {}).items():
        data = values if isinstance(values, list) else values.flatten().tolist()
        shape = [len(values)] if isinstance(values, list) else list(values.shape)
        if datatype == "FP64":
            data = [round(v, digits) if v == v else None for v in data]
        tensors[output] = _tensor(output, datatype, shape, data)
    wanted = form.outputs if form.outputs is not None else tuple(defaults)
    return {
        "model_name": name,
        "model_version": version,
        "id": form.id,
        "parameters": dict(parameters),
        "outputs": [tensors[output] for output in wanted],
    }


def output_names(labels_key: str, members: Sequence[str], *, ranked: bool) -> list[str]:
    """Every output tensor's name: what describe lists and `outputs` may ask for. `ranked` (multiclass)
    adds TOP_OUTPUTS, answered when a request names top_k or asks for them."""
    top = list(TOP_OUTPUTS) if ranked else []
    members_outputs = [f"{m}.{suffix}" for m in members for suffix in (labels_key, "scores")]
    return [labels_key, "scores", *top, *members_outputs, *ANSWER_OUTPUTS]


def v2_metadata(
    names: Sequence[str], labels: int, tensor: TensorSpec | None, *, multilabel: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """The model metadata the protocol's `GET /v2/models/<name>` returns: our one input and every output in `names`
    (as `output_names` lists them), each with its datatype and shape; -1 marks a size each request chooses."""
    if tensor is None:
        inputs = [{"name": "data", "datatype": "BYTES", "shape": [-1]}]
    else:
        inputs = [{"name": "data", "datatype": "FP32", "shape": [-1, *tensor.shape]}]
    kinds = {
        "label": ("BYTES", [-1]),
        "labels": ("BOOL", [-1, labels]),
        "scores": ("FP64", [-1, labels]),
        "top_labels": ("BYTES", [-1, -1]),
        "top_scores": ("FP64", [-1, -1]),
        "missing": ("BYTES", [-1]),
        "partial": ("BOOL", [-1]),
        "skipped": ("BYTES", [-1]),
        "deferred": ("BOOL", [-1]),
        **{measure: ("FP64", [-1, labels] if multilabel else [-1]) for measure in MEASURES},
    }
    outputs = []
    for name in names:
        datatype, shape = kinds[name.rsplit(".", 1)[-1]]
        outputs.append({"name": name, "datatype": datatype, "shape": shape})
    return {"inputs": inputs, "outputs": outputs}


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}
