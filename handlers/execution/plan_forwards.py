"""Building a plan's forward function for one member: the module as loaded, reordered, traced and frozen,
compiled, or an engine running the archive's ONNX export (`execution.plans` says what each plan is, and
chooses among them).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]  # torch.jit leaves it out of __all__

from handlers.execution.engines import (
    OPENVINO_CACHE,
    Archived,
    EngineUnavailable,
    onnxruntime_forward,
    openvino_forward,
)

FIXED_PLANS = ("eager", "channels_last", "frozen", "frozen_channels_last", "onnxruntime", "openvino", "compiled")
# The engines of each lossy precision, run from the archive's exports.
ENGINE_FILES = {
    "onnxruntime": "onnx",
    "openvino": "onnx",
    "openvino_bf16": "onnx",
    "onnxruntime_int8": "int8",
    "openvino_int8": "int8",
}
# What the archive holds for a member's engines.
Exported = Archived
Forward = Callable[[torch.Tensor], torch.Tensor]


class PlanRejected(Exception):
    """A candidate plan that cannot run this member, or does not reproduce eager: why, in words."""


def build(
    plan: str, module: nn.Module, example: torch.Tensor, exported: Exported | None = None, *, concurrency: int = 1
) -> Forward:
    """The forward function of `plan` for an eval-mode `module` (on the device of `example`); PlanRejected when it
    cannot apply. `exported` is what the archive holds for the ONNX plan; `concurrency` threads may call it at once."""
    if plan in ENGINE_FILES:
        return _engine(plan, exported, example.device, concurrency)
    channels_last = plan.endswith("channels_last")
    if channels_last and example.dim() != 4:
        raise PlanRejected(f"channels_last needs 4-D (N, C, H, W) input; this member takes {example.dim()}-D")
    if plan == "channels_last":
        nhwc = copy.deepcopy(module).to(memory_format=torch.channels_last)
        return lambda batch: nhwc(batch.contiguous(memory_format=torch.channels_last))
    if plan in ("frozen", "frozen_channels_last"):
        frozen = _frozen(module, example, channels_last=channels_last)
        if channels_last:
            return lambda batch: frozen(batch.contiguous(memory_format=torch.channels_last))
        return frozen
    if plan == "compiled":
        try:
            compiled = torch.compile(module, dynamic=True)
            with torch.inference_mode():
                compiled(example)
        except Exception as e:  # Inductor needs a working C++ toolchain and supported ops.
            raise PlanRejected(f"torch.compile failed: {type(e).__name__}: {e}") from e
        return compiled
    raise PlanRejected(f"unknown plan {plan!r}; known: {', '.join(FIXED_PLANS)}")


def _engine(plan: str, exported: Exported | None, device: torch.device, concurrency: int = 1) -> Forward:
    """An engine plan's forward function, from the file the archive holds for it."""
    if exported is None:
        raise PlanRejected("no ONNX export (not loaded from an archive that has one)")
    path = exported.int8 if ENGINE_FILES[plan] == "int8" else exported.onnx
    if path is None:
        raise PlanRejected(
            f"no ONNX export: {exported.refused}" if ENGINE_FILES[plan] == "onnx" else "no int8 export in the archive"
        )
    engine, _, precision = plan.partition("_")
    try:
        if engine == "onnxruntime":
            return onnxruntime_forward(path, device)
        return openvino_forward(
            path, device, precision=precision or "fp32", cache=path.parent.parent / OPENVINO_CACHE, streams=concurrency
        )
    except EngineUnavailable as e:
        raise PlanRejected(str(e)) from e


def _frozen(module: nn.Module, example: torch.Tensor, *, channels_last: bool) -> torch.jit.ScriptModule:
    """Trace, freeze and optimize for inference; refused when the tracer warns the trace may not generalise."""
    source = copy.deepcopy(module)
    if channels_last:
        source = source.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TracerWarning)
        # TorchScript is deprecated upstream in favour of torch.export, yet on CPUs it is still the fastest
        # verified plan for many members (docs/execution-plans.md); the plan is kept while that holds.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        try:
            with torch.no_grad():
                # torch.jit.trace is unannotated.
                traced = torch.jit.trace(source, example, check_trace=False)  # type: ignore[no-untyped-call]
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception as e:  # Tracing refuses dict outputs, some Python control flow, non-tensor arguments.
            raise PlanRejected(f"TorchScript trace failed: {type(e).__name__}: {e}") from e
    unfaithful = [w for w in caught if issubclass(w.category, TracerWarning)]
    if unfaithful:
        first = str(unfaithful[0].message).splitlines()[0]
        raise PlanRejected(f"the trace may not hold for other inputs (data-dependent Python): {first}")
    return frozen
