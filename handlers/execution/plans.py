"""Execution plans: the ways one member's forward call can run, and the choice among them by measurement.

A plan turns a loaded member (behind its `outputs.MemberHead`) into a function `[n, *input] -> probabilities`:
- `eager`: the module as loaded;
- `channels_last`: weights and input in NHWC order (4-D inputs only), which many CPU and GPU
  convolution kernels run faster;
- `frozen`: traced with TorchScript, frozen (weights become constants, batch norm folds into the
  convolutions) and passed through `optimize_for_inference`; the interpreter runs without the GIL,
  so members on different threads no longer take turns at Python;
- `frozen_channels_last`: both;
- `onnxruntime`: the ONNX file the build exported and proved (the manifest's `engines`), run by ONNX Runtime
  on one intra-op thread;
- `openvino`: the same file compiled by OpenVINO at worker start (fp32, one stream of one thread per member thread);
- `compiled`: `torch.compile`, tried by `auto` only with `compile: true` (it takes seconds to
  minutes per member, paid again at every worker start).

`auto` builds each candidate, checks it against eager on a probe batch (probabilities within
`TOLERANCE` at every timed size, and a trace the tracer did not warn about, since a warning means
data-dependent control flow was frozen into one branch), times it as the worker will call it, and keeps
the fastest verified one when it beats eager by at least `MIN_GAIN`. As the worker calls it: at the slice
sizes its batching produces, and with every member thread calling the plan at once, each on its own
slice (a served batch keeps all the threads busy). A plan that is fast alone but queues its callers (an
engine with one stream) or shares the cores badly loses there, as it would when served. The members'
choices are then settled together (`execution.schedule`): a served batch with every member on its own
choice against every member on one plan, and the faster kept. A choice another
worker of the same model already measured (`remembered`) is rebuilt and verified, not timed again:
workers of one model then run the same plans, and a restarted worker is back sooner.

A member with a lossy `execution.precision` (bf16, int8) was measured against fp32 by the build
(`handlers.execution.precision`); `auto` then times only the engines of that precision (`LOSSY_PLANS`) and
keeps the fastest, checked for output shape and finite values here, since its agreement was measured there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from handlers.config.specs import Execution
from handlers.execution.engines import precision_unsupported
from handlers.execution.outputs import largest_difference
from handlers.execution.plan_forwards import FIXED_PLANS, Exported, Forward, PlanRejected, build
from handlers.execution.plan_timing import time_plans
from handlers.execution.precision import LOSSY_PLANS

TOLERANCE = 1e-4
MIN_GAIN = 1.03
AUTO_PLANS = FIXED_PLANS[:6]
HANDOFF_PLANS = frozenset({"openvino", "openvino_bf16", "openvino_int8"})
HANDOFF_GAIN = 1.05
ENGINE_PLANS = ("onnxruntime", "openvino")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The plan a member runs, with what the choice measured: ms per call by plan and size, and rejections."""

    plan: str
    forward: Forward
    ms: dict[str, dict[int, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    build_s: float = 0.0
    remembered: bool = False
    precision: Mapping[str, Any] = field(default_factory=lambda: {"precision": "fp32"})
    concurrency: int = 1
    candidates: Mapping[str, Forward] = field(default_factory=dict, compare=False, repr=False)
    """Every fp32 plan `auto` built, verified and timed here, so the served schedule can still pick another
    (`execution.schedule`); emptied once it has."""

    @property
    def speedup(self) -> float | None:
        """Eager's time over the chosen plan's, geometric mean over the timed sizes; None when nothing was timed."""
        if self.plan not in self.ms or "eager" not in self.ms:
            return None
        return _gain(self.ms["eager"], self.ms[self.plan])

    def describe(self) -> dict[str, Any]:
        """What `describe` shows for this member."""
        speedup = self.speedup
        return {
            "plan": self.plan,
            "speedup_vs_eager": None if speedup is None else round(speedup, 2),
            "ms_per_call": {
                plan: {str(size): round(ms, 3) for size, ms in sizes.items()} for plan, sizes in self.ms.items()
            },
            "rejected": self.rejected,
            "load_s": round(self.build_s, 2),
            "measured_by": "another worker" if self.remembered else "this worker",
            "timed_as": {
                "threads_at_once": self.concurrency,
                "ms_per_call": "wall time of a round in which every thread calls the plan once on its own slice; "
                "best round",
            },
            "precision": dict(self.precision),
        }


def prepare_cuda() -> None:
    """Process-wide settings for members on a GPU: float32 stays float32, and TorchScript fuses no GPU kernels.

    cuDNN's default TF32 convolutions moved scores by up to 6e-4 from the CPU's on an H200
    (CheXNet-shaped DenseNet121); without TF32 they agree within 4e-7. TorchScript's TensorExpr fuser
    compiles fused kernels during a frozen member's first profiled calls: for that DenseNet121 one
    call took over three minutes on the H200, longer than a worker may take to start; without the
    fuser the frozen plan builds in 1.3 s and runs 64x64 batches of 8 in about 10 ms.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._C._jit_set_texpr_fuser_enabled(False)  # What torch.jit.fuser("none") sets, for the whole process.


def choose(
    module: nn.Module,
    instance_shape: tuple[int, ...],
    execution: Execution,
    *,
    sizes: Sequence[int],
    device: torch.device,
    remembered: Mapping[str, Any] | None = None,
    exported: Exported | None = None,
    concurrency: int = 1,
) -> Choice:
    """The plan `execution` asks for; with `auto`, the fastest candidate that reproduces eager.

    `concurrency` is how many member threads call a member at once when a batch is served: engines get as
    many streams, and `auto` times every candidate with that many threads calling it at once.

    A fixed plan is checked the same way and refused (MemberLoadError at the caller) when it does
    not reproduce eager, since serving different numbers than the checkpoint's would be silent.
    `remembered` is an earlier `Choice.describe()` for this member: with `auto`, its plan is rebuilt
    and verified instead of timing every candidate, when it was timed at these `sizes` and is still
    allowed; otherwise (or when it no longer verifies) the choice is made afresh.
    """
    began = time.perf_counter()
    module = module.to(device).eval()
    if execution.plan == "eager":
        return Choice("eager", module)
    probes = {size: _probe(size, instance_shape, device) for size in sizes}
    with torch.inference_mode():
        reference = {size: module(probe) for size, probe in probes.items()}
    wanted = (
        AUTO_PLANS + (("compiled",) if execution.compile else ()) if execution.plan == "auto" else (execution.plan,)
    )
    if (
        execution.plan == "auto" and exported is None
    ):  # Loaded from ensembles.yaml, not an archive: nothing was exported.
        wanted = tuple(plan for plan in wanted if plan not in ENGINE_PLANS)
    precision, lossy = _precision(execution, exported)
    if lossy:
        wanted = ("eager", *LOSSY_PLANS[execution.precision])
    if execution.plan == "auto" and remembered is not None:
        reused = _reuse(remembered, module, probes, reference, wanted, exported, lossy=lossy, concurrency=concurrency)
        if reused is not None:
            return replace(reused, build_s=time.perf_counter() - began, precision=precision)
    forwards: dict[str, Forward] = {"eager": module}
    rejected: dict[str, str] = {}
    for plan in wanted:
        if plan == "eager":
            continue
        try:
            forward = build(plan, module, probes[max(sizes)], exported, concurrency=concurrency)
            _verify(forward, probes, reference, lossy=plan in lossy)
        except PlanRejected as e:
            rejected[plan] = str(e)
            continue
        forwards[plan] = forward
    if execution.plan != "auto":
        if execution.plan in rejected:
            raise PlanRejected(f"plan {execution.plan!r}: {rejected[execution.plan]}")
        return Choice(
            execution.plan,
            forwards[execution.plan],
            rejected=rejected,
            build_s=time.perf_counter() - began,
            concurrency=concurrency,
        )
    ms = time_plans(forwards, probes, device, concurrency)
    cost = {plan: 1 / _gain(ms["eager"], ms[plan]) for plan in ms}
    if lossy and any(plan in forwards for plan in lossy):  # The precision was asked for: its fastest engine runs.
        best = fastest({plan: c for plan, c in cost.items() if plan in lossy})
    else:
        best = fastest(cost)
        if _gain(ms["eager"], ms[best]) < MIN_GAIN:
            best = "eager"
        if lossy:
            precision = {"precision": "fp32", "fallback": f"no {execution.precision} engine runs here: {rejected}"}
    elapsed = time.perf_counter() - began
    candidates = {} if lossy else forwards
    return Choice(
        best,
        forwards[best],
        ms=ms,
        rejected=rejected,
        build_s=elapsed,
        precision=precision,
        concurrency=concurrency,
        candidates=candidates,
    )


def fastest(costs: Mapping[str, float]) -> str:
    """The plan of lowest cost; a plan that runs each call on threads of its own (`HANDOFF_PLANS`) only when it is
    `HANDOFF_GAIN` cheaper than the cheapest plan that runs on the calling thread.

    The member thread hands an OpenVINO call to OpenVINO's stream thread and waits. Timed in a quiet worker that
    costs nothing; served, with TorchServe's frontend and the clients keeping the cores busy, every hand-off waits
    for a core: on a 2-core AMD EPYC, every trio member on OpenVINO served 0.96x-0.99x the images/s of every member
    on ONNX Runtime (`make bench-auto`, batch 8), though the worker had timed OpenVINO up to 3% ahead.
    """
    best = min(costs, key=lambda plan: costs[plan])
    inline = [plan for plan in costs if plan not in HANDOFF_PLANS]
    if best in HANDOFF_PLANS and inline:
        other = min(inline, key=lambda plan: costs[plan])
        if costs[other] < HANDOFF_GAIN * costs[best]:
            return other
    return best


def _precision(execution: Execution, exported: Exported | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The precision a member runs at, as `describe` shows it, and the plans of that precision (none for fp32).

    A lossy precision applies only where the build measured it and this CPU runs it faster than fp32; otherwise the
    member runs in fp32, and the reason is logged and shown.
    """
    if execution.precision == "fp32":
        return {"precision": "fp32"}, ()
    why = precision_unsupported(execution.precision)
    measured = None if exported is None else exported.measured
    if why is None and measured is not None:
        return dict(measured), LOSSY_PLANS[execution.precision]
    if why is None:
        why = (
            f"the archive holds no measured {execution.precision} export "
            "(the build measures it; a spec loaded from ensembles.yaml has none)"
        )
    logger.warning("served in fp32, not %s: %s", execution.precision, why)
    return {"precision": "fp32", "fallback": why}, ()


def _reuse(
    remembered: Mapping[str, Any],
    module: nn.Module,
    probes: dict[int, torch.Tensor],
    reference: dict[int, torch.Tensor],
    allowed: Sequence[str],
    exported: Exported | None,
    *,
    lossy: Sequence[str] = (),
    concurrency: int = 1,
) -> Choice | None:
    """The remembered choice, rebuilt and verified; None when it does not apply here (other sizes, another number of
    threads at once) or no longer verifies."""
    try:
        plan = remembered["plan"]
        ms = {
            name: {int(size): float(v) for size, v in sizes.items()}
            for name, sizes in remembered["ms_per_call"].items()
        }
        rejected = {str(name): str(reason) for name, reason in remembered["rejected"].items()}
        timed_at_once = int(remembered["timed_as"]["threads_at_once"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if (
        plan not in allowed
        or any(set(sizes) != set(probes) for sizes in ms.values())
        or plan not in ms
        or timed_at_once != concurrency
    ):
        return None
    try:
        forward = (
            module if plan == "eager" else build(plan, module, probes[max(probes)], exported, concurrency=concurrency)
        )
        _verify(forward, probes, reference, lossy=plan in lossy)
    except PlanRejected:
        return None
    return Choice(plan, forward, ms=ms, rejected=rejected, remembered=True, concurrency=concurrency)


def _verify(
    forward: Forward,
    probes: dict[int, torch.Tensor],
    reference: dict[int, torch.Tensor],
    *,
    lossy: bool = False,
) -> None:
    """Every probe size twice (TorchScript optimises on its first calls): probabilities within TOLERANCE of eager.

    A `lossy` plan's agreement was measured by the build on calibration images: here its shape and finite values are.
    """
    for _ in range(2):
        for size, probe in probes.items():
            try:
                with torch.inference_mode():
                    got = forward(probe)
            except Exception as e:
                raise PlanRejected(f"fails at batch {size}: {type(e).__name__}: {e}") from e
            if got.shape != reference[size].shape:
                raise PlanRejected(
                    f"outputs shape {tuple(got.shape)} at batch {size}; eager gives {tuple(reference[size].shape)}"
                )
            if lossy:
                if not torch.isfinite(got).all():
                    raise PlanRejected(f"non-finite probabilities at batch {size}")
                continue
            difference = largest_difference(got, reference[size])
            if not difference <= TOLERANCE:
                raise PlanRejected(
                    f"probabilities differ from eager by {difference:.2e} at batch {size} (limit {TOLERANCE:g})"
                )


def _gain(eager: dict[int, float], other: dict[int, float]) -> float:
    """Eager's time over `other`'s, geometric mean over sizes: 1.5 means 1.5x faster than eager."""
    ratios = [eager[size] / other[size] for size in eager]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _probe(size: int, instance_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randn(size, *instance_shape, generator=generator).to(device)
