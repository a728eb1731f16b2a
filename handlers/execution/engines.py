"""Inference engines besides PyTorch: a member exported to ONNX at build time, run by ONNX Runtime or OpenVINO.

The build exports each member behind its `outputs.MemberHead` (so the graph returns probabilities in
the ensemble's label order) with a dynamic batch axis: torch's dynamo exporter first, the TorchScript-based
one when dynamo fails. An export counts only when ONNX Runtime reproduces eager's probabilities within
`TOLERANCE` at one row and at the largest slice size; otherwise the reason is recorded and the member is
served by the other plans. The `.onnx` is archived next to the member's weights and pinned by its sha256.

Both engines run each member on one inference thread: members already run side by side on the member
threads, one per core. OpenVINO compiles the archived ONNX when a worker starts, into a cache in the model
directory, so a worker that restarts on the same machine skips the compilation.

Lossy precisions (`execution.precision`) run on these engines too: bf16 is OpenVINO's bf16 inference of the
fp32 export, int8 a statically quantised copy of it (ONNX Runtime's quantiser, calibrated on the member's
calibration images; see `handlers.execution.precision`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]  # torch.jit leaves it out of __all__

from handlers.execution.outputs import largest_difference

TOLERANCE = 1e-4
EXPORTERS = ("dynamo", "torchscript")
OPSET = 18
CACHE_RECORD = "export.json"
CACHE_MODEL = "model.onnx"
OPENVINO_CACHE = ".openvino-cache"
OPENVINO_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}
# The CPU flags a precision needs to run faster than fp32 (Linux /proc/cpuinfo names): without them OpenVINO and
# ONNX Runtime emulate it, slower than fp32.
PRECISION_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
logger = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """An engine that cannot run this member here: why, in words."""


@dataclass(frozen=True)
class Export:
    """The outcome of exporting one member: the exporter that produced a verified file, or why none did."""

    exporter: str | None
    reason: str | None
    seconds: float

    def record(self, file: str) -> dict[str, object]:
        """What the manifest's `engines` entry says of it."""
        return {"refused": self.reason} if self.exporter is None else {"file": file, "exporter": self.exporter}


def export_onnx(
    head: nn.Module, instance_shape: tuple[int, ...], path: Path, sizes: Sequence[int], cache: Path | None = None
) -> Export:
    """Export `head` to `path` and prove it against eager at 1 row and at max(sizes); the first exporter that passes
    wins.

    `cache` is a folder for this exact member (its key names its weights, head and input, the exporters' code and
    torch): an export found there is proven again instead of being redone, and a refusal is remembered.
    """
    began = time.perf_counter()
    head = head.eval()
    cached = _from_cache(cache, head, instance_shape, path, sizes)
    if cached is not None:
        return cached
    failures = []
    for exporter in EXPORTERS:
        try:
            _export(head, instance_shape, path, dynamo=exporter == "dynamo")
            _prove(head, instance_shape, path, sorted({1, *sizes}))
        except Exception as e:  # Exporters fail in many ways (unsupported ops, data-dependent Python, numerics).
            failures.append(f"{exporter}: {_why(e)}")
            path.unlink(missing_ok=True)
            continue
        return _to_cache(cache, Export(exporter, None, time.perf_counter() - began), path)
    return _to_cache(cache, Export(None, "; ".join(failures), time.perf_counter() - began), path)


def _from_cache(
    cache: Path | None, head: nn.Module, instance_shape: tuple[int, ...], path: Path, sizes: Sequence[int]
) -> Export | None:
    if cache is None or not (cache / CACHE_RECORD).is_file():
        return None
    began = time.perf_counter()
    recorded = json.loads((cache / CACHE_RECORD).read_text())
    if recorded["exporter"] is None:
        return Export(None, recorded["reason"], 0.0)
    shutil.copyfile(cache / CACHE_MODEL, path)
    try:
        _prove(head, instance_shape, path, sorted({1, *sizes}))
    except Exception:  # A cached file that no longer proves is exported afresh.
        path.unlink(missing_ok=True)
        return None
    return Export(recorded["exporter"], None, time.perf_counter() - began)


def _to_cache(cache: Path | None, export: Export, path: Path) -> Export:
    if cache is not None:
        staging = cache.with_name(f".{cache.name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if export.exporter is not None:
            shutil.copyfile(path, staging / CACHE_MODEL)
        (staging / CACHE_RECORD).write_text(json.dumps({"exporter": export.exporter, "reason": export.reason}))
        try:
            staging.rename(cache)
        except OSError:  # Another build cached the same member first.
            shutil.rmtree(staging, ignore_errors=True)
    return export


@dataclass(frozen=True)
class Archived:
    """What an archive holds for one member's engines: its fp32 ONNX file or why there is none, its int8 file,
    and how its lossy precision measured against fp32 at build time (`precision.Agreement.record()`)."""

    onnx: Path | None
    refused: str | None = None
    int8: Path | None = None
    measured: Mapping[str, Any] | None = None


def archived_exports(engines: Mapping[str, Mapping[str, Any]], model_dir: Path) -> dict[str, Archived]:
    """Per member, from an archive's `engines` (its files digest-verified with the archive)."""
    return {
        member: Archived(
            onnx=model_dir / record["file"] if "file" in record else None,
            refused=None if "file" in record else str(record.get("refused")),
            int8=model_dir / record["int8"] if "int8" in record else None,
            measured=record.get("precision"),
        )
        for member, record in engines.items()
    }


def onnxruntime_forward(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward function running the archived ONNX file with ONNX Runtime on one intra-op thread."""
    try:
        import onnxruntime
    except ImportError as e:
        raise EngineUnavailable(f"onnxruntime is not installed: {e}") from e
    if device.type != "cpu":
        raise EngineUnavailable(f"this build of ONNX Runtime runs on the CPU only, and the member is on {device}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.contiguous().numpy()})[0])

    return forward


def openvino_compiled(
    path: Path, device: torch.device, *, precision: str = "fp32", cache: Path | None = None, streams: int = 1
) -> Any:
    """An ONNX file compiled by OpenVINO for the CPU: `streams` streams of one inference thread each.

    The worker's member threads call one member at once (a batch is cut into one slice per thread), each
    through an infer request of its own; a request runs on a stream, and requests beyond the streams queue.
    One stream per member thread lets the slices run side by side, as ONNX Runtime's shared session does.
    Workers pass `cache` (`OPENVINO_CACHE` in the model directory), so a restarted worker loads the compiled model.
    The precision is set explicitly: on CPUs with AMX, OpenVINO's default is bf16, which is lossy.
    """
    try:
        import openvino
    except ImportError as e:
        raise EngineUnavailable(f"openvino is not installed: {e}") from e
    if device.type != "cpu":
        raise EngineUnavailable(f"this plan runs OpenVINO on the CPU only, and the member is on {device}")
    config = {
        **({} if cache is None else {"CACHE_DIR": str(cache)}),
        "INFERENCE_NUM_THREADS": streams,
        "NUM_STREAMS": streams,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
        "ENABLE_CPU_PINNING": False,
    }
    try:
        return openvino.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as e:
        raise EngineUnavailable(f"OpenVINO cannot compile {path.name}: {_why(e)}") from e


def openvino_forward(
    path: Path, device: torch.device, *, precision: str = "fp32", cache: Path | None = None, streams: int = 1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward function running `openvino_compiled(...)`, through one infer request per calling thread."""
    compiled = openvino_compiled(path, device, precision=precision, cache=cache, streams=streams)
    requests = threading.local()  # An infer request serves one call at a time: one per member thread.

    def forward(batch: torch.Tensor) -> torch.Tensor:
        request = getattr(requests, "request", None)
        if request is None:
            request = requests.request = compiled.create_infer_request()
        return torch.from_numpy(request.infer({0: batch.contiguous().numpy()})[0])

    return forward


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them (read once per process); empty where /proc/cpuinfo cannot be
    read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), ())
    )


def precision_unsupported(precision: str, flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU cannot run `precision` faster than fp32, or None when it can (fp32 always can)."""
    needed = PRECISION_FLAGS.get(precision)
    if needed is None:
        return None
    flags = cpu_flags() if flags is None else flags
    if any(flag in flags for flag in needed):
        return None
    return (
        f"{precision} needs one of the CPU features {', '.join(needed)} to run faster than fp32, and this CPU has none"
    )


def _why(error: BaseException) -> str:
    """The root cause of an export failure in one line: exporters wrap it in generic, coloured messages."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in ANSI.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _export(head: nn.Module, instance_shape: tuple[int, ...], path: Path, *, dynamo: bool) -> None:
    example = torch.randn(2, *instance_shape, generator=torch.Generator().manual_seed(0))
    axes = {"input": {0: "batch"}, "probabilities": {0: "batch"}}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            torch.no_grad(),
            redirect_stdout(io.StringIO()),
            redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", TracerWarning)
            torch.onnx.export(
                head,
                (example,),
                str(path),
                dynamo=dynamo,
                input_names=["input"],
                output_names=["probabilities"],
                dynamic_axes=axes,
                opset_version=OPSET,
                verbose=False,
                external_data=False,
            )
    finally:
        quiet.setLevel(level)
    unfaithful = [w for w in caught if issubclass(w.category, TracerWarning)]
    if unfaithful:  # As for the frozen plan: data-dependent Python was traced into one branch.
        raise ValueError(
            "the trace may not hold for other inputs (data-dependent Python): "
            f"{str(unfaithful[0].message).splitlines()[0]}"
        )


def _prove(head: nn.Module, instance_shape: tuple[int, ...], path: Path, sizes: Sequence[int]) -> None:
    forward = onnxruntime_forward(path, torch.device("cpu"))
    for size in sizes:
        probe = torch.randn(size, *instance_shape, generator=torch.Generator().manual_seed(size))
        with torch.inference_mode():
            expected = head(probe)
        difference = largest_difference(forward(probe), expected)
        if not difference <= TOLERANCE:
            raise ValueError(
                f"probabilities differ from eager by {difference:.2e} at batch {size} (limit {TOLERANCE:g})"
            )
